// Torch-side checks and allocation shared by the CPU and CUDA implementations of
// the packed activation ops (schema in packed_activation.cpp), so that both
// backends accept and produce exactly the same tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "memory_order.h"

namespace da2ext {
namespace ops {

// `name` must be a defined float16/float32/float64 tensor (any shape, numel 0
// included), dense in one of the two memory orders the kernels take: contiguous,
// or channels_last (4-D). The elementwise kernels walk memory in order, so the
// mask's bit i is memory element i whichever it is.
void check_activation_tensor(const at::Tensor& t, const char* op, const char* name);


// upper must be > 0 (+inf allowed, NaN not).
void check_activation_upper(double upper, const char* op);

// `mask` must be an int32 contiguous tensor of ceil(numel / 32) words on
// `reference`'s device.
void check_activation_mask(const at::Tensor& mask, const at::Tensor& reference, const char* op);

// The int32 mask storage as the uint32 words the kernels pack (same size and layout).
uint32_t* mask_words_ptr(const at::Tensor& mask);

// The mask for `input`: int32 [ceil(numel / 32)], uninitialised.
at::Tensor allocate_activation_mask(const at::Tensor& input);

// (output like input, in its memory order; the mask as above), both uninitialised.
std::tuple<at::Tensor, at::Tensor> allocate_activation_outputs(const at::Tensor& input);

}  // namespace ops
}  // namespace da2ext
