// CPU kernels of the residual attention adaptor (DESIGN.md §2), parallel with
// at::parallel_for. Each op reads the big tensor once:
//  - the two "dual" reductions (descriptor pooling, backward reduction) need a
//    sum along H*W per channel and a reduction across channels per position;
//    a task owns one image and a tile of positions, walks all channels over it
//    (contiguous rows of kTile elements), keeps the per-position state in a
//    small local array and writes one partial row sum per channel and tile;
//    the partials are summed afterwards, so no two tasks write the same place
//    and the result does not depend on the number of threads.
//  - the elementwise passes (apply, input gradient) go plane by plane.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../residual_attention.h"
#include "../residual_attention_math.h"

namespace da2ext {
namespace ops {
namespace {

using math::Mode;

// The row sums of the dual reductions are floating-point reductions, which a
// compiler may not vectorise without permission to reassociate them; OpenMP's
// simd pragma gives that permission for this loop only (-fopenmp-simd, no
// OpenMP runtime). The order is then fixed by the binary: still deterministic.
#define DA2_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP) || defined(DA2EXT_OPENMP_SIMD)
#define DA2_VECTORIZE_SUM(var) DA2_PRAGMA(omp simd reduction(+ : var))
#else
#define DA2_VECTORIZE_SUM(var)
#endif

// Positions per task of the dual reductions: rows long enough to stream, state
// small enough for L1 (kTile * (2 acc + 1 int)).
constexpr int64_t kTile = 256;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Elementwise passes: enough planes per task to amortise scheduling on small maps.
int64_t plane_grain(int64_t HW) {
  return std::max<int64_t>(1, 32768 / HW);
}

template <typename acc_t, typename out_t>
void sum_row_partials(const std::vector<acc_t>& partial, int64_t N, int64_t tiles, int64_t C, int64_t mean_count,
                      out_t* out) {
  at::parallel_for(0, N * C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / C, c = i % C;
      acc_t sum = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        sum += partial[(n * tiles + t) * C + c];
      }
      out[i] = static_cast<out_t>(mean_count > 0 ? sum / static_cast<acc_t>(mean_count) : sum);
    }
  });
}

template <typename scalar_t>
void descriptor_pool_kernel(const scalar_t* input, const FeatureShape& s, scalar_t* channel_mean, scalar_t* spatial,
                            int32_t* argmax) {
  typedef typename math::AccumulateType<scalar_t>::type acc_t;
  const int64_t C = s.C, HW = s.HW, tiles = ceil_div(HW, kTile);
  std::vector<acc_t> row_partial(s.N * tiles * C);
  at::parallel_for(0, s.N * tiles, 1, [&](int64_t begin, int64_t end) {
    acc_t sum[kTile], max[kTile];
    int32_t index[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, hw0 = (task % tiles) * kTile;
      const int64_t len = std::min(kTile, HW - hw0);
      const scalar_t* tile = input + n * C * HW + hw0;
      for (int64_t i = 0; i < len; ++i) {
        sum[i] = 0;
        max[i] = static_cast<acc_t>(tile[i]);
        index[i] = 0;
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = tile + c * HW;
        acc_t row_sum = 0;
        DA2_VECTORIZE_SUM(row_sum)
        for (int64_t i = 0; i < len; ++i) {
          const acc_t v = static_cast<acc_t>(row[i]);
          row_sum += v;
          sum[i] += v;
          const bool take = math::replaces_running_max(v, max[i]);
          max[i] = take ? v : max[i];
          index[i] = take ? static_cast<int32_t>(c) : index[i];
        }
        row_partial[task * C + c] = row_sum;
      }
      scalar_t* mean_out = spatial + n * 2 * HW + hw0;
      scalar_t* max_out = mean_out + HW;
      int32_t* index_out = argmax + n * HW + hw0;
      for (int64_t i = 0; i < len; ++i) {
        mean_out[i] = static_cast<scalar_t>(sum[i] / static_cast<acc_t>(C));
        max_out[i] = static_cast<scalar_t>(max[i]);
        index_out[i] = index[i];
      }
    }
  });
  sum_row_partials(row_partial, s.N, tiles, C, HW, channel_mean);
}

