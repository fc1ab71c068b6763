// CPU kernels of the packed activation fused with the passes next to it, so that
// a frozen layer reads and writes its output once (schema in
// ../packed_activation.cpp, per-element maths in ../packed_activation_math.h):
//
//   packed_bias_activation_                 self = clamp(self + bias[c] (+ residual), 0, upper), and the mask:
//                                           a 1x1 conv's GEMM result gets its folded BN bias (and, at the end
//                                           of a residual block, the shortcut) in the activation's own pass
//                                           instead of a bias copy before the GEMM and an add after it.
//   packed_activation_backward_channel_sums the masked gradient and its sum over every dim but 1 (the
//                                           trainable BN shift's gradient) in one pass instead of two.
//
// Layout: contiguous, dim 1 the channels, everything after it one "plane" of
// `plane` elements (N x C x H x W: plane = H * W). The forward walks 32-element
// mask words as packed_activation_kernel.cpp does; a word inside one plane
// takes one bias value (the vectorised path), a word across planes takes its
// bias per element. The backward walks planes, so that each plane's sum is one
// task's and the reduction order is fixed by the shapes alone (the same result
// run to run, whatever the thread count).
//
// The backward also takes a channels_last gradient (N x H x W x C in memory; its
// mask then follows memory order, as packed_activation_ wrote it there): rows of
// C channels, in blocks of whole rows fixed by the shape, each block summing
// into its own row of partial channel sums, added up in block order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../packed_activation.h"
#include "../packed_activation_math.h"
#include "mask_bit_table.h"
#include "vectorization.h"

