// Scratch memory for the CPU loops.
#pragma once

#include <cstdint>
#include <memory>

namespace da2ext {
namespace ops {
namespace cpu {

// A buffer of `count` values left uninitialised, for scratch that every user writes before
// reading: a std::vector zeroes it first, a memset that cost as much as a small map's pass.
template <typename T>
std::unique_ptr<T[]> uninitialized_buffer(int64_t count) {
  return std::unique_ptr<T[]>(new T[count]);
}

}  // namespace cpu
}  // namespace ops
}  // namespace da2ext
