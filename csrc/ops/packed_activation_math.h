// The per-element arithmetic of the packed activation (docs/design.md §1 and §3:
// a ReLU/ReLU6 keeps one bit per element for backward), shared by the CPU and
// CUDA kernels so that both compute exactly the same thing. No torch header, so
// the CUDA translation unit stays free of torch (C++14, sm_53 and up).
//
//   output = clamp(x, 0, upper)       (upper = +inf: ReLU, upper = 6: ReLU6)
//   bit    = x > 0 && x < upper       (bounded upper: as torch's hardtanh backward)
//            x > 0                    (upper = +inf:  as torch's relu backward, so x = +inf passes)
//   grad_input = bit ? grad_output : 0
//
// NaN: the output is NaN (as torch.clamp and torch.relu) and the bit is 0, so no
// gradient flows through a NaN (torch's hardtanh backward would pass it; relu's
// would not). The bit of element i is bit (i % 32) of the 32-bit mask word i / 32.
#pragma once

#include "accumulate_type.h"
#include "host_device.h"

#include <cstdint>

namespace da2ext {
namespace math {

// Elements per mask word.
constexpr int kPackedBits = 32;

// Number of 32-bit mask words for `numel` elements.
DA2_HOST_DEVICE int64_t packed_mask_words(int64_t numel) {
  return (numel + kPackedBits - 1) / kPackedBits;
}

// clamp(x, 0, upper) for upper > 0. A NaN fails both comparisons and passes
// through unchanged; written as two selects so that the CPU loop vectorises.
template <typename acc_t>
DA2_HOST_DEVICE acc_t clamp_activation(acc_t x, acc_t upper) {
  const acc_t low = x < acc_t(0) ? acc_t(0) : x;
  return low > upper ? upper : low;
}

// Whether the gradient passes at x. `bounded` is false for upper = +inf (ReLU).
// Bitwise operators: no branch in the vectorised CPU loop. NaN gives false.
template <bool bounded, typename acc_t>
DA2_HOST_DEVICE bool activation_passes_gradient(acc_t x, acc_t upper) {
  return bounded ? ((x > acc_t(0)) & (x < upper)) : (x > acc_t(0));
}

// The mask word bit of element j (0..31) of a word: 1u << j.
DA2_HOST_DEVICE uint32_t mask_bit_value(int j) {
  return uint32_t(1) << j;
}

// Whether `word` has the bit `bit_value` (a power of two, see mask_bit_value) set.
DA2_HOST_DEVICE bool mask_has_bit(uint32_t word, uint32_t bit_value) {
  return (word & bit_value) != 0u;
}

// grad_input at one element: the incoming gradient where the bit is set, else an
// exact 0 (a select, not a product, so a NaN/inf gradient does not leak through).
template <typename acc_t>
DA2_HOST_DEVICE acc_t packed_activation_grad(acc_t grad_output, bool bit) {
  return bit ? grad_output : acc_t(0);
}

}  // namespace math
}  // namespace da2ext
