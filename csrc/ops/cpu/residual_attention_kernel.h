// The CPU drivers of the adaptor's heavy passes on raw pointers
// (residual_attention_kernel.cpp: the split over threads, the loops of
// residual_attention_loops.h). The dispatcher ops of that file check and allocate
// around them; the one-op adaptor's loop path (residual_attention_composite.cpp)
// calls them directly, its gates and sums in one scratch buffer, where a dispatch
// and an allocation per pass cost more than a small map's arithmetic.
//
// Layouts as the ops': gates [N, C] and [N, H*W] at rank 1, [N, k, C] and
// [N, k, H*W] at rank k, in the accumulation type acc_t; the feature maps in the
// memory order `s` describes. Instantiated for float and double (acc_t the same).
#pragma once

#include <cstdint>

#include "../residual_attention.h"
#include "../residual_attention_math.h"
#include "scratch_buffer.h"

namespace da2ext {
namespace ops {
namespace cpu {

// The kernels' mode for the ops' `multiplicative` flag.
inline math::Mode mode_of(bool multiplicative) {
  return multiplicative ? math::Mode::Mul : math::Mode::Add;
}

template <typename scalar_t>
void descriptor_pool(const scalar_t* input, const FeatureShape& s, scalar_t* channel_mean, scalar_t* spatial,
                     int32_t* argmax);

template <typename scalar_t, typename acc_t>
void attention_apply(math::Mode mode, const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial,
                     int k, const FeatureShape& s, scalar_t* output);

// `input` is read in mode Mul only (it may be null in mode Add).
template <typename scalar_t, typename acc_t>
void attention_backward_reduce(math::Mode mode, const scalar_t* grad_output, const scalar_t* input,
                               const acc_t* gate_channel, const acc_t* gate_spatial, int k, const FeatureShape& s,
                               acc_t* channel_sum, acc_t* spatial_sum);

// grad_channel_mean [N, C], grad_spatial [N, 2, H*W], argmax [N, H*W].
template <typename scalar_t, typename acc_t>
void attention_input_grad(math::Mode mode, const scalar_t* grad_output, const acc_t* gate_channel,
                          const acc_t* gate_spatial, const acc_t* grad_channel_mean, const acc_t* grad_spatial,
                          const int32_t* argmax, int k, const FeatureShape& s, scalar_t* grad_input);

}  // namespace cpu
}  // namespace ops
}  // namespace da2ext
