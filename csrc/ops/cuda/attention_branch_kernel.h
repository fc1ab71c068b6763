// Launchers of the CUDA kernels of the adaptor's small branch (the channel MLP, the
// 2 -> k spatial conv, the gates, and their backward), written so that one adaptor
// forward + backward is eight launches (docs/design.md §2, "The adaptor in one
// dispatch"):
//
//   forward:  descriptor_pool_partials, attention_branch_forward, attention_apply
//   backward: attention_branch_gates, attention_backward_reduce_partials,
//             attention_branch_backward, attention_branch_parameter_grads,
//             attention_input_grad
//
// The two dual reductions stop at their per-tile partial row sums; the branch
// kernels that read them add them up in the order sum_row_partials does, so the
// descriptors and the channel sums are the op-by-op path's bits.
//
// How the branch kernels tile (sm_53: 48 KB of shared memory and 64K registers a
// block, 256 threads here): a grid of N x (1 + T) blocks. Block (n, 0) does image
// n's MLP: a warp per hidden unit or logit, its lanes over the dot product's terms
// (coalesced reads of fc1's and fc2's rows), the hidden layer in shared memory
// (hidden * sizeof(acc) bytes: 512 B for C = 2048 at reduction 16; at most
// branch_max_hidden()). Blocks (n, 1..T) do the spatial conv, a thread per position
// (T <= 1024 tiles of 256 positions, striding beyond: 112 x 112 is 49 tiles),
// reading the K x K taps of the two descriptor maps from global memory (L1/L2). No
// atomics: every sum over images (the parameters' gradients) is one thread's or one
// block's, in a fixed order, so results are deterministic.
//
// No torch header, as residual_attention_kernel.h. scalar_t is __half, float or
// double; acc_t is float (double for double). Layouts, all contiguous: channel_mean
// [N, C]; spatial [N, 2, H, W]; fc1 [hidden, C] and [hidden]; fc2 [k*C, hidden] and
// [k*C]; the conv [k, 2, K, K] (padding K/2) and [k]; gamma [k*C]; hidden_pre
// [N, hidden]; channel_logits [N, k*C]; gate_channel and channel sums [N, k*C];
// gate_spatial and spatial sums [N, k, H*W].
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../attention_branch_shape.h"

namespace da2ext {
namespace cuda {

using BranchShape = ops::BranchShape;

// The largest hidden layer the branch kernels take (held in one block's shared memory).
int64_t branch_max_hidden(bool double_accumulation);

// Tiles of the dual reductions' partial row sums (row_partial_count / (N * rows)).
int64_t dual_reduction_tiles(int64_t HW);

// descriptor_pool's first pass alone: spatial, argmax and the partial row sums of the channels.
template <typename scalar_t, typename acc_t>
cudaError_t descriptor_pool_partials(const scalar_t* input, int64_t N, int64_t C, int64_t HW, scalar_t* spatial,
                                     int32_t* argmax, acc_t* row_partial, cudaStream_t stream);

// attention_backward_reduce's first pass alone: spatial_sum and the partial row sums of channel_sum.
template <typename scalar_t, typename acc_t>
cudaError_t attention_backward_reduce_partials(const scalar_t* grad_output, const scalar_t* input,
                                               const acc_t* gate_channel, const acc_t* gate_spatial, int64_t N,
                                               int64_t C, int64_t HW, int rank, bool multiplicative,
                                               acc_t* spatial_sum, acc_t* row_partial, cudaStream_t stream);

// Forward, from the pool's partial sums: channel_mean, hidden_pre and channel_logits (kept for
// backward, in scalar_t), gate_channel = gamma * sigmoid(a_c) and gate_spatial = sigmoid(a_s).
template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_forward(const BranchShape& s, const acc_t* mean_partial, const scalar_t* spatial,
                                     const scalar_t* fc1_weight, const scalar_t* fc1_bias,
                                     const scalar_t* fc2_weight, const scalar_t* fc2_bias,
                                     const scalar_t* spatial_weight, const scalar_t* spatial_bias,
                                     const scalar_t* gamma, scalar_t* channel_mean, scalar_t* hidden_pre,
                                     scalar_t* channel_logits, acc_t* gate_channel, acc_t* gate_spatial,
                                     cudaStream_t stream);

// Backward's gates, from what forward kept: gate_channel from channel_logits, gate_spatial
// from the descriptors (the spatial logits are not kept).
template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_gates(const BranchShape& s, const scalar_t* channel_logits, const scalar_t* spatial,
                                   const scalar_t* spatial_weight, const scalar_t* spatial_bias,
                                   const scalar_t* gamma, acc_t* gate_channel, acc_t* gate_spatial,
                                   cudaStream_t stream);

// Backward per image: channel_sum from the reduction's partials, the logits' and the hidden
// layer's gradients (kept for the parameter sums), and the descriptors' gradients
// grad_channel_mean [N, C] and grad_spatial [N, 2, H*W].
template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_backward(const BranchShape& s, const acc_t* sum_partial, const acc_t* spatial_sum,
                                      const acc_t* gate_spatial, const scalar_t* channel_logits,
                                      const scalar_t* hidden_pre, const scalar_t* fc1_weight,
                                      const scalar_t* fc2_weight, const scalar_t* spatial_weight,
                                      const scalar_t* gamma, acc_t* channel_sum, acc_t* grad_channel_logits,
                                      acc_t* grad_hidden, acc_t* grad_channel_mean, acc_t* grad_spatial,
                                      cudaStream_t stream);

// The parameters' gradients, each a sum over the images in a fixed order, in scalar_t.
template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_parameter_grads(const BranchShape& s, const acc_t* channel_sum,
                                             const acc_t* grad_channel_logits, const acc_t* grad_hidden,
                                             const acc_t* spatial_sum, const acc_t* gate_spatial,
                                             const scalar_t* channel_mean, const scalar_t* spatial,
                                             const scalar_t* hidden_pre, const scalar_t* channel_logits,
                                             scalar_t* grad_fc1_weight, scalar_t* grad_fc1_bias,
                                             scalar_t* grad_fc2_weight, scalar_t* grad_fc2_bias,
                                             scalar_t* grad_spatial_weight, scalar_t* grad_spatial_bias,
                                             scalar_t* grad_gamma, cudaStream_t stream);

}  // namespace cuda
}  // namespace da2ext
