// The adaptor's small branch as plain loops on the CPU (docs/design.md §2): the
// channel MLP, the 2 -> k spatial conv, the gates, and their backward, on the small
// tensors (O(N * (k*C + H*W)) numbers). For small sizes these loops cost less than
// the forty-odd ATen calls that compute the same (each an allocation and a trip
// through the dispatcher); residual_attention_composite.cpp picks them below a
// work bound and ATen (BLAS, oneDNN) above it.
//
// The loops are compiled apart (attention_branch_loops.cpp), cloned for AVX2 where the
// heavy passes' loops are (vectorization.h).
//
// Layouts, all contiguous: channel_mean [N, C]; spatial [N, 2, H, W] (channel
// mean, channel max); fc1 [hidden, C] and [hidden]; fc2 [k*C, hidden] and [k*C];
// the spatial conv [k, 2, K, K] (padding K/2) and [k]; gamma [k*C] (rank 1: [C]);
// hidden_pre [N, hidden]; channel_logits [N, k*C]; the gates [N, k*C] and
// [N, k, H*W]. One type T throughout (float or double): the small branch of a
// float32 map computes in float32, of a float64 map in float64, as the ATen path.
#pragma once

#include <cstdint>

#include "../attention_branch_shape.h"

namespace da2ext {
namespace ops {
namespace cpu {

#define DA2EXT_DECLARE_BRANCH_LOOPS(T)                                                                            \
  /* Forward: hidden_pre, channel_logits (a_c) and gate_spatial = sigmoid(a_s). The caller */                    \
  /* takes sigmoid(a_c) with ATen (vectorised exponentials) and forms gate_channel with */                       \
  /* channel_gates. */                                                                                            \
  void branch_forward(const BranchShape& s, const T* channel_mean, const T* spatial, const T* fc1_weight,         \
                      const T* fc1_bias, const T* fc2_weight, const T* fc2_bias, const T* spatial_weight,        \
                      const T* spatial_bias, T* hidden_pre, T* channel_logits, T* gate_spatial);                 \
  /* gate_spatial = sigmoid(conv([d_mean; d_max])) for every image (backward recomputes it). */                  \
  void spatial_gates(const BranchShape& s, const T* spatial, const T* spatial_weight, const T* spatial_bias,      \
                     T* gate_spatial);                                                                            \
  /* gate_channel = gamma * sigmoid(a_c), given sigmoid(a_c) [N, k*C]. */                                          \
  void channel_gates(const BranchShape& s, const T* channel_sigmoid, const T* gamma, T* gate_channel);           \
  /* Backward, from the attention sums (channel_sum [N, k*C], spatial_sum [N, k, H*W]), */                       \
  /* sigmoid(a_c) and the recomputed gate_spatial: every parameter gradient, and the */                          \
  /* descriptors' gradients (grad_channel_mean [N, C], grad_spatial [N, 2, H, W]). */                             \
  void branch_backward(const BranchShape& s, const T* channel_mean, const T* spatial, const T* hidden_pre,        \
                       const T* channel_sigmoid, const T* gate_spatial, const T* channel_sum,                     \
                       const T* spatial_sum, const T* fc1_weight, const T* fc2_weight, const T* spatial_weight,   \
                       const T* gamma, T* grad_fc1_weight, T* grad_fc1_bias, T* grad_fc2_weight,                  \
                       T* grad_fc2_bias, T* grad_spatial_weight, T* grad_spatial_bias, T* grad_gamma,             \
                       T* grad_channel_mean, T* grad_spatial);

DA2EXT_DECLARE_BRANCH_LOOPS(float)
DA2EXT_DECLARE_BRANCH_LOOPS(double)

#undef DA2EXT_DECLARE_BRANCH_LOOPS

}  // namespace cpu
}  // namespace ops
}  // namespace da2ext
