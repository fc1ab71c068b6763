// The adaptor's whole forward and whole backward on CUDA (docs/design.md §2, "The
// adaptor in one dispatch"): residual_attention_forward and residual_attention_backward
// for the CUDA key, so that torch.ops.da2ext.residual_attention (its autograd node in
// residual_attention_autograd.cpp) runs an adaptor forward + backward in eight kernel
// launches with no PyTorch op in between (attention_branch_kernel.h lists them). The
// same checks, outputs and kept tensors as the CPU implementation
// (residual_attention_composite.cpp); the maths is the op-by-op path's.
//
// Compiled by the host compiler; the kernels live in the .cu files. Needs torch >= 1.11,
// as the ops it implements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <tuple>

#include "../accumulate_type.h"
#include "../residual_attention.h"
#include "attention_branch_kernel.h"
#include "kernel_pointers.h"
#include "residual_attention_kernel.h"

#if TORCH_VERSION_MAJOR > 1 || (TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR >= 11)

namespace da2ext {
namespace ops {
namespace {

// One block holds an image's hidden layer in shared memory.
void check_hidden_fits(const BranchShape& s, at::ScalarType dtype, const char* op) {
  const int64_t most = cuda::branch_max_hidden(dtype == at::kDouble);
  TORCH_CHECK(s.hidden <= most, op, ": the CUDA adaptor takes a hidden layer of at most ", most, " units (",
              dtype == at::kDouble ? "float64" : "float32 accumulation", "), fc1_weight has ", s.hidden);
}

// Scratch of the accumulation dtype, carved into consecutive pieces.
struct Scratch {
  at::Tensor buffer;
  int64_t used = 0;

