// Launchers of the CUDA kernels of the packed activation (see
// ../packed_activation_math.h). They take raw device pointers to contiguous
// data, launch on `stream` and return the launch status; nothing here depends on
// torch, so the kernel translation unit compiles alone for any architecture
// (sm_53 included). scalar_t is float, double or __half. The mask is
// ceil(numel / 32) words; bit i % 32 of word i / 32 belongs to element i.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace da2ext {
namespace cuda {

// output = clamp(input, 0, upper), mask bits where the gradient passes;
// upper > 0, +inf for ReLU. `output` may be `input` (in place).
template <typename scalar_t>
cudaError_t packed_activation(const scalar_t* input, int64_t numel, double upper, scalar_t* output, uint32_t* mask,
                              cudaStream_t stream);

// grad_input = grad_output where the mask bit is set, else 0.
template <typename scalar_t>
cudaError_t packed_activation_backward(const scalar_t* grad_output, const uint32_t* mask, int64_t numel,
                                       scalar_t* grad_input, cudaStream_t stream);

}  // namespace cuda
}  // namespace da2ext