namespace da2ext {
namespace ops {
namespace {

using math::kPackedBits;

constexpr int64_t kWordGrain = 2048;             // mask words per forward task (64 Ki elements)
constexpr int64_t kBackwardElementGrain = 65536;  // elements per backward task, in whole planes


// A whole word inside one plane: one bias value for its 32 elements. Loads go to
// locals before the stores (data is read and written in place).
template <bool bounded, bool has_residual, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE uint32_t bias_word_in_plane(scalar_t* data, const scalar_t* residual, acc_t bias, acc_t upper) {
  acc_t v[kPackedBits];
  for (int j = 0; j < kPackedBits; ++j) {
    v[j] = static_cast<acc_t>(data[j]) + bias;
  }
  if (has_residual) {
    for (int j = 0; j < kPackedBits; ++j) {
      v[j] += static_cast<acc_t>(residual[j]);
    }
  }
  uint32_t bits = 0;
  for (int j = 0; j < kPackedBits; ++j) {
    data[j] = static_cast<scalar_t>(math::clamp_activation(v[j], upper));
    const uint32_t lane_mask = math::activation_passes_gradient<bounded>(v[j], upper) ? 0xffffffffu : 0u;
    bits |= lane_mask & kBitValue[j];
  }
  return bits;
}

// Any other word (across planes, or the partial last one): the bias per element.
template <bool bounded, bool has_residual, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE uint32_t bias_word_any(scalar_t* data, const scalar_t* residual, const scalar_t* bias,
                                            int64_t first, int count, int64_t plane, int64_t channels,
                                            acc_t upper) {
  int64_t position = first % plane;
  int64_t channel = (first / plane) % channels;
  uint32_t bits = 0;
  for (int j = 0; j < count; ++j) {
    acc_t v = static_cast<acc_t>(data[j]) + static_cast<acc_t>(bias[channel]);
    if (has_residual) {
      v += static_cast<acc_t>(residual[j]);
    }
    data[j] = static_cast<scalar_t>(math::clamp_activation(v, upper));
    bits |= math::activation_passes_gradient<bounded>(v, upper) ? kBitValue[j] : 0u;
    if (++position == plane) {
      position = 0;
      channel = channel + 1 == channels ? 0 : channel + 1;
    }
  }
  return bits;
}

struct BiasShape {
  int64_t numel;
  int64_t plane;
  int64_t channels;
};

template <bool bounded, bool has_residual, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void bias_words_body(scalar_t* data, const scalar_t* residual, const scalar_t* bias,
                                          int64_t begin, int64_t end, BiasShape s, acc_t upper, uint32_t* mask) {
  for (int64_t w = begin; w < end; ++w) {
    const int64_t first = w * kPackedBits;
    const int64_t remaining = s.numel - first;
    const int count = remaining < kPackedBits ? static_cast<int>(remaining) : kPackedBits;
    const int64_t position = first % s.plane;
    scalar_t* word_data = data + first;
    const scalar_t* word_residual = has_residual ? residual + first : residual;
    if (count == kPackedBits && position + kPackedBits <= s.plane) {
      const acc_t b = static_cast<acc_t>(bias[(first / s.plane) % s.channels]);
      mask[w] = bias_word_in_plane<bounded, has_residual>(word_data, word_residual, b, upper);
    } else {
      mask[w] = bias_word_any<bounded, has_residual>(word_data, word_residual, bias, first, count, s.plane,
                                                     s.channels, upper);
    }
  }
}

// One element of the masked gradient outside whole words: written, and added to its lane.
template <typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void masked_element(const scalar_t* grad_output, const uint32_t* mask, int64_t i,
                                         scalar_t* grad_input, acc_t* lanes) {
  const bool bit = math::mask_has_bit(mask[i / kPackedBits], kBitValue[i % kPackedBits]);
  const acc_t g = math::packed_activation_grad(static_cast<acc_t>(grad_output[i]), bit);
  grad_input[i] = static_cast<scalar_t>(g);
  lanes[i % kPackedBits] += g;
}

// The masked gradient of one plane, written to grad_input, and its sum. 32
// running lane sums over whole words (independent lanes: they vectorise without
// reassociation), added up in a fixed order at the end.
template <typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE acc_t masked_plane_sum(const scalar_t* grad_output, const uint32_t* mask, int64_t start,
                                            int64_t stop, scalar_t* grad_input) {
  acc_t lanes[kPackedBits];
  for (int j = 0; j < kPackedBits; ++j) {
    lanes[j] = acc_t(0);
  }
  int64_t i = start;
  for (; i < stop && i % kPackedBits != 0; ++i) {  // up to the first word boundary
    masked_element(grad_output, mask, i, grad_input, lanes);
  }
  for (; i + kPackedBits <= stop; i += kPackedBits) {
    const uint32_t word = mask[i / kPackedBits];
    for (int j = 0; j < kPackedBits; ++j) {
      const acc_t g = math::packed_activation_grad(static_cast<acc_t>(grad_output[i + j]),
                                                   math::mask_has_bit(word, kBitValue[j]));
      grad_input[i + j] = static_cast<scalar_t>(g);
      lanes[j] += g;
    }
  }
  for (; i < stop; ++i) {  // the rest of the plane, less than a word
    masked_element(grad_output, mask, i, grad_input, lanes);
  }
  acc_t sum = acc_t(0);
  for (int j = 0; j < kPackedBits; ++j) {
    sum += lanes[j];
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void masked_planes_body(const scalar_t* grad_output, const uint32_t* mask, int64_t begin,
                                             int64_t end, int64_t plane, scalar_t* grad_input, acc_t* plane_sums) {
  for (int64_t p = begin; p < end; ++p) {
    plane_sums[p] = masked_plane_sum<scalar_t, acc_t>(grad_output, mask, p * plane, (p + 1) * plane, grad_input);
  }
}

// One block of channels_last rows [first_row, end_row): the masked gradient,
// written, and its per-channel sums (sums[0..C), overwritten). Whole mask words
// inside a row take the vectorised path; words across two rows (C not a
// multiple of 32) go element by element.
template <typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void masked_rows_body(const scalar_t* grad_output, const uint32_t* mask, int64_t first_row,
                                           int64_t end_row, int64_t C, scalar_t* grad_input, acc_t* sums) {
  for (int64_t c = 0; c < C; ++c) {
    sums[c] = acc_t(0);
  }
  const int64_t stop = end_row * C;
  int64_t c = 0;
  for (int64_t i = first_row * C; i < stop;) {
    if (i % kPackedBits == 0 && c + kPackedBits <= C) {
      const uint32_t word = mask[i / kPackedBits];
      acc_t* row_sums = sums + c;
      for (int j = 0; j < kPackedBits; ++j) {
        const acc_t g = math::packed_activation_grad(static_cast<acc_t>(grad_output[i + j]),
                                                     math::mask_has_bit(word, kBitValue[j]));
        grad_input[i + j] = static_cast<scalar_t>(g);
        row_sums[j] += g;
      }
      i += kPackedBits;
      c += kPackedBits;
    } else {
      const bool bit = math::mask_has_bit(mask[i / kPackedBits], kBitValue[i % kPackedBits]);
      const acc_t g = math::packed_activation_grad(static_cast<acc_t>(grad_output[i]), bit);
      grad_input[i] = static_cast<scalar_t>(g);
      sums[c] += g;
      ++i;
      ++c;
    }
    if (c == C) {
      c = 0;
    }
  }
}

// Entry points built for AVX2 and for the baseline (see vectorization.h).
#define DA2EXT_DEFINE_FUSED_LOOPS(scalar_t, acc_t)                                                                  \
  DA2EXT_CPU_CLONES void bias_words(scalar_t* data, const scalar_t* residual, const scalar_t* bias, int64_t begin,   \
                                    int64_t end, BiasShape s, acc_t upper, bool bounded, uint32_t* mask) {           \
    if (bounded) {                                                                                                   \
      if (residual != nullptr) {                                                                                     \
        bias_words_body<true, true>(data, residual, bias, begin, end, s, upper, mask);                              \
      } else {                                                                                                       \
        bias_words_body<true, false>(data, residual, bias, begin, end, s, upper, mask);                             \
      }                                                                                                              \
    } else {                                                                                                         \
      if (residual != nullptr) {                                                                                     \
        bias_words_body<false, true>(data, residual, bias, begin, end, s, upper, mask);                             \
      } else {                                                                                                       \
        bias_words_body<false, false>(data, residual, bias, begin, end, s, upper, mask);                            \
      }                                                                                                              \
    }                                                                                                                \
  }                                                                                                                  \
  DA2EXT_CPU_CLONES void masked_planes(const scalar_t* grad_output, const uint32_t* mask, int64_t begin,             \
                                       int64_t end, int64_t plane, scalar_t* grad_input, acc_t* plane_sums) {        \
    masked_planes_body<scalar_t, acc_t>(grad_output, mask, begin, end, plane, grad_input, plane_sums);               \
  }                                                                                                                  \
  DA2EXT_CPU_CLONES void masked_rows(const scalar_t* grad_output, const uint32_t* mask, int64_t first_row,           \
                                     int64_t end_row, int64_t C, scalar_t* grad_input, acc_t* sums) {                \
    masked_rows_body<scalar_t, acc_t>(grad_output, mask, first_row, end_row, C, grad_input, sums);                   \
  }

DA2EXT_DEFINE_FUSED_LOOPS(float, float)
DA2EXT_DEFINE_FUSED_LOOPS(double, double)
DA2EXT_DEFINE_FUSED_LOOPS(c10::Half, float)

#undef DA2EXT_DEFINE_FUSED_LOOPS

// Channels and plane size of a tensor of at least 2 dims (dim 1 the channels).
BiasShape bias_shape(const at::Tensor& t) {
  const int64_t channels = t.size(1);
  const int64_t outer = t.size(0) * channels;
  return BiasShape{t.numel(), outer == 0 ? 0 : t.numel() / outer, channels};
}

void check_channel_layout(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 2, op, ": ", name, " must have at least 2 dims (N x C x ...), got shape ", t.sizes());
}

at::Tensor packed_bias_activation_inplace_cpu(at::Tensor& self, const at::Tensor& bias,
                                              const c10::optional<at::Tensor>& residual, double upper) {
  const char* op = "packed_bias_activation_";
  check_activation_tensor(self, op, "self");
  check_channel_layout(self, op, "self");
  TORCH_CHECK(self.is_contiguous(), op, ": self must be contiguous (N x C x ...), got strides ", self.strides(),
              " for shape ", self.sizes());
  check_activation_upper(upper, op);
  TORCH_CHECK(bias.defined() && bias.dim() == 1 && bias.numel() == self.size(1), op,
              ": bias must be 1-D with one value per channel (", self.size(1), "), got shape ",
              bias.defined() ? bias.sizes() : at::IntArrayRef());
  TORCH_CHECK(bias.scalar_type() == self.scalar_type() && bias.device() == self.device() && bias.is_contiguous(),
              op, ": bias must be a contiguous ", self.scalar_type(), " tensor on ", self.device(), ", got ",
              bias.scalar_type(), " on ", bias.device());
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    check_activation_tensor(*residual, op, "residual");
    TORCH_CHECK(residual->is_contiguous(), op, ": residual must be contiguous like self");
    TORCH_CHECK(residual->sizes() == self.sizes() && residual->scalar_type() == self.scalar_type() &&
                    residual->device() == self.device(),
                op, ": residual must be a ", self.scalar_type(), " tensor of shape ", self.sizes(), " on ",
                self.device(), ", got ", residual->scalar_type(), " ", residual->sizes(), " on ", residual->device());
  }
  at::Tensor mask = allocate_activation_mask(self);
  const BiasShape shape = bias_shape(self);
  if (shape.numel == 0) {
    return mask;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(self.scalar_type(), "packed_bias_activation_cpu", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    const acc_t upper_acc = static_cast<acc_t>(upper);
    const bool bounded = upper_acc < std::numeric_limits<acc_t>::infinity();
    scalar_t* data = self.data_ptr<scalar_t>();
    const scalar_t* residual_data = has_residual ? residual->data_ptr<scalar_t>() : nullptr;
    const scalar_t* bias_data = bias.data_ptr<scalar_t>();
    uint32_t* words = mask_words_ptr(mask);
    at::parallel_for(0, math::packed_mask_words(shape.numel), kWordGrain, [&](int64_t begin, int64_t end) {
      bias_words(data, residual_data, bias_data, begin, end, shape, upper_acc, bounded, words);
    });
  });
  return mask;
}

std::tuple<at::Tensor, at::Tensor> packed_activation_backward_channel_sums_cpu(const at::Tensor& grad_output,
                                                                               const at::Tensor& mask) {
  const char* op = "packed_activation_backward_channel_sums";
  check_activation_tensor(grad_output, op, "grad_output");
  check_channel_layout(grad_output, op, "grad_output");
  check_activation_mask(mask, grad_output, op);
  const at::ScalarType sum_type = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_input = empty_in_memory_order(grad_output);
  const BiasShape shape = bias_shape(grad_output);
  if (is_channels_last(grad_output)) {
    const int64_t C = shape.channels, rows = shape.numel / C;
    const int64_t rows_per_block = std::max<int64_t>(1, kBackwardElementGrain / C);
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    at::Tensor partial_sums = at::empty({blocks, C}, grad_output.options().dtype(sum_type));
    AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "packed_activation_backward_channel_sums_cpu", [&] {
      typedef typename math::AccumulateType<scalar_t>::type acc_t;
      const scalar_t* grad = grad_output.data_ptr<scalar_t>();
      scalar_t* out = grad_input.data_ptr<scalar_t>();
      acc_t* partial = partial_sums.data_ptr<acc_t>();
      const uint32_t* words = mask_words_ptr(mask);
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          masked_rows(grad, words, b * rows_per_block, std::min(rows, (b + 1) * rows_per_block), C, out,
                      partial + b * C);
        }
      });
    });
    return std::make_tuple(grad_input, partial_sums.sum(0));
  }
  const int64_t planes = grad_output.size(0) * shape.channels;
  at::Tensor plane_sums = at::zeros({planes}, grad_output.options().dtype(sum_type));
  if (shape.numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "packed_activation_backward_channel_sums_cpu", [&] {
      typedef typename math::AccumulateType<scalar_t>::type acc_t;
      const scalar_t* grad = grad_output.data_ptr<scalar_t>();
      scalar_t* out = grad_input.data_ptr<scalar_t>();
      acc_t* sums = plane_sums.data_ptr<acc_t>();
      const uint32_t* words = mask_words_ptr(mask);
      const int64_t grain = shape.plane >= kBackwardElementGrain ? 1 : kBackwardElementGrain / shape.plane;
      at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
        masked_planes(grad, words, begin, end, shape.plane, out, sums);
      });
    });
  }
  // Per channel, the planes' sums over the batch in order: (N, C) -> C.
  at::Tensor channel_sums = plane_sums.view({grad_output.size(0), shape.channels}).sum(0);
  return std::make_tuple(grad_input, channel_sums);
}

}  // namespace

TORCH_LIBRARY_IMPL(da2ext, CPU, m) {
  m.impl("packed_bias_activation_", packed_bias_activation_inplace_cpu);
  m.impl("packed_activation_backward_channel_sums", packed_activation_backward_channel_sums_cpu);
}

}  // namespace ops
}  // namespace da2ext
