// CPU implementation of the residual attention adaptor ops (docs/design.md §2):
// argument checks, allocation and the split of the work over threads with
// at::parallel_for. Each op reads the big tensor once:
//  - the two "dual" reductions (descriptor pooling, backward reduction) need a
//    sum along H*W per channel and a reduction across channels per position; a
//    task owns one image and a tile of positions, walks all channels over it,
//    and writes one partial row sum per channel and tile; the partials are then
//    summed in a fixed order, so no two tasks write the same place and results
//    do not depend on the number of threads;
//  - the elementwise passes (apply, input gradient) go plane by plane.
// A channels_last feature map (N x H x W x C in memory) takes the same tasks
// over runs of pixels whose channels are adjacent: the dual reductions tile
// positions as above, the elementwise passes split the N*H*W pixels into runs
// that stay within one image. A 1x1 map, whose NCHW memory is the same, takes
// these loops too.
// Rank k > 1 (gates [N, k, C] and [N, k, H, W]) takes the same tasks and the
// *_rank loops, with the rank loop inside the element loop; k == 1 runs the
// rank-1 loops unchanged.
// The loops themselves are in residual_attention_loops.{h,cpp}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../memory_order.h"
#include "../residual_attention.h"
#include "../residual_attention_math.h"
#include "residual_attention_kernel.h"
#include "residual_attention_loops.h"

namespace da2ext {
namespace ops {
namespace {

using cpu::mode_of;
using math::Mode;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// H*W split into equal tiles of at most cpu::kMaxTile positions.
struct Tiling {
  int64_t tiles, tile;
  explicit Tiling(int64_t HW) : tiles(ceil_div(HW, cpu::kMaxTile)), tile(ceil_div(HW, tiles)) {}
};

// Values a task should take at least: below this, waking a second thread costs more
// than the pass (on small maps the whole pass is a few microseconds).
constexpr int64_t kTaskValues = 32768;

// Elementwise passes: enough planes per task to amortise scheduling on small maps.
int64_t plane_grain(int64_t HW) {
  return std::max<int64_t>(1, kTaskValues / HW);
}

// Whether a pass runs the channels_last loops (a run of pixels, each pixel's C channels
// one vectorised loop): for channels_last maps, and for 1x1 maps, whose NCHW memory is
// the same (a plane of one value per channel would be C calls of one element).
bool by_pixel(const FeatureShape& s) {
  return s.channels_last || s.HW == 1;
}

// row_out[n, c] = the sum of image n's tile partials of row c, in tile order (divided by
// mean_count when it is > 0). A task takes whole images: no division per element.
template <typename acc_t, typename out_t>
void sum_row_partials(const acc_t* partial, int64_t N, int64_t tiles, int64_t C, int64_t mean_count,
                      out_t* out) {
  if (tiles == 1) {  // maps of at most kMaxTile positions: one partial per row, one vectorised pass
    const acc_t count = static_cast<acc_t>(mean_count);
    const acc_t* rows = partial;
    if (mean_count > 0) {
      for (int64_t i = 0; i < N * C; ++i) {
        out[i] = static_cast<out_t>((acc_t(0) + rows[i]) / count);
      }
    } else {
      for (int64_t i = 0; i < N * C; ++i) {
        out[i] = static_cast<out_t>(acc_t(0) + rows[i]);
      }
    }
    return;
  }
  const int64_t image_grain = std::max<int64_t>(1, kTaskValues / (C * tiles));
  at::parallel_for(0, N, image_grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* first = &partial[n * tiles * C];
      out_t* row_out = out + n * C;
      for (int64_t c = 0; c < C; ++c) {
        acc_t sum = 0;
        for (int64_t t = 0; t < tiles; ++t) {
          sum += first[t * C + c];
        }
        row_out[c] = static_cast<out_t>(mean_count > 0 ? sum / static_cast<acc_t>(mean_count) : sum);
      }
    }
  });
}

// The skeleton of both dual reductions: body(n, hw0, len, row_sums) handles
// positions [hw0, hw0 + len) of image n and writes that tile's partial row sum
// of every channel to row_sums[0..C); the partials are then summed in a fixed
// order into row_out (divided by mean_count when it is > 0).
// `rows` row sums per image (C, or k*C for the rank-k backward reduction).
template <typename acc_t, typename out_t, typename Body>
void dual_reduction(const FeatureShape& s, int64_t mean_count, out_t* row_out, const Body& body, int64_t rows) {
  const Tiling tiling(s.HW);
  const std::unique_ptr<acc_t[]> row_partial = cpu::uninitialized_buffer<acc_t>(s.N * tiling.tiles * rows);
  // Tiles of at least kTaskValues values a task: the tiles of a small map run on one thread
  // (at 8x256x2x2 a second thread cost more to wake than the pass). The partials are summed
  // in tile order either way: the same bits on any number of threads.
  const int64_t tile_grain = std::max<int64_t>(1, kTaskValues / (rows * tiling.tile));
  at::parallel_for(0, s.N * tiling.tiles, tile_grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiling.tiles, hw0 = (task % tiling.tiles) * tiling.tile;
      body(n, hw0, std::min(tiling.tile, s.HW - hw0), &row_partial[task * rows]);
    }
  });
  sum_row_partials(row_partial.get(), s.N, tiling.tiles, rows, mean_count, row_out);
}

