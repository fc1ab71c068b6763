// Torch binding of the CUDA kernels: the same checks and outputs as the CPU
// implementation, then raw pointers to the launchers on the current stream.
// Compiled by the host compiler; the kernels themselves live in the .cu file.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../residual_attention.h"
#include "../residual_attention_math.h"
#include "residual_attention_kernel.h"
#include "kernel_pointers.h"

namespace da2ext {
namespace ops {
namespace {

// `rows` partial row sums per image and tile: C, or k*C for the rank-k backward reduction.
at::Tensor row_partial_workspace(const at::Tensor& feature, const FeatureShape& s, int64_t rows) {
  return at::empty({cuda::row_partial_count(s.N, rows, s.HW)},
                   feature.options().dtype(accumulate_dtype(feature.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> descriptor_pool_cuda(const at::Tensor& input) {
  const char* op = "descriptor_pool";
  check_cuda(input, op, "input");
  const FeatureShape s = check_feature_map(input, op, "input");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor channel_mean, spatial, argmax;
  std::tie(channel_mean, spatial, argmax) = allocate_pool_outputs(input, s);
  at::Tensor workspace = row_partial_workspace(input, s, s.C);
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "descriptor_pool_cuda", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    check_launch(cuda::descriptor_pool(kernel_ptr<scalar_t>(input), s.N, s.C, s.HW,
                                       kernel_mutable_ptr<scalar_t>(channel_mean),
                                       kernel_mutable_ptr<scalar_t>(spatial), argmax.data_ptr<int32_t>(),
                                       workspace.data_ptr<acc_t>(), c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
  return std::make_tuple(channel_mean, spatial, argmax);
}

at::Tensor attention_apply_cuda(const at::Tensor& input, const at::Tensor& gate_channel,
                                const at::Tensor& gate_spatial, bool multiplicative) {
  const char* op = "attention_apply";
  check_cuda(input, op, "input");
  const FeatureShape s = check_feature_map(input, op, "input");
  const GateRank rank = check_gates(input, s, gate_channel, gate_spatial, op);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "attention_apply_cuda", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    check_launch(cuda::attention_apply(kernel_ptr<scalar_t>(input), gate_channel.data_ptr<acc_t>(),
                                       gate_spatial.data_ptr<acc_t>(), s.N, s.C, s.HW, static_cast<int>(rank.k),
                                       multiplicative,
                                       kernel_mutable_ptr<scalar_t>(output), c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> attention_backward_reduce_cuda(const at::Tensor& grad_output,
                                                                  const c10::optional<at::Tensor>& input,
                                                                  const at::Tensor& gate_channel,
                                                                  const at::Tensor& gate_spatial,
                                                                  bool multiplicative) {
  const char* op = "attention_backward_reduce";
  check_cuda(grad_output, op, "grad_output");
  const FeatureShape s = check_feature_map(grad_output, op, "grad_output");
  const GateRank rank = check_gates(grad_output, s, gate_channel, gate_spatial, op);
  const bool reads_input = multiplicative;
  if (reads_input) {
    TORCH_CHECK(input.has_value() && input->defined(), op, ": input is required in mode \"mul\"");
    check_companion(*input, grad_output, grad_output.scalar_type(), grad_output.numel(), op, "input",
                    "[N, C, H, W] like grad_output");
  }
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor channel_sum, spatial_sum;
  std::tie(channel_sum, spatial_sum) = allocate_reduce_outputs(grad_output, s, rank);
  at::Tensor workspace = row_partial_workspace(grad_output, s, rank.k * s.C);
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "attention_backward_reduce_cuda", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    typedef typename KernelType<scalar_t>::type kernel_t;
    const kernel_t* in = reads_input ? kernel_ptr<scalar_t>(*input) : static_cast<const kernel_t*>(nullptr);
    check_launch(cuda::attention_backward_reduce(kernel_ptr<scalar_t>(grad_output), in, gate_channel.data_ptr<acc_t>(),
                                                 gate_spatial.data_ptr<acc_t>(), s.N, s.C, s.HW, static_cast<int>(rank.k),
                                                 multiplicative,
                                                 channel_sum.data_ptr<acc_t>(), spatial_sum.data_ptr<acc_t>(),
                                                 workspace.data_ptr<acc_t>(), c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
  return std::make_tuple(channel_sum, spatial_sum);
}

at::Tensor attention_input_grad_cuda(const at::Tensor& grad_output, const at::Tensor& gate_channel,
                                     const at::Tensor& gate_spatial, const at::Tensor& grad_channel_mean,
                                     const at::Tensor& grad_spatial, const at::Tensor& argmax, bool multiplicative) {
  const char* op = "attention_input_grad";
  check_cuda(grad_output, op, "grad_output");
  const FeatureShape s = check_feature_map(grad_output, op, "grad_output");
  const GateRank rank = check_gates(grad_output, s, gate_channel, gate_spatial, op);
  check_descriptor_grads(grad_output, s, grad_channel_mean, grad_spatial, argmax, op);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor grad_input = at::empty_like(grad_output);
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "attention_input_grad_cuda", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    check_launch(cuda::attention_input_grad(kernel_ptr<scalar_t>(grad_output), gate_channel.data_ptr<acc_t>(),
                                            gate_spatial.data_ptr<acc_t>(), grad_channel_mean.data_ptr<acc_t>(),
                                            grad_spatial.data_ptr<acc_t>(), argmax.data_ptr<int32_t>(), s.N, s.C,
                                            s.HW, static_cast<int>(rank.k),
                                            multiplicative, kernel_mutable_ptr<scalar_t>(grad_input),
                                            c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(da2ext, CUDA, m) {
  m.impl("descriptor_pool", descriptor_pool_cuda);
  m.impl("attention_apply", attention_apply_cuda);
  m.impl("attention_backward_reduce", attention_backward_reduce_cuda);
  m.impl("attention_input_grad", attention_input_grad_cuda);
}

}  // namespace ops
}  // namespace da2ext