template <Mode mode, typename scalar_t, typename acc_t>
void attention_apply_kernel(const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial,
                            const FeatureShape& s, scalar_t* output) {
  const int64_t C = s.C, HW = s.HW;
  at::parallel_for(0, s.N * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const acc_t gc = gate_channel[plane];
      const acc_t* gs = gate_spatial + (plane / C) * HW;
      const scalar_t* in = input + plane * HW;
      scalar_t* out = output + plane * HW;
      for (int64_t i = 0; i < HW; ++i) {
        out[i] = static_cast<scalar_t>(math::apply_attention(mode, static_cast<acc_t>(in[i]), gc, gs[i]));
      }
    }
  });
}

template <Mode mode, typename scalar_t, typename acc_t>
void attention_backward_reduce_kernel(const scalar_t* grad_output, const scalar_t* input, const acc_t* gate_channel,
                                      const acc_t* gate_spatial, const FeatureShape& s, acc_t* channel_sum,
                                      acc_t* spatial_sum) {
  const int64_t C = s.C, HW = s.HW, tiles = ceil_div(HW, kTile);
  std::vector<acc_t> row_partial(s.N * tiles * C);
  at::parallel_for(0, s.N * tiles, 1, [&](int64_t begin, int64_t end) {
    acc_t column[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles, hw0 = (task % tiles) * kTile;
      const int64_t len = std::min(kTile, HW - hw0);
      const acc_t* gs = gate_spatial + n * HW + hw0;
      std::fill(column, column + len, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t offset = (n * C + c) * HW + hw0;
        const scalar_t* g = grad_output + offset;
        // add mode never reads the input (it may be null); mul mode reads it here
        const scalar_t* f = mode == Mode::Mul ? input + offset : g;
        const acc_t gc = gate_channel[n * C + c];
        acc_t row_sum = 0;
        DA2_VECTORIZE_SUM(row_sum)
        for (int64_t i = 0; i < len; ++i) {
          const acc_t t =
              math::attention_grad_term(mode, static_cast<acc_t>(g[i]), static_cast<acc_t>(f[i]));
          row_sum += t * gs[i];
          column[i] += t * gc;
        }
        row_partial[task * C + c] = row_sum;
      }
      std::copy(column, column + len, spatial_sum + n * HW + hw0);
    }
  });
  sum_row_partials(row_partial, s.N, tiles, C, /*mean_count=*/0, channel_sum);
}

