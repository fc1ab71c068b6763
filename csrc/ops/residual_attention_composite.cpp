// The adaptor's forward and its backward as one op each (docs/design.md §2, "The
// adaptor in one dispatch"): residual_attention_forward and residual_attention_backward
// run the three heavy passes (descriptor_pool, attention_apply; attention_backward_reduce,
// attention_input_grad) and the small branch between them (the channel MLP, the spatial
// conv, the gates and their gradients) from C++. The autograd node of
// torch.ops.da2ext.residual_attention (residual_attention_autograd.cpp) calls them, so
// that one adaptor forward + backward is one trip through the dispatcher from Python
// instead of about seventy. Where compute is nothing (small maps, small batches) those
// trips were the whole cost.
//
// The maths is the op-by-op path's (ops/residual_attention.py): the small branch in
// the feature map's dtype in forward, the gates and every gradient of the small branch
// in the accumulation dtype (float32 for float16/float32 maps, float64 for float64),
// the parameters' gradients cast back to their dtypes. Where the branch is small (and
// the map float32 or float64) it runs as loops (cpu/attention_branch_loops.cpp), which
// round differently from BLAS; above that, the same ATen calls as that path, op for op.
//
// Registered for the CPU (the CUDA build keeps the Python path until these have
// run on a GPU). Needs torch >= 1.11 (at::convolution_backward); older torch
// (the Jetson's 1.10) builds without them and keeps the Python path.
#include "residual_attention.h"

#include "memory_order.h"
#include "cpu/attention_branch_loops.h"
#include "cpu/residual_attention_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/version.h>

#include <tuple>
#include <vector>

#if TORCH_VERSION_MAJOR > 1 || (TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR >= 11)
#define DA2EXT_COMPOSITE_ADAPTOR 1
#endif

#ifdef DA2EXT_COMPOSITE_ADAPTOR

