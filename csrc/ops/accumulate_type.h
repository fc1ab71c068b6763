// The accumulation type every kernel of da2ext computes in: float for float and
// half storage (half is only a storage format here), double for double.
#pragma once

namespace da2ext {
namespace math {

template <typename scalar_t>
struct AccumulateType {
  typedef float type;
};
template <>
struct AccumulateType<double> {
  typedef double type;
};

}  // namespace math
}  // namespace da2ext
