// Launchers of the CUDA kernels of the residual attention adaptor. They take raw
// device pointers to contiguous NCHW data and sizes, launch on `stream` and
// return the launch status; nothing here depends on torch, so the kernel
// translation unit compiles on its own for any architecture (sm_53 included).
// scalar_t is float, double or __half; acc_t is double for double, else float.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace da2ext {
namespace cuda {

// Elements of the scratch buffer (of acc_t) that descriptor_pool and
// attention_backward_reduce need for their per-tile partial row sums (pass
// C = k * C for attention_backward_reduce at rank k).
int64_t row_partial_count(int64_t N, int64_t C, int64_t HW);

// The attention ops take `rank` k (1 <= k <= math::kMaxRank) terms: gate_channel
// [N, k, C] and gate_spatial [N, k, HW] (for k == 1 the rank-1 [N, C] and [N, HW]
// gates, with today's kernels); attention_backward_reduce then writes
// channel_sum [N, k, C] and spatial_sum [N, k, HW].

// channel_mean [N, C], spatial [N, 2, HW] (mean, max over C), argmax [N, HW].
template <typename scalar_t, typename acc_t>
cudaError_t descriptor_pool(const scalar_t* input, int64_t N, int64_t C, int64_t HW, scalar_t* channel_mean,
                            scalar_t* spatial, int32_t* argmax, acc_t* row_partial, cudaStream_t stream);

template <typename scalar_t, typename acc_t>
cudaError_t attention_apply(const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial, int64_t N,
                            int64_t C, int64_t HW, int rank, bool multiplicative, scalar_t* output,
                            cudaStream_t stream);

// input may be null in add mode.
template <typename scalar_t, typename acc_t>
cudaError_t attention_backward_reduce(const scalar_t* grad_output, const scalar_t* input, const acc_t* gate_channel,
                                      const acc_t* gate_spatial, int64_t N, int64_t C, int64_t HW, int rank,
                                      bool multiplicative, acc_t* channel_sum, acc_t* spatial_sum,
                                      acc_t* row_partial, cudaStream_t stream);

template <typename scalar_t, typename acc_t>
cudaError_t attention_input_grad(const scalar_t* grad_output, const acc_t* gate_channel, const acc_t* gate_spatial,
                                 const acc_t* grad_channel_mean, const acc_t* grad_spatial, const int32_t* argmax,
                                 int64_t N, int64_t C, int64_t HW, int rank, bool multiplicative,
                                 scalar_t* grad_input,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace da2ext
