// CPU implementation of the packed activation ops (schema in
// ../packed_activation.cpp, maths in ../packed_activation_math.h). Work is split
// over threads with at::parallel_for in whole 32-element mask words, so no two
// tasks write the same word; the last word may be partial (numel % 32 != 0) and
// is handled by a scalar tail loop that reads no element past the end. Indices
// are 64-bit throughout.
//
// The full-word loops are written so that GCC vectorises them for the SSE2
// baseline as well as in the AVX2 clone (checked with -fopt-info-vec for
// float32): loads go to locals before any select (a conditional load is control
// flow), and each bit is or-ed in as a power of two read from a table, under
// the comparison's lane mask (SSE2 has no per-lane variable shift).
//
// The forward also runs in place (output == input, packed_activation_): each
// word's elements are all loaded into locals before any is stored, so the two
// pointers may be equal and carry no __restrict__.
//
// Threads: at::parallel_for's OpenMP backend is an inline header whose
// `#pragma omp parallel` only takes effect when this file is compiled with
// -fopenmp, which setup.py does on Linux.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Mask words per task: 2048 words = 64 Ki elements.
constexpr int64_t kWordGrain = 2048;


// One mask word: elements [0, count) of `input`, count <= 32 (a partial word
// only at the end of the tensor; its missing bits are 0). `output` may equal
// `input`: the word is loaded whole before the first store.
template <bool bounded, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE uint32_t forward_word(const scalar_t* input, int count, acc_t upper, scalar_t* output) {
  acc_t v[kPackedBits];
  uint32_t bits = 0;
  if (count == kPackedBits) {
    for (int j = 0; j < kPackedBits; ++j) {
      v[j] = static_cast<acc_t>(input[j]);
    }
    for (int j = 0; j < kPackedBits; ++j) {
      output[j] = static_cast<scalar_t>(math::clamp_activation(v[j], upper));
      const uint32_t lane_mask = math::activation_passes_gradient<bounded>(v[j], upper) ? 0xffffffffu : 0u;
      bits |= lane_mask & kBitValue[j];
    }
  } else {
    for (int j = 0; j < count; ++j) {
      v[j] = static_cast<acc_t>(input[j]);
    }
    for (int j = 0; j < count; ++j) {
      output[j] = static_cast<scalar_t>(math::clamp_activation(v[j], upper));
      bits |= math::activation_passes_gradient<bounded>(v[j], upper) ? kBitValue[j] : 0u;
    }
  }
  return bits;
}

// One word of the backward, count <= 32 as above.
template <typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void backward_word(const scalar_t* __restrict__ grad_output, uint32_t word, int count,
                                        scalar_t* __restrict__ grad_input) {
  if (count == kPackedBits) {
    for (int j = 0; j < kPackedBits; ++j) {
      const acc_t g = static_cast<acc_t>(grad_output[j]);
      grad_input[j] = static_cast<scalar_t>(math::packed_activation_grad(g, math::mask_has_bit(word, kBitValue[j])));
    }
  } else {
    for (int j = 0; j < count; ++j) {
      const acc_t g = static_cast<acc_t>(grad_output[j]);
      grad_input[j] = static_cast<scalar_t>(math::packed_activation_grad(g, math::mask_has_bit(word, kBitValue[j])));
    }
  }
}

// The loops over a range of words, as entry points that GCC on x86-64 Linux
// builds twice, for AVX2 and for the baseline, picking one at load time (as in
// residual_attention_loops.cpp); the bodies are always_inline so that each clone
// compiles its own copy.
template <bool bounded, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void forward_words_body(const scalar_t* input, int64_t begin, int64_t end, int64_t numel,
                                             acc_t upper, scalar_t* output, uint32_t* mask) {
  for (int64_t w = begin; w < end; ++w) {
    const int64_t first = w * kPackedBits;
    const int64_t remaining = numel - first;
    const int count = remaining < kPackedBits ? static_cast<int>(remaining) : kPackedBits;
    mask[w] = forward_word<bounded>(input + first, count, upper, output + first);
  }
}

template <typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void backward_words_body(const scalar_t* grad_output, const uint32_t* mask, int64_t begin,
                                              int64_t end, int64_t numel, scalar_t* grad_input) {
  for (int64_t w = begin; w < end; ++w) {
    const int64_t first = w * kPackedBits;
    const int64_t remaining = numel - first;
    const int count = remaining < kPackedBits ? static_cast<int>(remaining) : kPackedBits;
    backward_word<scalar_t, acc_t>(grad_output + first, mask[w], count, grad_input + first);
  }
}

