// The innermost CPU loops of the residual attention adaptor: one task's worth
// of work (a tile of positions of one image, or one channel plane), on raw
// pointers. They are compiled apart from the drivers (residual_attention_kernel.cpp,
// which splits the work with at::parallel_for) so that on x86-64 each can be
// built twice, baseline and AVX2, and picked at load time (see the .cpp).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

#include "../residual_attention_math.h"

namespace da2ext {
namespace ops {
namespace cpu {

// Longest tile of positions a dual-reduction task takes. Each channel's row
// segment of a tile is a new memory stream, so segments should be long for the
// prefetcher; the per-position state (kMaxTile * (2 acc + 1 int32) bytes) stays
// in L1/L2.
constexpr int64_t kMaxTile = 2048;

#define DA2EXT_DECLARE_CPU_LOOPS(scalar_t, acc_t)                                                                  \
  /* Pools positions [0, len) of one image (`tile` points at channel 0): writes the */                           \
  /* partial row sums over the tile for every channel and the per-position mean, max */                          \
  /* and argmax over channels. len <= kMaxTile. */                                                                \
  void pool_tile(const scalar_t* tile, int64_t C, int64_t HW, int64_t len, acc_t* row_sums, scalar_t* mean_out,   \
                 scalar_t* max_out, int32_t* argmax_out);                                                         \
  /* Planes [begin, end) of the map (plane = n*C + c): pointers are the whole tensors'. */                      \
  void apply_planes(math::Mode mode, const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial,  \
                    int64_t C, int64_t HW, int64_t begin, int64_t end, scalar_t* output);                         \
  /* The backward reductions over one tile: row_sums[c] = sum_i t*gate_spatial[i], */                            \
  /* spatial_sum[i] = sum_c t*gate_channel[c]; `input` is read in mode Mul only. */                               \
  void reduce_tile(math::Mode mode, const scalar_t* grad_tile, const scalar_t* input_tile,                        \
                   const acc_t* gate_channel, const acc_t* gate_spatial, int64_t C, int64_t HW, int64_t len,      \
                   acc_t* row_sums, acc_t* spatial_sum);                                                          \
  /* grad_channel_mean [N, C] (times inv_hw gives each plane's share), grad_spatial [N, 2, HW]. */               \
  void input_grad_planes(math::Mode mode, const scalar_t* grad_output, const acc_t* gate_channel,                 \
                         const acc_t* grad_channel_mean, acc_t inv_hw, const acc_t* gate_spatial,                 \
                         const acc_t* grad_spatial, const int32_t* argmax, acc_t inv_c, int64_t C, int64_t HW,    \
                         int64_t begin, int64_t end, scalar_t* grad_input);                                       \
  /* channels_last: the same four passes over `len` pixels of one image whose C */                               \
  /* channels are adjacent in memory (`pixels` points at the first one's channel 0; */                         \
  /* gate_spatial and the per-position outputs at its position). */                                            \
  void pool_pixels(const scalar_t* pixels, int64_t C, int64_t len, acc_t* row_sums, scalar_t* mean_out,           \
                   scalar_t* max_out, int32_t* argmax_out);                                                       \
  void apply_pixels(math::Mode mode, const scalar_t* pixels, const acc_t* gate_channel, const acc_t* gate_spatial, \
                    int64_t C, int64_t len, scalar_t* output);                                                    \
  void reduce_pixels(math::Mode mode, const scalar_t* grad_pixels, const scalar_t* input_pixels,                  \
                     const acc_t* gate_channel, const acc_t* gate_spatial, int64_t C, int64_t len,                \
                     acc_t* row_sums, acc_t* spatial_sum);                                                        \
  /* channel_share[c]: dL/dd_c already divided by H*W, as input_grad_plane's. */                                 \
  void input_grad_pixels(math::Mode mode, const scalar_t* grad_pixels, const acc_t* gate_channel,                 \
                         const acc_t* channel_share, const acc_t* gate_spatial, const acc_t* grad_mean,           \
                         const acc_t* grad_max, const int32_t* argmax, acc_t inv_c, int64_t C, int64_t len,       \
                         scalar_t* grad_input);                                                                   \
  /* Rank k > 1 (gates [N, k, C] and [N, k, HW]; rank 1 takes the loops above): the */                           \
  /* same passes with the rank loop inside the element loop. The plane loops take */                            \
  /* planes [begin, end) and the whole tensors, as the rank-1 ones. Elsewhere gate_channel */                    \
  /* points at term 0 of channel 0, term j at + j*C; gate_spatial at term 0 of the first */                      \
  /* position, term j at + j*HW. The */                                                                          \
  /* reductions write row_sums[j*C + c] and spatial_sum[j*HW + i]; reduce_tile_rank's */                         \
  /* `scratch` holds (k + 1) * len values (a heap buffer of the caller's, off the stack). */                      \
  void apply_planes_rank(math::Mode mode, const scalar_t* input, const acc_t* gate_channel,                       \
                         const acc_t* gate_spatial, int k, int64_t C, int64_t HW, int64_t begin, int64_t end,     \
                         scalar_t* output);                                                                       \
  void reduce_tile_rank(math::Mode mode, const scalar_t* grad_tile, const scalar_t* input_tile,                   \
                        const acc_t* gate_channel, const acc_t* gate_spatial, int k, int64_t C, int64_t HW,       \
                        int64_t len, acc_t* scratch, acc_t* row_sums, acc_t* spatial_sum);                        \
  void input_grad_planes_rank(math::Mode mode, const scalar_t* grad_output, const acc_t* gate_channel,           \
                              const acc_t* grad_channel_mean, acc_t inv_hw, const acc_t* gate_spatial,            \
                              const acc_t* grad_spatial, const int32_t* argmax, acc_t inv_c, int k, int64_t C,    \
                              int64_t HW, int64_t begin, int64_t end, scalar_t* grad_input);                      \
  void apply_pixels_rank(math::Mode mode, const scalar_t* pixels, const acc_t* gate_channel,                      \
                         const acc_t* gate_spatial, int k, int64_t C, int64_t HW, int64_t len, scalar_t* output); \
  void reduce_pixels_rank(math::Mode mode, const scalar_t* grad_pixels, const scalar_t* input_pixels,             \
                          const acc_t* gate_channel, const acc_t* gate_spatial, int k, int64_t C, int64_t HW,     \
                          int64_t len, acc_t* row_sums, acc_t* spatial_sum);                                      \
  void input_grad_pixels_rank(math::Mode mode, const scalar_t* grad_pixels, const acc_t* gate_channel,            \
                              const acc_t* channel_share, const acc_t* gate_spatial, const acc_t* grad_mean,      \
                              const acc_t* grad_max, const int32_t* argmax, acc_t inv_c, int k, int64_t C,        \
                              int64_t HW, int64_t len, scalar_t* grad_input);

DA2EXT_DECLARE_CPU_LOOPS(float, float)
DA2EXT_DECLARE_CPU_LOOPS(double, double)
DA2EXT_DECLARE_CPU_LOOPS(c10::Half, float)

#undef DA2EXT_DECLARE_CPU_LOOPS

}  // namespace cpu
}  // namespace ops
}  // namespace da2ext