namespace da2ext {
namespace ops {
namespace {

using Pooled = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Sums = std::tuple<at::Tensor, at::Tensor>;

// The heavy passes through the dispatcher: the input's device picks the kernel.
Pooled descriptor_pool(const at::Tensor& input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("da2ext::descriptor_pool", "")
                       .typed<Pooled(const at::Tensor&)>();
  return op.call(input);
}

at::Tensor attention_apply(const at::Tensor& input, const at::Tensor& gate_channel, const at::Tensor& gate_spatial,
                           bool multiplicative) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("da2ext::attention_apply", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(input, gate_channel, gate_spatial, multiplicative);
}

Sums attention_backward_reduce(const at::Tensor& grad_output, const c10::optional<at::Tensor>& input,
                               const at::Tensor& gate_channel, const at::Tensor& gate_spatial, bool multiplicative) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("da2ext::attention_backward_reduce", "")
                       .typed<Sums(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                   const at::Tensor&, bool)>();
  return op.call(grad_output, input, gate_channel, gate_spatial, multiplicative);
}

at::Tensor attention_input_grad(const at::Tensor& grad_output, const at::Tensor& gate_channel,
                                const at::Tensor& gate_spatial, const at::Tensor& grad_channel_mean,
                                const at::Tensor& grad_spatial, const at::Tensor& argmax, bool multiplicative) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("da2ext::attention_input_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(grad_output, gate_channel, gate_spatial, grad_channel_mean, grad_spatial, argmax, multiplicative);
}

// The spatial conv (2 -> k, K x K, padding K/2) on the CPU picks PyTorch's im2col kernel
// on maps of at most 28 x 28, where it beats oneDNN (ops/attention_branch.py measures why).
constexpr int64_t kIm2colMaxPixels = 28 * 28;

bool uses_im2col(const at::Tensor& spatial) {
  return spatial.is_cpu() && (spatial.scalar_type() == at::kFloat || spatial.scalar_type() == at::kDouble) &&
         spatial.size(2) * spatial.size(3) <= kIm2colMaxPixels;
}

at::Tensor spatial_logits(const at::Tensor& spatial, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t size = weight.size(-1), padding = size / 2;
  if (uses_im2col(spatial)) {
    return at::thnn_conv2d(spatial, weight, {size, size}, bias, {1, 1}, {padding, padding});
  }
  return at::conv2d(spatial, weight, bias, {1, 1}, {padding, padding});
}

// (grad spatial, grad weight, grad bias) of spatial_logits.
using ConvGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

ConvGrads spatial_logits_backward(const at::Tensor& grad, const at::Tensor& spatial, const at::Tensor& weight) {
  const int64_t size = weight.size(-1), padding = size / 2;
  if (uses_im2col(spatial)) {
    return at::_slow_conv2d_backward(grad, spatial, weight, {size, size}, {1, 1}, {padding, padding},
                                     {true, true, true});
  }
  return at::convolution_backward(grad, spatial, weight, std::vector<int64_t>{weight.size(0)}, {1, 1},
                                  {padding, padding}, {1, 1}, false, {0, 0}, 1, {true, true, true});
}

// The small branch as loops (cpu/attention_branch_loops.h) where its arithmetic is
// this small: about the cost of the ATen calls it replaces; above, BLAS and oneDNN win.
constexpr int64_t kBranchLoopMaxMacs = int64_t(1) << 18;

bool branch_as_loops(const at::Tensor& input, const BranchShape& s) {
  if (!input.is_cpu() || (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble)) {
    return false;
  }
  const int64_t mlp = s.N * s.hidden * s.C * (1 + s.rank), conv = s.N * s.rank * s.HW() * 2 * s.K * s.K;
  return mlp <= kBranchLoopMaxMacs && conv <= kBranchLoopMaxMacs;
}

struct Gates {
  at::Tensor channel_sigmoid, gate_channel, gate_spatial;
};

// sigmoid(a_c), gate_channel = gamma * sigmoid(a_c), gate_spatial = sigmoid(a_s) in the
// accumulation dtype, in the kernels' layouts: [N, C] and [N, H, W] at rank 1 (gamma a
// vector), [N, k, C] and [N, k, H, W] at rank k.
Gates gates(const at::Tensor& channel_logits, const at::Tensor& spatial_logits, const at::Tensor& gamma,
            at::ScalarType acc) {
  const int64_t n = channel_logits.size(0), rank = spatial_logits.size(1), c = gamma.size(-1);
  const bool stacked = gamma.dim() == 2;
  Gates g;
  g.channel_sigmoid = channel_logits.to(acc).sigmoid();
  g.channel_sigmoid = stacked ? g.channel_sigmoid.view({n, rank, c}) : g.channel_sigmoid.view({n, c});
  g.gate_channel = (gamma.to(acc) * g.channel_sigmoid).contiguous();
  g.gate_spatial = spatial_logits.to(acc).sigmoid();
  g.gate_spatial = (stacked ? g.gate_spatial : g.gate_spatial.squeeze(1)).contiguous();
  return g;
}

// (y, channel_mean [N, C], spatial [N, 2, H, W], argmax [N, H, W], hidden_pre [N, hidden],
// channel_logits [N, k*C]): y and what backward needs, the spatial logits left to recompute.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_attention_forward(
    const at::Tensor& input, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
    const at::Tensor& fc2_bias, const at::Tensor& spatial_weight, const at::Tensor& spatial_bias,
    const at::Tensor& gamma, bool multiplicative) {
  const char* op = "residual_attention_forward";
  const FeatureShape map = check_feature_map(input, op, "input", /*allow_channels_last=*/true);
  check_branch(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma, op);
  const BranchShape shape = branch_shape(map, fc1_weight, spatial_weight);
  if (branch_as_loops(input, shape)) {
    // Every pass called directly (cpu/residual_attention_kernel.h); the gates in one scratch buffer.
    at::Tensor channel_mean, spatial, argmax;
    std::tie(channel_mean, spatial, argmax) = allocate_pool_outputs(input, map);
    at::Tensor hidden_pre = at::empty({shape.N, shape.hidden}, input.options());
    at::Tensor channel_logits = at::empty({shape.N, shape.rows()}, input.options());
    at::Tensor y = empty_in_memory_order(input);
    const at::Tensor w1 = fc1_weight.contiguous(), b1 = fc1_bias.contiguous(), w2 = fc2_weight.contiguous(),
                     b2 = fc2_bias.contiguous(), ws = spatial_weight.contiguous(), bs = spatial_bias.contiguous(),
                     g = gamma.contiguous();
    const int64_t channel_gates = shape.N * shape.rows(), spatial_gates = shape.N * shape.rank * shape.HW();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "residual_attention_forward", [&] {
      const std::unique_ptr<scalar_t[]> gates = cpu::uninitialized_buffer<scalar_t>(channel_gates + spatial_gates);
      scalar_t *gate_channel = gates.get(), *gate_spatial = gates.get() + channel_gates;
      cpu::descriptor_pool(input.data_ptr<scalar_t>(), map, channel_mean.data_ptr<scalar_t>(),
                           spatial.data_ptr<scalar_t>(), argmax.data_ptr<int32_t>());
      cpu::branch_forward(shape, channel_mean.data_ptr<scalar_t>(), spatial.data_ptr<scalar_t>(),
                          w1.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                          b2.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), bs.data_ptr<scalar_t>(),
                          hidden_pre.data_ptr<scalar_t>(), channel_logits.data_ptr<scalar_t>(), gate_spatial);
      const at::Tensor channel_sigmoid = channel_logits.sigmoid();  // vectorised exponentials
      cpu::channel_gates(shape, channel_sigmoid.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gate_channel);
      cpu::attention_apply(cpu::mode_of(multiplicative), input.data_ptr<scalar_t>(), gate_channel, gate_spatial,
                           static_cast<int>(shape.rank), map, y.data_ptr<scalar_t>());
    });
    return std::make_tuple(y, channel_mean, spatial, argmax, hidden_pre, channel_logits);
  }
  at::Tensor channel_mean, spatial, argmax;
  std::tie(channel_mean, spatial, argmax) = descriptor_pool(input);
  at::Tensor hidden_pre = at::addmm(fc1_bias, channel_mean, fc1_weight.t());
  at::Tensor channel_logits = at::addmm(fc2_bias, hidden_pre.relu(), fc2_weight.t());
  const Gates g = gates(channel_logits, spatial_logits(spatial, spatial_weight, spatial_bias), gamma,
                        accumulate_dtype(input.scalar_type()));
  at::Tensor y = attention_apply(input, g.gate_channel, g.gate_spatial, multiplicative);
  return std::make_tuple(y, channel_mean, spatial, argmax, hidden_pre, channel_logits);
}

using BackwardGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// residual_attention_backward with the small branch as loops (float32 or float64 on the CPU,
// where the accumulation dtype is the map's own): every pass called directly, the gates,
// the attention sums and the descriptors' gradients in one scratch buffer.
BackwardGrads branch_backward_as_loops(const at::Tensor& grad_output, const FeatureShape& map,
                                       const c10::optional<at::Tensor>& input_for_reduce,
                                       const at::Tensor& channel_mean, const at::Tensor& spatial,
                                       const at::Tensor& argmax, const at::Tensor& hidden_pre,
                                       const at::Tensor& channel_logits, const at::Tensor& gamma,
                                       const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                                       const at::Tensor& spatial_weight, const at::Tensor& spatial_bias,
                                       bool multiplicative, bool needs_input_grad, const BranchShape& shape) {
  const at::TensorOptions options = grad_output.options();
  const at::Tensor w1 = fc1_weight.contiguous(), w2 = fc2_weight.contiguous(), ws = spatial_weight.contiguous(),
                   bs = spatial_bias.contiguous(), g = gamma.contiguous();
  at::Tensor grad_fc1_weight = at::empty_like(w1), grad_fc1_bias = at::empty({shape.hidden}, options),
             grad_fc2_weight = at::empty_like(w2), grad_fc2_bias = at::empty({shape.rows()}, options),
             grad_spatial_weight = at::empty_like(ws), grad_spatial_bias = at::empty({shape.rank}, options),
             grad_gamma = at::empty_like(g);
  at::Tensor grad_input = needs_input_grad ? empty_in_memory_order(grad_output) : at::empty({0}, options);
  const at::Tensor channel_sigmoid = channel_logits.sigmoid();  // vectorised exponentials
  const int64_t N = shape.N, rows = shape.rows(), maps = shape.rank * shape.HW();
  const int k = static_cast<int>(shape.rank);
  const math::Mode mode = cpu::mode_of(multiplicative);
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "residual_attention_backward", [&] {
    // the gates ([N, k*C], [N, k, H*W]), the attention sums (the same two), the descriptors'
    // gradients ([N, C], [N, 2, H*W])
    const std::unique_ptr<scalar_t[]> scratch =
        cpu::uninitialized_buffer<scalar_t>(2 * N * (rows + maps) + N * (shape.C + 2 * shape.HW()));
    scalar_t* gate_channel = scratch.get();
    scalar_t* gate_spatial = gate_channel + N * rows;
    scalar_t* channel_sum = gate_spatial + N * maps;
    scalar_t* spatial_sum = channel_sum + N * rows;
    scalar_t* grad_channel_mean = spatial_sum + N * maps;
    scalar_t* grad_spatial = grad_channel_mean + N * shape.C;
    const scalar_t* grad = grad_output.data_ptr<scalar_t>();
    cpu::spatial_gates(shape, spatial.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(), bs.data_ptr<scalar_t>(),
                       gate_spatial);
    cpu::channel_gates(shape, channel_sigmoid.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gate_channel);
    cpu::attention_backward_reduce(mode, grad, multiplicative ? input_for_reduce->data_ptr<scalar_t>() : nullptr,
                                   gate_channel, gate_spatial, k, map, channel_sum, spatial_sum);
    cpu::branch_backward(shape, channel_mean.data_ptr<scalar_t>(), spatial.data_ptr<scalar_t>(),
                         hidden_pre.data_ptr<scalar_t>(), channel_sigmoid.data_ptr<scalar_t>(), gate_spatial,
                         channel_sum, spatial_sum, w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
                         ws.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), grad_fc1_weight.data_ptr<scalar_t>(),
                         grad_fc1_bias.data_ptr<scalar_t>(), grad_fc2_weight.data_ptr<scalar_t>(),
                         grad_fc2_bias.data_ptr<scalar_t>(), grad_spatial_weight.data_ptr<scalar_t>(),
                         grad_spatial_bias.data_ptr<scalar_t>(), grad_gamma.data_ptr<scalar_t>(), grad_channel_mean,
                         grad_spatial);
    if (needs_input_grad) {
      cpu::attention_input_grad(mode, grad, gate_channel, gate_spatial, grad_channel_mean, grad_spatial,
                                argmax.data_ptr<int32_t>(), k, map, grad_input.data_ptr<scalar_t>());
    }
  });
  return std::make_tuple(grad_input, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias,
                         grad_spatial_weight, grad_spatial_bias, grad_gamma);
}

