// Loads and stores between the storage types of the CUDA kernels (__half,
// float, double) and their accumulation type (float, or double for double),
// spelled with the explicit intrinsics so they also compile under torch's
// __CUDA_NO_HALF_CONVERSIONS__.
#pragma once

#include <cuda_fp16.h>

namespace da2ext {
namespace cuda {

__device__ __forceinline__ float to_acc(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_acc(float v) {
  return v;
}
__device__ __forceinline__ double to_acc(double v) {
  return v;
}
__device__ __forceinline__ void store(__half* p, float v) {
  *p = __float2half(v);
}
__device__ __forceinline__ void store(float* p, float v) {
  *p = v;
}
__device__ __forceinline__ void store(double* p, double v) {
  *p = v;
}

}  // namespace cuda
}  // namespace da2ext
