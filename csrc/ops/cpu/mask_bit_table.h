// kBitValue[j] = math::mask_bit_value(j) = 1u << j, as a table: the CPU loops or
// each mask bit in under a comparison's lane mask, and SSE2 has no per-lane
// variable shift, so a load from this table is what vectorises.
#pragma once

#include <cstdint>

#include "../packed_activation_math.h"

namespace da2ext {
namespace ops {

alignas(64) const uint32_t kBitValue[math::kPackedBits] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,  1u << 8,  1u << 9,  1u << 10,
    1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21,
    1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

}  // namespace ops
}  // namespace da2ext
