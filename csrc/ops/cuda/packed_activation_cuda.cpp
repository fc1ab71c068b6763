// Torch binding of the packed activation's CUDA kernels: the same checks and
// outputs as the CPU implementation, then raw pointers to the launchers on the
// current stream. Compiled by the host compiler; the kernels live in the .cu file.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../packed_activation.h"
#include "packed_activation_kernel.h"
#include "kernel_pointers.h"

namespace da2ext {
namespace ops {
namespace {


// output (which may be input itself) = clamp(input, 0, upper), and the mask, on
// the current stream of input's device (the caller holds a guard for it).
void activate_into(const at::Tensor& input, double upper, at::Tensor& output, at::Tensor& mask, const char* op) {
  if (input.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "packed_activation_cuda", [&] {
    check_launch(cuda::packed_activation(kernel_ptr<scalar_t>(input), input.numel(), upper,
                                         kernel_mutable_ptr<scalar_t>(output), mask_words_ptr(mask),
                                         c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
}

std::tuple<at::Tensor, at::Tensor> packed_activation_cuda(const at::Tensor& input, double upper) {
  const char* op = "packed_activation";
  check_activation_tensor(input, op, "input");
  check_cuda(input, op, "input");
  check_activation_upper(upper, op);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output, mask;
  std::tie(output, mask) = allocate_activation_outputs(input);
  activate_into(input, upper, output, mask, op);
  return std::make_tuple(output, mask);
}

at::Tensor packed_activation_inplace_cuda(at::Tensor& self, double upper) {
  const char* op = "packed_activation_";
  check_activation_tensor(self, op, "self");
  check_cuda(self, op, "self");
  check_activation_upper(upper, op);
  const c10::cuda::CUDAGuard guard(self.device());
  at::Tensor mask = allocate_activation_mask(self);
  activate_into(self, upper, self, mask, op);
  return mask;
}

at::Tensor packed_activation_backward_cuda(const at::Tensor& grad_output, const at::Tensor& mask) {
  const char* op = "packed_activation_backward";
  check_activation_tensor(grad_output, op, "grad_output");
  check_cuda(grad_output, op, "grad_output");
  check_activation_mask(mask, grad_output, op);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor grad_input = empty_in_memory_order(grad_output);
  if (grad_output.numel() == 0) {
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "packed_activation_backward_cuda", [&] {
    check_launch(cuda::packed_activation_backward(kernel_ptr<scalar_t>(grad_output), mask_words_ptr(mask),
                                                  grad_output.numel(), kernel_mutable_ptr<scalar_t>(grad_input),
                                                  c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(da2ext, CUDA, m) {
  m.impl("packed_activation", packed_activation_cuda);
  m.impl("packed_activation_", packed_activation_inplace_cuda);
  m.impl("packed_activation_backward", packed_activation_backward_cuda);
}

}  // namespace ops
}  // namespace da2ext
