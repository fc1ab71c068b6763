// The sum of one value per lane over a warp, by shuffles in _sync form (sm_30 and
// later, sm_53 included): lane 0 gets the total, added in the same fixed tree order
// on every run.
#pragma once

namespace da2ext {
namespace cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

}  // namespace cuda
}  // namespace da2ext