template <typename acc_t, typename out_t, typename Body>
void dual_reduction(const FeatureShape& s, int64_t mean_count, out_t* row_out, const Body& body) {
  dual_reduction<acc_t>(s, mean_count, row_out, body, s.C);
}

// channels_last elementwise passes: body(n, pixel, len) for runs of pixels
// [pixel, pixel + len) (absolute indices n*HW + position) within image n.
template <typename Body>
void for_each_pixel_run(const FeatureShape& s, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kTaskValues / s.C);
  at::parallel_for(0, s.N * s.HW, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t n = begin / s.HW;
      const int64_t stop = std::min(end, (n + 1) * s.HW);
      body(n, begin, stop - begin);
      begin = stop;
    }
  });
}

template <typename scalar_t>
void descriptor_pool_kernel(const scalar_t* input, const FeatureShape& s, scalar_t* channel_mean, scalar_t* spatial,
                            int32_t* argmax) {
  typedef typename math::AccumulateType<scalar_t>::type acc_t;
  const int64_t C = s.C, HW = s.HW;
  dual_reduction<acc_t>(s, /*mean_count=*/HW, channel_mean, [&](int64_t n, int64_t hw0, int64_t len, acc_t* rows) {
    scalar_t* mean_out = spatial + n * 2 * HW + hw0;
    if (by_pixel(s)) {
      cpu::pool_pixels(input + (n * HW + hw0) * C, C, len, rows, mean_out, mean_out + HW, argmax + n * HW + hw0);
    } else {
      cpu::pool_tile(input + n * C * HW + hw0, C, HW, len, rows, mean_out, mean_out + HW, argmax + n * HW + hw0);
    }
  });
}

// Rank k > 1: the same split of the work, the rank loops of residual_attention_loops.h.
template <typename scalar_t, typename acc_t>
void attention_apply_rank_kernel(Mode mode, const scalar_t* input, const acc_t* gate_channel,
                                 const acc_t* gate_spatial, int k, const FeatureShape& s, scalar_t* output) {
  const int64_t C = s.C, HW = s.HW;
  if (by_pixel(s)) {
    for_each_pixel_run(s, [&](int64_t n, int64_t pixel, int64_t len) {
      cpu::apply_pixels_rank(mode, input + pixel * C, gate_channel + n * k * C,
                             gate_spatial + n * k * HW + (pixel - n * HW), k, C, HW, len, output + pixel * C);
    });
    return;
  }
  at::parallel_for(0, s.N * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
    cpu::apply_planes_rank(mode, input, gate_channel, gate_spatial, k, C, HW, begin, end, output);
  });
}

template <typename scalar_t, typename acc_t>
void attention_apply_kernel(Mode mode, const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial,
                            int k, const FeatureShape& s, scalar_t* output) {
  if (k > 1) {
    attention_apply_rank_kernel(mode, input, gate_channel, gate_spatial, k, s, output);
    return;
  }
  const int64_t C = s.C, HW = s.HW;
  if (by_pixel(s)) {
    for_each_pixel_run(s, [&](int64_t n, int64_t pixel, int64_t len) {
      cpu::apply_pixels(mode, input + pixel * C, gate_channel + n * C, gate_spatial + pixel, C, len,
                        output + pixel * C);
    });
    return;
  }
  at::parallel_for(0, s.N * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
    cpu::apply_planes(mode, input, gate_channel, gate_spatial, C, HW, begin, end, output);
  });
}