// (grad input, or an empty tensor where not `needs_input_grad`; then the gradients of
// fc1.weight, fc1.bias, fc2.weight, fc2.bias, spatial.weight, spatial.bias, gamma).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
residual_attention_backward(const at::Tensor& grad_output, const c10::optional<at::Tensor>& input,
                            const at::Tensor& channel_mean, const at::Tensor& spatial, const at::Tensor& argmax,
                            const at::Tensor& hidden_pre, const at::Tensor& channel_logits, const at::Tensor& gamma,
                            const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                            const at::Tensor& spatial_weight, const at::Tensor& spatial_bias, bool multiplicative,
                            bool needs_input_grad) {
  const char* op = "residual_attention_backward";
  const FeatureShape map = check_feature_map(grad_output, op, "grad_output", /*allow_channels_last=*/true);
  TORCH_CHECK(!multiplicative || (input.has_value() && input->defined()), op,
              ": mode mul needs the forward's input (input is None)");
  check_branch_weights(grad_output, fc1_weight, fc2_weight, spatial_weight, spatial_bias, gamma, op);
  check_saved(grad_output, map, channel_mean, spatial, argmax, hidden_pre, channel_logits, fc1_weight, fc2_weight, op);
  const at::ScalarType acc = accumulate_dtype(grad_output.scalar_type());
  // Mode mul's reduction reads F (kept in forward, maybe in float16) in the gradient's dtype and memory order.
  c10::optional<at::Tensor> input_for_reduce;
  if (multiplicative) {
    input_for_reduce = input->to(grad_output.scalar_type());
    check_companion(*input_for_reduce, grad_output, grad_output.scalar_type(), grad_output.numel(), op, "input",
                    "[N, C, H, W] like grad_output", &map);
  }
  const BranchShape shape = branch_shape(map, fc1_weight, spatial_weight);
  if (branch_as_loops(grad_output, shape)) {
    return branch_backward_as_loops(grad_output, map, input_for_reduce, channel_mean, spatial, argmax, hidden_pre,
                                    channel_logits, gamma, fc1_weight, fc2_weight, spatial_weight, spatial_bias,
                                    multiplicative, needs_input_grad, shape);
  }
  const Gates g = gates(channel_logits, spatial_logits(spatial, spatial_weight, spatial_bias), gamma, acc);
  at::Tensor channel_sum, spatial_sum;
  std::tie(channel_sum, spatial_sum) =
      attention_backward_reduce(grad_output, input_for_reduce, g.gate_channel, g.gate_spatial, multiplicative);

  at::Tensor grad_gamma = (g.channel_sigmoid * channel_sum).sum(0).to(gamma.scalar_type());
  const at::Tensor gamma_acc = gamma.to(acc);
  // Rank k: the sums come as [N, k, C] and [N, k, H, W]; the logits are [N, k*C] and [N, k, H, W].
  at::Tensor grad_channel_logits =
      (gamma_acc * g.channel_sigmoid * (1 - g.channel_sigmoid) * channel_sum).reshape(channel_logits.sizes());
  at::Tensor grad_spatial_logits =
      (g.gate_spatial * (1 - g.gate_spatial) * spatial_sum).reshape({spatial.size(0), spatial_weight.size(0),
                                                                     spatial.size(2), spatial.size(3)});

  // The small branch's backward in the accumulation dtype (its one-element spatial bias
  // gradient sums N*H*W terms that largely cancel: see ops/residual_attention.py).
  const at::Tensor hidden = hidden_pre.to(acc);
  at::Tensor grad_fc2_weight = grad_channel_logits.t().mm(hidden.relu());
  at::Tensor grad_fc2_bias = grad_channel_logits.sum(0);
  // relu' = 1 where the pre-activation is positive, as autograd's relu backward
  at::Tensor grad_hidden = grad_channel_logits.mm(fc2_weight.to(acc)) * hidden.gt(0).to(acc);
  at::Tensor grad_fc1_weight = grad_hidden.t().mm(channel_mean.to(acc));
  at::Tensor grad_fc1_bias = grad_hidden.sum(0);
  at::Tensor grad_spatial, grad_spatial_weight, grad_spatial_bias;
  std::tie(grad_spatial, grad_spatial_weight, grad_spatial_bias) =
      spatial_logits_backward(grad_spatial_logits, spatial.to(acc), spatial_weight.to(acc));

  at::Tensor grad_input = at::empty({0}, grad_output.options());
  if (needs_input_grad) {
    at::Tensor grad_channel_mean = grad_hidden.mm(fc1_weight.to(acc));
    grad_input = attention_input_grad(grad_output, g.gate_channel, g.gate_spatial, grad_channel_mean.contiguous(),
                                      grad_spatial.contiguous(), argmax, multiplicative);
  }
  const at::ScalarType fc1 = fc1_weight.scalar_type(), fc2 = fc2_weight.scalar_type(),
                       conv = spatial_weight.scalar_type();
  return std::make_tuple(grad_input, grad_fc1_weight.to(fc1), grad_fc1_bias.to(fc1), grad_fc2_weight.to(fc2),
                         grad_fc2_bias.to(fc2), grad_spatial_weight.to(conv), grad_spatial_bias.to(conv),
                         grad_gamma);
}

}  // namespace
}  // namespace ops
}  // namespace da2ext

TORCH_LIBRARY_FRAGMENT(da2ext, m) {
  // The whole adaptor forward: (y, channel_mean, spatial, argmax, hidden_pre, channel_logits).
  m.def(
      "residual_attention_forward(Tensor input, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, "
      "Tensor fc2_bias, Tensor spatial_weight, Tensor spatial_bias, Tensor gamma, bool multiplicative) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The whole adaptor backward: (grad input (empty unless needs_input_grad), grad fc1.weight, fc1.bias,
  // fc2.weight, fc2.bias, spatial.weight, spatial.bias, gamma).
  m.def(
      "residual_attention_backward(Tensor grad_output, Tensor? input, Tensor channel_mean, Tensor spatial, "
      "Tensor argmax, Tensor hidden_pre, Tensor channel_logits, Tensor gamma, Tensor fc1_weight, "
      "Tensor fc2_weight, Tensor spatial_weight, Tensor spatial_bias, bool multiplicative, bool needs_input_grad) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(da2ext, CPU, m) {
  m.impl("residual_attention_forward", &da2ext::ops::residual_attention_forward);
  m.impl("residual_attention_backward", &da2ext::ops::residual_attention_backward);
}

#endif  // DA2EXT_COMPOSITE_ADAPTOR
