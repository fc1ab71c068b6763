// Shared by the torch bindings of the CUDA kernels: typed raw pointers for the
// launchers (at::Half as __half), and the checks every binding makes.
#pragma once

#include <ATen/ATen.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace da2ext {
namespace ops {

// at::Half and __half share the IEEE binary16 layout; the kernels take __half.
template <typename scalar_t>
struct KernelType {
  typedef scalar_t type;
};
template <>
struct KernelType<at::Half> {
  typedef __half type;
};

template <typename scalar_t>
const typename KernelType<scalar_t>::type* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename KernelType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}
template <typename scalar_t>
typename KernelType<scalar_t>::type* kernel_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename KernelType<scalar_t>::type*>(t.data_ptr<scalar_t>());
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace ops
}  // namespace da2ext