// Rank k > 1: each task writes k*C partial row sums ([j][c]) and the k spatial
// sums of its positions; the NCHW tiles read the rows through a per-task heap
// buffer of k+1 rows of the tile (off the stack, whatever k).
template <typename scalar_t, typename acc_t>
void attention_backward_reduce_rank_kernel(Mode mode, const scalar_t* grad_output, const scalar_t* input,
                                           const acc_t* gate_channel, const acc_t* gate_spatial, int k,
                                           const FeatureShape& s, acc_t* channel_sum, acc_t* spatial_sum) {
  const int64_t C = s.C, HW = s.HW;
  const int64_t scratch_size = (k + 1) * Tiling(HW).tile;
  dual_reduction<acc_t>(
      s, /*mean_count=*/0, channel_sum,
      [&](int64_t n, int64_t hw0, int64_t len, acc_t* rows) {
        const acc_t* gc = gate_channel + n * k * C;
        const acc_t* gs = gate_spatial + n * k * HW + hw0;
        acc_t* ss = spatial_sum + n * k * HW + hw0;
        if (by_pixel(s)) {
          const int64_t offset = (n * HW + hw0) * C;
          cpu::reduce_pixels_rank(mode, grad_output + offset, mode == Mode::Mul ? input + offset : nullptr, gc, gs, k,
                                  C, HW, len, rows, ss);
          return;
        }
        const std::unique_ptr<acc_t[]> scratch = cpu::uninitialized_buffer<acc_t>(scratch_size);
        const int64_t offset = n * C * HW + hw0;
        cpu::reduce_tile_rank(mode, grad_output + offset, mode == Mode::Mul ? input + offset : nullptr, gc, gs, k, C,
                              HW, len, scratch.get(), rows, ss);
      },
      k * C);
}

template <typename scalar_t, typename acc_t>
void attention_backward_reduce_kernel(Mode mode, const scalar_t* grad_output, const scalar_t* input,
                                      const acc_t* gate_channel, const acc_t* gate_spatial, int k,
                                      const FeatureShape& s, acc_t* channel_sum, acc_t* spatial_sum) {
  if (k > 1) {
    attention_backward_reduce_rank_kernel(mode, grad_output, input, gate_channel, gate_spatial, k, s, channel_sum,
                                          spatial_sum);
    return;
  }
  const int64_t C = s.C, HW = s.HW;
  dual_reduction<acc_t>(s, /*mean_count=*/0, channel_sum, [&](int64_t n, int64_t hw0, int64_t len, acc_t* rows) {
    if (by_pixel(s)) {
      const int64_t offset = (n * HW + hw0) * C;
      cpu::reduce_pixels(mode, grad_output + offset, mode == Mode::Mul ? input + offset : nullptr, gate_channel + n * C,
                         gate_spatial + n * HW + hw0, C, len, rows, spatial_sum + n * HW + hw0);
      return;
    }
    const int64_t offset = n * C * HW + hw0;
    cpu::reduce_tile(mode, grad_output + offset, mode == Mode::Mul ? input + offset : nullptr, gate_channel + n * C,
                     gate_spatial + n * HW + hw0, C, HW, len, rows, spatial_sum + n * HW + hw0);
  });
}

// channels_last input gradient: dL/dd_c / (H*W) for every (n, c), the same product the
// NCHW loop forms once per plane.
template <typename acc_t>
std::vector<acc_t> channel_shares(const acc_t* grad_channel_mean, int64_t count, acc_t inv_hw) {
  std::vector<acc_t> shares(count);
  for (int64_t i = 0; i < count; ++i) {
    shares[i] = grad_channel_mean[i] * inv_hw;
  }
  return shares;
}

template <typename scalar_t, typename acc_t>
void attention_input_grad_rank_kernel(Mode mode, const scalar_t* grad_output, const acc_t* gate_channel,
                                      const acc_t* gate_spatial, const acc_t* grad_channel_mean,
                                      const acc_t* grad_spatial, const int32_t* argmax, int k, const FeatureShape& s,
                                      scalar_t* grad_input) {
  const int64_t C = s.C, HW = s.HW;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW), inv_c = acc_t(1) / static_cast<acc_t>(C);
  if (by_pixel(s)) {
    const std::vector<acc_t> channel_share = channel_shares(grad_channel_mean, s.N * C, inv_hw);
    for_each_pixel_run(s, [&](int64_t n, int64_t pixel, int64_t len) {
      const int64_t position = pixel - n * HW;
      const acc_t* grad_mean = grad_spatial + n * 2 * HW + position;
      cpu::input_grad_pixels_rank(mode, grad_output + pixel * C, gate_channel + n * k * C, &channel_share[n * C],
                                  gate_spatial + n * k * HW + position, grad_mean, grad_mean + HW, argmax + pixel,
                                  inv_c, k, C, HW, len, grad_input + pixel * C);
    });
    return;
  }
  at::parallel_for(0, s.N * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
    cpu::input_grad_planes_rank(mode, grad_output, gate_channel, grad_channel_mean, inv_hw, gate_spatial,
                                grad_spatial, argmax, inv_c, k, C, HW, begin, end, grad_input);
  });
}