template <Mode mode, typename scalar_t, typename acc_t>
void attention_input_grad_kernel(const scalar_t* grad_output, const acc_t* gate_channel, const acc_t* gate_spatial,
                                 const acc_t* grad_channel_mean, const acc_t* grad_spatial, const int32_t* argmax,
                                 const FeatureShape& s, scalar_t* grad_input) {
  const int64_t C = s.C, HW = s.HW;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW), inv_c = acc_t(1) / static_cast<acc_t>(C);
  at::parallel_for(0, s.N * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C;
      const int32_t c = static_cast<int32_t>(plane % C);
      const acc_t gc = gate_channel[plane];
      const acc_t channel_share = grad_channel_mean[plane] * inv_hw;
      const acc_t* gs = gate_spatial + n * HW;
      const acc_t* grad_mean = grad_spatial + n * 2 * HW;
      const acc_t* grad_max = grad_mean + HW;
      const int32_t* index = argmax + n * HW;
      const scalar_t* g = grad_output + plane * HW;
      scalar_t* out = grad_input + plane * HW;
      for (int64_t i = 0; i < HW; ++i) {
        out[i] = static_cast<scalar_t>(math::input_grad(mode, static_cast<acc_t>(g[i]), gc, gs[i], channel_share,
                                                        grad_mean[i] * inv_c, index[i] == c, grad_max[i]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> descriptor_pool_cpu(const at::Tensor& input) {
  const FeatureShape s = check_feature_map(input, "descriptor_pool", "input");
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
  const FeatureShape s = check_feature_map(input, "attention_apply", "input");
  check_gates(input, s, gate_channel, gate_spatial, "attention_apply");
  at::Tensor output = at::empty_like(input);
  if (s.N == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "attention_apply_cpu", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    const scalar_t* in = input.data_ptr<scalar_t>();
    const acc_t* gc = gate_channel.data_ptr<acc_t>();
    const acc_t* gs = gate_spatial.data_ptr<acc_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    if (multiplicative) {
      attention_apply_kernel<Mode::Mul>(in, gc, gs, s, out);
    } else {
      attention_apply_kernel<Mode::Add>(in, gc, gs, s, out);
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> attention_backward_reduce_cpu(const at::Tensor& grad_output,
                                                                 const c10::optional<at::Tensor>& input,
                                                                 const at::Tensor& gate_channel,
                                                                 const at::Tensor& gate_spatial,
                                                                 bool multiplicative) {
  const char* op = "attention_backward_reduce";
  const FeatureShape s = check_feature_map(grad_output, op, "grad_output");
  check_gates(grad_output, s, gate_channel, gate_spatial, op);
  if (multiplicative) {
    TORCH_CHECK(input.has_value() && input->defined(), op, ": input is required in mode \"mul\"");
    check_companion(*input, grad_output, grad_output.scalar_type(), grad_output.numel(), op, "input",
                    "[N, C, H, W] like grad_output");
  }
  const at::ScalarType acc = accumulate_dtype(grad_output.scalar_type());
  at::Tensor channel_sum = at::empty({s.N, s.C}, grad_output.options().dtype(acc));
  at::Tensor spatial_sum = at::empty({s.N, s.H, s.W}, grad_output.options().dtype(acc));
  if (s.N == 0) {
    return std::make_tuple(channel_sum, spatial_sum);
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "attention_backward_reduce_cpu", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    const scalar_t* g = grad_output.data_ptr<scalar_t>();
    const acc_t* gc = gate_channel.data_ptr<acc_t>();
    const acc_t* gs = gate_spatial.data_ptr<acc_t>();
    acc_t* cs = channel_sum.data_ptr<acc_t>();
    acc_t* ss = spatial_sum.data_ptr<acc_t>();
    if (multiplicative) {
      attention_backward_reduce_kernel<Mode::Mul>(g, input->data_ptr<scalar_t>(), gc, gs, s, cs, ss);
    } else {
      attention_backward_reduce_kernel<Mode::Add>(g, static_cast<const scalar_t*>(nullptr), gc, gs, s, cs, ss);
    }
  });
  return std::make_tuple(channel_sum, spatial_sum);
}

at::Tensor attention_input_grad_cpu(const at::Tensor& grad_output, const at::Tensor& gate_channel,
                                    const at::Tensor& gate_spatial, const at::Tensor& grad_channel_mean,
                                    const at::Tensor& grad_spatial, const at::Tensor& argmax, bool multiplicative) {
  const char* op = "attention_input_grad";
  const FeatureShape s = check_feature_map(grad_output, op, "grad_output");
  check_gates(grad_output, s, gate_channel, gate_spatial, op);
  check_descriptor_grads(grad_output, s, grad_channel_mean, grad_spatial, argmax, op);
  at::Tensor grad_input = at::empty_like(grad_output);
  if (s.N == 0) {
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "attention_input_grad_cpu", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    const scalar_t* g = grad_output.data_ptr<scalar_t>();
    const acc_t* gc = gate_channel.data_ptr<acc_t>();
    const acc_t* gs = gate_spatial.data_ptr<acc_t>();
    const acc_t* gcm = grad_channel_mean.data_ptr<acc_t>();
    const acc_t* gsp = grad_spatial.data_ptr<acc_t>();
    const int32_t* am = argmax.data_ptr<int32_t>();
    scalar_t* out = grad_input.data_ptr<scalar_t>();
    if (multiplicative) {
      attention_input_grad_kernel<Mode::Mul>(g, gc, gs, gcm, gsp, am, s, out);
    } else {
      attention_input_grad_kernel<Mode::Add>(g, gc, gs, gcm, gsp, am, s, out);
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(da2ext, CPU, m) {
  m.impl("descriptor_pool", descriptor_pool_cpu);
  m.impl("attention_apply", attention_apply_cpu);
  m.impl("attention_backward_reduce", attention_backward_reduce_cpu);
  m.impl("attention_input_grad", attention_input_grad_cpu);
}

}  // namespace ops
}  // namespace da2ext
