// The per-element arithmetic of the residual attention adaptor (docs/design.md §2),
// shared by the CPU kernels and the CUDA kernels so that both compute exactly the
// same formulas. Everything here works on the accumulation type (float for
// float/half storage, double for double) and includes no torch header, so the
// CUDA translation unit stays free of torch and can be compiled for sm_53 alone.
//
// Notation (N x C x H x W input F, HW = H * W):
//   gate_channel[n, c]  = gamma[c] * sigmoid(a_c[n, c])      (N x C, computed by the caller)
//   gate_spatial[n, hw] = sigmoid(a_s[n, hw])                (N x HW, computed by the caller)
//   attention gamma[c] * A[n, c, hw] = gate_channel[n, c] * gate_spatial[n, hw]
// The attention map itself is never stored: every kernel rebuilds it from the two
// small factors, one multiplication per element.
#pragma once

#include "accumulate_type.h"
#include "host_device.h"

#include <cmath>

namespace da2ext {
namespace math {

// The two ways the attention is combined with the block output.
enum class Mode : int { Add = 0, Mul = 1 };

// Rank k (1 <= k <= kMaxRank): the attention is a sum of k products,
//   gamma*A[n, c, hw] = sum_j gate_channel[n, j, c] * gate_spatial[n, j, hw]
// (gate_channel N x k x C, gate_spatial N x k x HW); rank 1 is the case above.
// The kernels keep today's rank-1 loops for k == 1 and take the rank loop inside
// their element loop otherwise.
constexpr int kMaxRank = 16;

// The attention at one element for rank k: sum_j channel[j * channel_stride] *
// spatial[j * spatial_stride], summed in increasing j (so every kernel, CPU or
// CUDA, NCHW or channels_last, gets the same bits). For k == 1 it is the rank-1
// product gate_channel * gate_spatial.
template <typename acc_t, typename stride_t>
DA2_HOST_DEVICE acc_t rank_attention(const acc_t* channel, stride_t channel_stride, const acc_t* spatial,
                                     stride_t spatial_stride, int k) {
  acc_t attention = channel[0] * spatial[0];
  for (int j = 1; j < k; ++j) {
    attention += channel[j * channel_stride] * spatial[j * spatial_stride];
  }
  return attention;
}

// y = F + attention (add) or y = F * (1 + attention) (mul), for an attention of any rank.
template <typename acc_t>
DA2_HOST_DEVICE acc_t combine_attention(Mode mode, acc_t input, acc_t attention) {
  return mode == Mode::Add ? input + attention : input * (acc_t(1) + attention);
}

// y = F + gamma*A (add) or y = F * (1 + gamma*A) (mul).
template <typename acc_t>
DA2_HOST_DEVICE acc_t apply_attention(Mode mode, acc_t input, acc_t gate_channel, acc_t gate_spatial) {
  return combine_attention(mode, input, gate_channel * gate_spatial);
}

// dy/dF holding the attention fixed: 1 (add) or 1 + attention (mul), any rank.
template <typename acc_t>
DA2_HOST_DEVICE acc_t direct_scale_of_attention(Mode mode, acc_t attention) {
  return mode == Mode::Add ? acc_t(1) : acc_t(1) + attention;
}

// dy/dF holding the attention fixed: 1 (add) or 1 + gamma*A (mul).
template <typename acc_t>
DA2_HOST_DEVICE acc_t direct_input_scale(Mode mode, acc_t gate_channel, acc_t gate_spatial) {
  return mode == Mode::Add ? acc_t(1) : acc_t(1) + gate_channel * gate_spatial;
}

// dL/d(gamma*A) at one element: g (add) or g*F (mul). Both attention reductions
// of the backward are sums of this term times one of the two gates:
//   channel_sum[n, c]  = sum_hw term * gate_spatial[n, hw]
//   spatial_sum[n, hw] = sum_c  term * gate_channel[n, c]
// from which the caller forms da_c = gamma*sigmoid'(a_c)*channel_sum,
// dgamma = sum_n sigmoid(a_c)*channel_sum and da_s = sigmoid'(a_s)*spatial_sum.
template <typename acc_t>
DA2_HOST_DEVICE acc_t attention_grad_term(Mode mode, acc_t grad_output, acc_t input) {
  return mode == Mode::Add ? grad_output : grad_output * input;
}

// The whole input gradient at one element: the direct term plus the three
// descriptor paths (channel mean, spatial mean, spatial max at its argmax).
// grad_channel_mean is dL/dd_c already divided by H*W, grad_spatial_mean is
// dL/dd_mean already divided by C, grad_spatial_max is dL/dd_max.
template <typename acc_t>
DA2_HOST_DEVICE acc_t input_grad(Mode mode, acc_t grad_output, acc_t gate_channel, acc_t gate_spatial,
                                 acc_t grad_channel_mean, acc_t grad_spatial_mean, bool is_argmax,
                                 acc_t grad_spatial_max) {
  const acc_t max_share = is_argmax ? grad_spatial_max : acc_t(0);
  return grad_output * direct_input_scale(mode, gate_channel, gate_spatial) + grad_channel_mean +
         grad_spatial_mean + max_share;
}

// The same for rank k, given the element's attention (rank_attention; unused in mode add).
template <typename acc_t>
DA2_HOST_DEVICE acc_t input_grad_of_attention(Mode mode, acc_t grad_output, acc_t attention, acc_t grad_channel_mean,
                                              acc_t grad_spatial_mean, bool is_argmax, acc_t grad_spatial_max) {
  const acc_t max_share = is_argmax ? grad_spatial_max : acc_t(0);
  return grad_output * direct_scale_of_attention(mode, attention) + grad_channel_mean + grad_spatial_mean +
         max_share;
}

// The small branch's per-element maths (the gates and their derivatives), for the
// kernels that run the branch themselves (cpu/attention_branch_loops.h).
template <typename acc_t>
DA2_HOST_DEVICE acc_t sigmoid(acc_t x) {
#if defined(__CUDACC__)
  return acc_t(1) / (acc_t(1) + exp(-x));
#else
  return acc_t(1) / (acc_t(1) + std::exp(-x));
#endif
}

// sigmoid'(a) from s = sigmoid(a).
template <typename acc_t>
DA2_HOST_DEVICE acc_t sigmoid_grad_from_output(acc_t s) {
  return s * (acc_t(1) - s);
}

template <typename acc_t>
DA2_HOST_DEVICE bool is_nan(acc_t v) {
  return v != v;
}

// Running channel max over channels visited in increasing order: a strictly
// larger value wins (so the first of equal maxima is kept, as torch.max does on
// the CPU), and the first NaN wins and stays (NaN propagates, as in torch.max).
// Bitwise, not short-circuit, operators: no branch, so the CPU loop vectorises.
template <typename acc_t>
DA2_HOST_DEVICE bool replaces_running_max(acc_t candidate, acc_t running_max) {
  const int larger = candidate > running_max;
  const int nan_over_number = static_cast<int>(is_nan(candidate)) & static_cast<int>(!is_nan(running_max));
  return (larger | nan_over_number) != 0;
}

// Merge of two partial maxima whose channel ranges interleave (CUDA warps, CPU
// tiles): the same order as above, ties broken by the lower channel index, so
// that any split of the channels gives the same answer as one ascending pass.
template <typename acc_t>
DA2_HOST_DEVICE bool replaces_partial_max(acc_t candidate, int candidate_index, acc_t current, int current_index) {
  if (is_nan(candidate)) {
    return !is_nan(current) || candidate_index < current_index;
  }
  if (is_nan(current)) {
    return false;
  }
  return candidate > current || (candidate == current && candidate_index < current_index);
}

}  // namespace math
}  // namespace da2ext