  template <typename acc_t>
  acc_t* take(int64_t count) {
    acc_t* piece = buffer.data_ptr<acc_t>() + used;
    used += count;
    return piece;
  }
};

using ForwardResults = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResults residual_attention_forward_cuda(const at::Tensor& input, const at::Tensor& fc1_weight,
                                               const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                               const at::Tensor& fc2_bias, const at::Tensor& spatial_weight,
                                               const at::Tensor& spatial_bias, const at::Tensor& gamma,
                                               bool multiplicative) {
  const char* op = "residual_attention_forward";
  check_cuda(input, op, "input");
  const FeatureShape map = check_feature_map(input, op, "input");
  check_branch(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma, op);
  const BranchShape s = branch_shape(map, fc1_weight, spatial_weight);
  check_hidden_fits(s, input.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t rows = s.rows(), maps = s.rank * map.HW;

  at::Tensor channel_mean, spatial, argmax;
  std::tie(channel_mean, spatial, argmax) = allocate_pool_outputs(input, map);
  at::Tensor hidden_pre = at::empty({s.N, s.hidden}, input.options());
  at::Tensor channel_logits = at::empty({s.N, rows}, input.options());
  at::Tensor y = at::empty_like(input);
  const int64_t partials = cuda::row_partial_count(s.N, s.C, map.HW);
  Scratch scratch{at::empty({partials + s.N * (rows + maps)},
                            input.options().dtype(accumulate_dtype(input.scalar_type())))};
  const at::Tensor w1 = fc1_weight.contiguous(), b1 = fc1_bias.contiguous(), w2 = fc2_weight.contiguous(),
                   b2 = fc2_bias.contiguous(), ws = spatial_weight.contiguous(), bs = spatial_bias.contiguous(),
                   g = gamma.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(input.scalar_type(), "residual_attention_forward_cuda", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    typedef typename KernelType<scalar_t>::type kernel_t;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    acc_t* mean_partial = scratch.take<acc_t>(partials);
    acc_t* gate_channel = scratch.take<acc_t>(s.N * rows);
    acc_t* gate_spatial = scratch.take<acc_t>(s.N * maps);
    check_launch(cuda::descriptor_pool_partials(kernel_ptr<scalar_t>(input), s.N, s.C, map.HW,
                                                kernel_mutable_ptr<scalar_t>(spatial), argmax.data_ptr<int32_t>(),
                                                mean_partial, stream),
                 op);
    check_launch(cuda::attention_branch_forward<kernel_t, acc_t>(
                     s, mean_partial, kernel_ptr<scalar_t>(spatial), kernel_ptr<scalar_t>(w1), kernel_ptr<scalar_t>(b1),
                     kernel_ptr<scalar_t>(w2), kernel_ptr<scalar_t>(b2), kernel_ptr<scalar_t>(ws),
                     kernel_ptr<scalar_t>(bs), kernel_ptr<scalar_t>(g), kernel_mutable_ptr<scalar_t>(channel_mean),
                     kernel_mutable_ptr<scalar_t>(hidden_pre), kernel_mutable_ptr<scalar_t>(channel_logits),
                     gate_channel, gate_spatial, stream),
                 op);
    check_launch(cuda::attention_apply(kernel_ptr<scalar_t>(input), gate_channel, gate_spatial, s.N, s.C, map.HW,
                                       static_cast<int>(s.rank), multiplicative, kernel_mutable_ptr<scalar_t>(y),
                                       stream),
                 op);
  });
  return std::make_tuple(y, channel_mean, spatial, argmax, hidden_pre, channel_logits);
}

using BackwardGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BackwardGrads residual_attention_backward_cuda(const at::Tensor& grad_output, const c10::optional<at::Tensor>& input,
                                               const at::Tensor& channel_mean, const at::Tensor& spatial,
                                               const at::Tensor& argmax, const at::Tensor& hidden_pre,
                                               const at::Tensor& channel_logits, const at::Tensor& gamma,
                                               const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                                               const at::Tensor& spatial_weight, const at::Tensor& spatial_bias,
                                               bool multiplicative, bool needs_input_grad) {
  const char* op = "residual_attention_backward";
  check_cuda(grad_output, op, "grad_output");
  const FeatureShape map = check_feature_map(grad_output, op, "grad_output");
  TORCH_CHECK(!multiplicative || (input.has_value() && input->defined()), op,
              ": mode mul needs the forward's input (input is None)");
  check_branch_weights(grad_output, fc1_weight, fc2_weight, spatial_weight, spatial_bias, gamma, op);
  check_saved(grad_output, map, channel_mean, spatial, argmax, hidden_pre, channel_logits, fc1_weight, fc2_weight, op);
  const BranchShape s = branch_shape(map, fc1_weight, spatial_weight);
  check_hidden_fits(s, grad_output.scalar_type(), op);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  // Mode mul's reduction reads F (kept in forward, maybe in float16) in the gradient's dtype.
  at::Tensor input_for_reduce;
  if (multiplicative) {
    input_for_reduce = input->to(grad_output.scalar_type()).contiguous();
    check_companion(input_for_reduce, grad_output, grad_output.scalar_type(), grad_output.numel(), op, "input",
                    "[N, C, H, W] like grad_output", &map);
  }
  const int64_t rows = s.rows(), maps = s.rank * map.HW;
  const at::Tensor w1 = fc1_weight.contiguous(), w2 = fc2_weight.contiguous(), ws = spatial_weight.contiguous(),
                   bs = spatial_bias.contiguous(), g = gamma.contiguous();
  at::Tensor grad_fc1_weight = at::empty_like(w1), grad_fc1_bias = at::empty({s.hidden}, w1.options()),
             grad_fc2_weight = at::empty_like(w2), grad_fc2_bias = at::empty({rows}, w2.options()),
             grad_spatial_weight = at::empty_like(ws), grad_spatial_bias = at::empty_like(bs),
             grad_gamma = at::empty_like(g);
  at::Tensor grad_input = needs_input_grad ? at::empty_like(grad_output) : at::empty({0}, grad_output.options());
  const int64_t partials = cuda::row_partial_count(s.N, rows, map.HW);
  // gates (channel, spatial), spatial_sum, the reduction's partials, channel_sum, the logits' and the
  // hidden layer's gradients, the descriptors' gradients
  Scratch scratch{at::empty({s.N * (rows + 2 * maps + 2 * rows + s.hidden + s.C + 2 * map.HW) + partials},
                            grad_output.options().dtype(accumulate_dtype(grad_output.scalar_type())))};
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad_output.scalar_type(), "residual_attention_backward_cuda", [&] {
    typedef typename math::AccumulateType<scalar_t>::type acc_t;
    typedef typename KernelType<scalar_t>::type kernel_t;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    acc_t* gate_channel = scratch.take<acc_t>(s.N * rows);
    acc_t* gate_spatial = scratch.take<acc_t>(s.N * maps);
    acc_t* spatial_sum = scratch.take<acc_t>(s.N * maps);
    acc_t* sum_partial = scratch.take<acc_t>(partials);
    acc_t* channel_sum = scratch.take<acc_t>(s.N * rows);
    acc_t* grad_channel_logits = scratch.take<acc_t>(s.N * rows);
    acc_t* grad_hidden = scratch.take<acc_t>(s.N * s.hidden);
    acc_t* grad_channel_mean = scratch.take<acc_t>(s.N * s.C);
    acc_t* grad_spatial = scratch.take<acc_t>(s.N * 2 * map.HW);
    const kernel_t* kept = multiplicative ? kernel_ptr<scalar_t>(input_for_reduce) : nullptr;
    check_launch(cuda::attention_branch_gates<kernel_t, acc_t>(s, kernel_ptr<scalar_t>(channel_logits),
                                                               kernel_ptr<scalar_t>(spatial), kernel_ptr<scalar_t>(ws),
                                                               kernel_ptr<scalar_t>(bs), kernel_ptr<scalar_t>(g),
                                                               gate_channel, gate_spatial, stream),
                 op);
    check_launch(cuda::attention_backward_reduce_partials(kernel_ptr<scalar_t>(grad_output), kept, gate_channel,
                                                          gate_spatial, s.N, s.C, map.HW, static_cast<int>(s.rank),
                                                          multiplicative, spatial_sum, sum_partial, stream),
                 op);
    check_launch(cuda::attention_branch_backward<kernel_t, acc_t>(
                     s, sum_partial, spatial_sum, gate_spatial, kernel_ptr<scalar_t>(channel_logits),
                     kernel_ptr<scalar_t>(hidden_pre), kernel_ptr<scalar_t>(w1), kernel_ptr<scalar_t>(w2),
                     kernel_ptr<scalar_t>(ws), kernel_ptr<scalar_t>(g), channel_sum, grad_channel_logits,
                     grad_hidden, grad_channel_mean, grad_spatial, stream),
                 op);
    check_launch(cuda::attention_branch_parameter_grads<kernel_t, acc_t>(
                     s, channel_sum, grad_channel_logits, grad_hidden, spatial_sum, gate_spatial,
                     kernel_ptr<scalar_t>(channel_mean), kernel_ptr<scalar_t>(spatial),
                     kernel_ptr<scalar_t>(hidden_pre), kernel_ptr<scalar_t>(channel_logits),
                     kernel_mutable_ptr<scalar_t>(grad_fc1_weight), kernel_mutable_ptr<scalar_t>(grad_fc1_bias),
                     kernel_mutable_ptr<scalar_t>(grad_fc2_weight), kernel_mutable_ptr<scalar_t>(grad_fc2_bias),
                     kernel_mutable_ptr<scalar_t>(grad_spatial_weight),
                     kernel_mutable_ptr<scalar_t>(grad_spatial_bias), kernel_mutable_ptr<scalar_t>(grad_gamma),
                     stream),
                 op);
    if (needs_input_grad) {
      check_launch(cuda::attention_input_grad(kernel_ptr<scalar_t>(grad_output), gate_channel, gate_spatial,
                                              grad_channel_mean, grad_spatial, argmax.data_ptr<int32_t>(), s.N, s.C,
                                              map.HW, static_cast<int>(s.rank), multiplicative,
                                              kernel_mutable_ptr<scalar_t>(grad_input), stream),
                   op);
    }
  });
  return std::make_tuple(grad_input, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias,
                         grad_spatial_weight, grad_spatial_bias, grad_gamma);
}

}  // namespace
}  // namespace ops
}  // namespace da2ext

TORCH_LIBRARY_IMPL(da2ext, CUDA, m) {
  m.impl("residual_attention_forward", &da2ext::ops::residual_attention_forward_cuda);
  m.impl("residual_attention_backward", &da2ext::ops::residual_attention_backward_cuda);
}

#endif  // torch >= 1.11