template <typename scalar_t, typename acc_t>
void attention_input_grad_kernel(Mode mode, const scalar_t* grad_output, const acc_t* gate_channel,
                                 const acc_t* gate_spatial, const acc_t* grad_channel_mean, const acc_t* grad_spatial,
                                 const int32_t* argmax, int k, const FeatureShape& s, scalar_t* grad_input) {
  if (k > 1) {
    attention_input_grad_rank_kernel(mode, grad_output, gate_channel, gate_spatial, grad_channel_mean, grad_spatial,
                                     argmax, k, s, grad_input);
    return;
  }
  const int64_t C = s.C, HW = s.HW;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW), inv_c = acc_t(1) / static_cast<acc_t>(C);
  if (by_pixel(s)) {
    const std::vector<acc_t> channel_share = channel_shares(grad_channel_mean, s.N * C, inv_hw);
    for_each_pixel_run(s, [&](int64_t n, int64_t pixel, int64_t len) {
      const int64_t position = pixel - n * HW;
      const acc_t* grad_mean = grad_spatial + n * 2 * HW + position;
      cpu::input_grad_pixels(mode, grad_output + pixel * C, gate_channel + n * C, &channel_share[n * C],
                             gate_spatial + pixel, grad_mean, grad_mean + HW, argmax + pixel, inv_c, C, len,
                             grad_input + pixel * C);
    });
    return;
  }
  at::parallel_for(0, s.N * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
    cpu::input_grad_planes(mode, grad_output, gate_channel, grad_channel_mean, inv_hw, gate_spatial, grad_spatial,
                           argmax, inv_c, C, HW, begin, end, grad_input);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> descriptor_pool_cpu(const at::Tensor& input) {
  const FeatureShape s = check_feature_map(input, "descriptor_pool", "input", /*allow_channels_last=*/true);
  at::Tensor channel_mean, spatial, argmax;
  std::tie(channel_mean, spatial, argmax) = allocate_pool_outputs(input, s);
  if (s.N == 0) {
    return std::make_tuple(channel_mean, spatial, argmax);
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "descriptor_pool_cpu", [&] {
    descriptor_pool_kernel<scalar_t>(input.data_ptr<scalar_t>(), s, channel_mean.data_ptr<scalar_t>(),
                                     spatial.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>());
  });
  return std::make_tuple(channel_mean, spatial, argmax);
}

at::Tensor attention_apply_cpu(const at::Tensor& input, const at::Tensor& gate_channel,
                               const at::Tensor& gate_spatial, bool multiplicative) {
  const FeatureShape s = check_feature_map(input, "attention_apply", "input", /*allow_channels_last=*/true);
  const GateRank rank = check_gates(input, s, gate_channel, gate_spatial, "attention_apply");
  at::Tensor output = empty_in_memory_order(input);  // keeps the feature map's order
  if (s.N == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "attention_apply_cpu", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    attention_apply_kernel(mode_of(multiplicative), input.data_ptr<scalar_t>(), gate_channel.data_ptr<acc_t>(),
                           gate_spatial.data_ptr<acc_t>(), static_cast<int>(rank.k), s,
                           output.data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> attention_backward_reduce_cpu(const at::Tensor& grad_output,
                                                                 const c10::optional<at::Tensor>& input,
                                                                 const at::Tensor& gate_channel,
                                                                 const at::Tensor& gate_spatial,
                                                                 bool multiplicative) {
  const char* op = "attention_backward_reduce";
  const FeatureShape s = check_feature_map(grad_output, op, "grad_output", /*allow_channels_last=*/true);
  const GateRank rank = check_gates(grad_output, s, gate_channel, gate_spatial, op);
  if (multiplicative) {
    TORCH_CHECK(input.has_value() && input->defined(), op, ": input is required in mode \"mul\"");
    check_companion(*input, grad_output, grad_output.scalar_type(), grad_output.numel(), op, "input",
                    "[N, C, H, W] like grad_output", &s);
  }
  at::Tensor channel_sum, spatial_sum;
  std::tie(channel_sum, spatial_sum) = allocate_reduce_outputs(grad_output, s, rank);
  if (s.N == 0) {
    return std::make_tuple(channel_sum, spatial_sum);
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "attention_backward_reduce_cpu", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    const scalar_t* in = multiplicative ? input->data_ptr<scalar_t>() : nullptr;
    attention_backward_reduce_kernel(mode_of(multiplicative), grad_output.data_ptr<scalar_t>(), in,
                                     gate_channel.data_ptr<acc_t>(), gate_spatial.data_ptr<acc_t>(),
                                     static_cast<int>(rank.k), s, channel_sum.data_ptr<acc_t>(),
                                     spatial_sum.data_ptr<acc_t>());
  });
  return std::make_tuple(channel_sum, spatial_sum);
}

at::Tensor attention_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& gate_channel,
                                    const at::Tensor& gate_spatial, const at::Tensor& grad_channel_mean,
                                    const at::Tensor& grad_spatial, const at::Tensor& argmax, bool multiplicative) {
  const char* op = "attention_input_grad";
  const FeatureShape s = check_feature_map(grad_output, op, "grad_output", /*allow_channels_last=*/true);
  const GateRank rank = check_gates(grad_output, s, gate_channel, gate_spatial, op);
  check_descriptor_grads(grad_output, s, grad_channel_mean, grad_spatial, argmax, op);
  at::Tensor grad_input = empty_in_memory_order(grad_output);
  if (s.N == 0) {
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "attention_input_grad_cpu", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    attention_input_grad_kernel(mode_of(multiplicative), grad_output.data_ptr<scalar_t>(),
                                gate_channel.data_ptr<acc_t>(), gate_spatial.data_ptr<acc_t>(),
                                grad_channel_mean.data_ptr<acc_t>(), grad_spatial.data_ptr<acc_t>(),
                                argmax.data_ptr<int32_t>(), static_cast<int>(rank.k), s,
                                grad_input.data_ptr<scalar_t>());
  });
  return grad_input;
}

}  // namespace

