// Torch-side declarations shared by the CPU and CUDA implementations of the
// residual attention adaptor ops: argument checks (every error names the
// argument and what was expected) and output allocation, so both backends
// accept and produce exactly the same tensors.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "attention_branch_shape.h"

namespace da2ext {
namespace ops {

// float for float16/float32 inputs, double for float64: the dtype of the gates,
// the attention reductions and the descriptor-path gradients.
at::ScalarType accumulate_dtype(at::ScalarType input_dtype);

// Sizes of a checked N x C x H x W input, with HW = H * W. `channels_last`: its
// memory is N x H x W x C (torch.channels_last) rather than N x C x H x W.
struct FeatureShape {
  int64_t N, C, H, W, HW;
  bool channels_last;
};

// `name` must be a dense float16/float32/float64 4-D tensor with C, H, W >= 1
// and C, H*W within 32-bit range (argmax is stored as int32): contiguous (NCHW),
// or, where `allow_channels_last` (the CPU kernels), channels_last. A tensor that
// is both (C == 1, or H == W == 1) has one memory order for both and is read as NCHW.
FeatureShape check_feature_map(const at::Tensor& t, const char* op, const char* name,
                               bool allow_channels_last = false);

// `t` must have the memory order `s` describes (the big operands of one op share it).
void check_same_memory_order(const at::Tensor& t, const FeatureShape& s, const char* op, const char* name);

// `t` must be on `reference`'s device, of `dtype` and `numel` elements, and
// contiguous; or, given `same_as` (the feature map's shape), of `reference`'s
// sizes and in `same_as`'s memory order.
void check_companion(const at::Tensor& t, const at::Tensor& reference, at::ScalarType dtype, int64_t numel,
                     const char* op, const char* name, const char* expected_shape,
                     const FeatureShape* same_as = nullptr);

// descriptor_pool: (channel_mean [N, C], spatial [N, 2, H, W] = (channel mean,
// channel max), argmax [N, H, W] int32), all uninitialised.
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_pool_outputs(const at::Tensor& input,
                                                                     const FeatureShape& s);

// The rank of the attention the gates describe: k terms, given either in the
// rank-1 form (gate_channel [N, C], gate_spatial [N, H, W]; k == 1) or stacked
// (gate_channel [N, k, C], gate_spatial [N, k, H, W]; 1 <= k <= kMaxRank).
// Memory is [n][j][c] and [n][j][hw] either way.
struct GateRank {
  int64_t k;
  bool stacked;
};

// Checks of the attention ops' small operands against the feature map; returns their rank.
GateRank check_gates(const at::Tensor& feature, const FeatureShape& s, const at::Tensor& gate_channel,
                     const at::Tensor& gate_spatial, const char* op);

// attention_backward_reduce: (channel_sum, spatial_sum) shaped like the gates,
// [N, C] and [N, H, W] in the rank-1 form, [N, k, C] and [N, k, H, W] stacked;
// in the accumulation dtype, uninitialised.
std::tuple<at::Tensor, at::Tensor> allocate_reduce_outputs(const at::Tensor& feature, const FeatureShape& s,
                                                           const GateRank& rank);
void check_descriptor_grads(const at::Tensor& feature, const FeatureShape& s, const at::Tensor& grad_channel_mean,
                            const at::Tensor& grad_spatial, const at::Tensor& argmax, const char* op);

// The small branch's sizes: the map's, fc1_weight's hidden units, spatial_weight's rank and K.
BranchShape branch_shape(const FeatureShape& map, const at::Tensor& fc1_weight, const at::Tensor& spatial_weight);

// The adaptor's parameters against the map they act on (residual_attention_forward and
// _backward, CPU and CUDA): `t` must have `input`'s dtype and device.
void check_parameter(const at::Tensor& input, const at::Tensor& t, const char* op);

// The small branch's weights and gamma against a map of C channels (input, or the gradient
// of the output in backward): shapes ([hidden, C], [k*C, hidden], [k, 2, K, K] with K odd,
// [k], [C] or [k, C]), dtype and device.
void check_branch_weights(const at::Tensor& input, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                          const at::Tensor& spatial_weight, const at::Tensor& spatial_bias, const at::Tensor& gamma,
                          const char* op);

// check_branch_weights and the two MLP biases.
void check_branch(const at::Tensor& input, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                  const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, const at::Tensor& spatial_weight,
                  const at::Tensor& spatial_bias, const at::Tensor& gamma, const char* op);

// What backward gets from forward (residual_attention_forward's outputs: channel_mean,
// spatial, argmax, hidden_pre, channel_logits), checked against the gradient of y before
// any of it is read through a pointer.
void check_saved(const at::Tensor& grad_output, const FeatureShape& s, const at::Tensor& channel_mean,
                 const at::Tensor& spatial, const at::Tensor& argmax, const at::Tensor& hidden_pre,
                 const at::Tensor& channel_logits, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                 const char* op);

}  // namespace ops
}  // namespace da2ext
