// DA2_HOST_DEVICE marks the small maths functions that the CPU kernels and the
// CUDA kernels share: __host__ __device__ when nvcc (or clang -x cuda) compiles,
// plain inline for the host compiler.
#pragma once

#if defined(__CUDACC__)
#define DA2_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DA2_HOST_DEVICE inline
#endif