namespace cpu {

template <typename scalar_t>
void descriptor_pool(const scalar_t* input, const FeatureShape& s, scalar_t* channel_mean, scalar_t* spatial,
                     int32_t* argmax) {
  descriptor_pool_kernel(input, s, channel_mean, spatial, argmax);
}

template <typename scalar_t, typename acc_t>
void attention_apply(Mode mode, const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial, int k,
                     const FeatureShape& s, scalar_t* output) {
  attention_apply_kernel(mode, input, gate_channel, gate_spatial, k, s, output);
}

template <typename scalar_t, typename acc_t>
void attention_backward_reduce(Mode mode, const scalar_t* grad_output, const scalar_t* input,
                               const acc_t* gate_channel, const acc_t* gate_spatial, int k, const FeatureShape& s,
                               acc_t* channel_sum, acc_t* spatial_sum) {
  attention_backward_reduce_kernel(mode, grad_output, input, gate_channel, gate_spatial, k, s, channel_sum,
                                   spatial_sum);
}

template <typename scalar_t, typename acc_t>
void attention_input_grad(Mode mode, const scalar_t* grad_output, const acc_t* gate_channel,
                          const acc_t* gate_spatial, const acc_t* grad_channel_mean, const acc_t* grad_spatial,
                          const int32_t* argmax, int k, const FeatureShape& s, scalar_t* grad_input) {
  attention_input_grad_kernel(mode, grad_output, gate_channel, gate_spatial, grad_channel_mean, grad_spatial, argmax,
                              k, s, grad_input);
}

#define DA2EXT_INSTANTIATE_CPU_DRIVERS(T)                                                                         \
  template void descriptor_pool<T>(const T*, const FeatureShape&, T*, T*, int32_t*);                              \
  template void attention_apply<T, T>(Mode, const T*, const T*, const T*, int, const FeatureShape&, T*);          \
  template void attention_backward_reduce<T, T>(Mode, const T*, const T*, const T*, const T*, int,               \
                                                const FeatureShape&, T*, T*);                                     \
  template void attention_input_grad<T, T>(Mode, const T*, const T*, const T*, const T*, const T*, const int32_t*, \
                                           int, const FeatureShape&, T*);

DA2EXT_INSTANTIATE_CPU_DRIVERS(float)
DA2EXT_INSTANTIATE_CPU_DRIVERS(double)

#undef DA2EXT_INSTANTIATE_CPU_DRIVERS

}  // namespace cpu

TORCH_LIBRARY_IMPL(da2ext, CPU, m) {
  m.impl("descriptor_pool", descriptor_pool_cpu);
  m.impl("attention_apply", attention_apply_cpu);
  m.impl("attention_backward_reduce", attention_backward_reduce_cpu);
  m.impl("attention_input_grad", attention_input_grad_cpu);
}

}  // namespace ops
}  // namespace da2ext