#define DA2EXT_DEFINE_WORD_LOOPS(scalar_t, acc_t)                                                                  \
  DA2EXT_CPU_CLONES void forward_words(const scalar_t* input, int64_t begin, int64_t end, int64_t numel,          \
                                       acc_t upper, bool bounded, scalar_t* output, uint32_t* mask) {             \
    if (bounded) {                                                                                                \
      forward_words_body<true>(input, begin, end, numel, upper, output, mask);                                    \
    } else {                                                                                                      \
      forward_words_body<false>(input, begin, end, numel, upper, output, mask);                                   \
    }                                                                                                             \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void backward_words(const scalar_t* grad_output, const uint32_t* mask, int64_t begin,         \
                                        int64_t end, int64_t numel, scalar_t* grad_input) {                       \
    backward_words_body<scalar_t, acc_t>(grad_output, mask, begin, end, numel, grad_input);                       \
  }

DA2EXT_DEFINE_WORD_LOOPS(float, float)
DA2EXT_DEFINE_WORD_LOOPS(double, double)
DA2EXT_DEFINE_WORD_LOOPS(c10::Half, float)

#undef DA2EXT_DEFINE_WORD_LOOPS

template <typename scalar_t>
void packed_activation_kernel(const scalar_t* input, int64_t numel, double upper_value, scalar_t* output,
                              uint32_t* mask) {
  typedef typename math::AccumulateType<scalar_t>::type acc_t;
  const acc_t upper = static_cast<acc_t>(upper_value);
  // upper = +inf in the arithmetic's type: ReLU, whose gradient passes at x = +inf too (no upper test).
  const bool bounded = upper < std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, math::packed_mask_words(numel), kWordGrain, [&](int64_t begin, int64_t end) {
    forward_words(input, begin, end, numel, upper, bounded, output, mask);
  });
}

template <typename scalar_t>
void packed_activation_backward_kernel(const scalar_t* grad_output, const uint32_t* mask, int64_t numel,
                                       scalar_t* grad_input) {
  at::parallel_for(0, math::packed_mask_words(numel), kWordGrain, [&](int64_t begin, int64_t end) {
    backward_words(grad_output, mask, begin, end, numel, grad_input);
  });
}

// output (which may be input itself) = clamp(input, 0, upper), and the mask.
void activate_into(const at::Tensor& input, double upper, at::Tensor& output, at::Tensor& mask) {
  const int64_t numel = input.numel();
  if (numel == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "packed_activation_cpu", [&] {
    packed_activation_kernel(input.data_ptr<scalar_t>(), numel, upper, output.data_ptr<scalar_t>(),
                             mask_words_ptr(mask));
  });
}

std::tuple<at::Tensor, at::Tensor> packed_activation_cpu(const at::Tensor& input, double upper) {
  const char* op = "packed_activation";
  check_activation_tensor(input, op, "input");
  check_activation_upper(upper, op);
  at::Tensor output, mask;
  std::tie(output, mask) = allocate_activation_outputs(input);
  activate_into(input, upper, output, mask);
  return std::make_tuple(output, mask);
}

at::Tensor packed_activation_inplace_cpu(at::Tensor& self, double upper) {
  const char* op = "packed_activation_";
  check_activation_tensor(self, op, "self");
  check_activation_upper(upper, op);
  at::Tensor mask = allocate_activation_mask(self);
  activate_into(self, upper, self, mask);
  return mask;
}

at::Tensor packed_activation_backward_cpu(const at::Tensor& grad_output, const at::Tensor& mask) {
  const char* op = "packed_activation_backward";
  check_activation_tensor(grad_output, op, "grad_output");
  check_activation_mask(mask, grad_output, op);
  at::Tensor grad_input = empty_in_memory_order(grad_output);
  const int64_t numel = grad_output.numel();
  if (numel == 0) {
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "packed_activation_backward_cpu", [&] {
    packed_activation_backward_kernel(grad_output.data_ptr<scalar_t>(), mask_words_ptr(mask), numel,
                                      grad_input.data_ptr<scalar_t>());
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(da2ext, CPU, m) {
  m.impl("packed_activation", packed_activation_cpu);
  m.impl("packed_activation_", packed_activation_inplace_cpu);
  m.impl("packed_activation_backward", packed_activation_backward_cpu);
}

}  // namespace ops
}  // namespace da2ext
