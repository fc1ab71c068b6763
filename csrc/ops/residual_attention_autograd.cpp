// The whole adaptor as one op with its autograd in C++ (docs/design.md §2, "The
// adaptor in one dispatch"): da2ext::residual_attention runs
// residual_attention_forward, keeps what its backward needs, and records a C++
// autograd node whose backward is residual_attention_backward. So one adaptor
// forward + backward is one trip through the dispatcher from Python and one node
// for the autograd engine, with no Python between the passes: a Python
// torch.autograd.Function around the same two ops cost about as much as the ops
// themselves on small maps (its ctx, save_for_backward and backward call).
//
// The same layout as torchvision's csrc/ops/autograd: a torch::autograd::Function
// registered for the Autograd key, and the op's CPU kernel for where autograd is
// off (inference mode, or below this node). What is kept goes through
// ctx->save_for_backward (saved-tensor hooks see it, as da2ext.saved_bytes counts
// it); its backward is not differentiable (as the Python path's once_differentiable):
// a second-order gradient through it raises instead of coming out silently wrong.
//
// On the CPU and CUDA, as the two ops it calls; torch >= 1.11, as they.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/version.h>

#include <tuple>

#include "memory_order.h"

#if TORCH_VERSION_MAJOR > 1 || (TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR >= 11)

namespace da2ext {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardResults = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResults =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResults forward_op(const at::Tensor& input, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                          const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, const at::Tensor& spatial_weight,
                          const at::Tensor& spatial_bias, const at::Tensor& gamma, bool multiplicative) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("da2ext::residual_attention_forward", "")
                       .typed<ForwardResults(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma,
                 multiplicative);
}

BackwardResults backward_op(const at::Tensor& grad_output, const c10::optional<at::Tensor>& input,
                            const at::Tensor& channel_mean, const at::Tensor& spatial, const at::Tensor& argmax,
                            const at::Tensor& hidden_pre, const at::Tensor& channel_logits, const at::Tensor& gamma,
                            const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                            const at::Tensor& spatial_weight, const at::Tensor& spatial_bias, bool multiplicative,
                            bool needs_input_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("da2ext::residual_attention_backward", "")
                       .typed<BackwardResults(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                              bool)>();
  return op.call(grad_output, input, channel_mean, spatial, argmax, hidden_pre, channel_logits, gamma, fc1_weight,
                 fc2_weight, spatial_weight, spatial_bias, multiplicative, needs_input_grad);
}

c10::optional<at::Tensor> optional_input(const at::Tensor& kept_input) {
  return kept_input.defined() ? c10::optional<at::Tensor>(kept_input) : c10::nullopt;
}

variable_list as_list(const BackwardResults& grads) {
  return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads),
          std::get<4>(grads), std::get<5>(grads), std::get<6>(grads), std::get<7>(grads)};
}

// The gradients of the adaptor's backward, as a node of their own only when a
// second-order graph is being built (backward under create_graph=True): that
// node's backward refuses, as the Python path's once_differentiable does.
class ResidualAttentionBackwardFunction : public torch::autograd::Function<ResidualAttentionBackwardFunction> {
 public:
  // residual_attention_backward's arguments, each tensor one argument (the autograd
  // Function sees which inputs need gradients argument by argument).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output,
                               const c10::optional<at::Tensor>& kept_input,
                               const at::Tensor& channel_mean, const at::Tensor& spatial, const at::Tensor& argmax,
                               const at::Tensor& hidden_pre, const at::Tensor& channel_logits,
                               const at::Tensor& gamma, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                               const at::Tensor& spatial_weight, const at::Tensor& spatial_bias, bool multiplicative,
                               bool needs_input_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const BackwardResults grads =
        backward_op(grad_output, kept_input, channel_mean, spatial, argmax, hidden_pre,
                    channel_logits, gamma, fc1_weight, fc2_weight, spatial_weight, spatial_bias, multiplicative,
                    needs_input_grad);
    return as_list(grads);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    TORCH_CHECK(false, "residual_attention: its backward is not differentiable (no second-order gradients through "
                       "the fused adaptor; da2ext.reference.residual_attention_reference has them)");
    return {};
  }
};

class ResidualAttentionFunction : public torch::autograd::Function<ResidualAttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& fc1_weight,
                            const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                            const at::Tensor& spatial_weight, const at::Tensor& spatial_bias,
                            const at::Tensor& gamma, bool multiplicative,
                            c10::optional<at::ScalarType> saved_input_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor y, channel_mean, spatial, argmax, hidden_pre, channel_logits;
    std::tie(y, channel_mean, spatial, argmax, hidden_pre, channel_logits) = forward_op(
        input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma, multiplicative);
    // Mode mul keeps F (optionally as a float16 copy); mode add keeps nothing of size N*C*H*W.
    at::Tensor kept_input;
    if (multiplicative) {
      const bool convert = saved_input_dtype.has_value() && *saved_input_dtype != input.scalar_type();
      kept_input = convert ? input.to(*saved_input_dtype) : input;
    }
    ctx->save_for_backward({channel_mean, spatial, argmax, hidden_pre, channel_logits, gamma, kept_input, fc1_weight,
                            fc2_weight, spatial_weight, spatial_bias});
    ctx->saved_data["multiplicative"] = multiplicative;
    // The kernels read the gradient in the input's memory order.
    ctx->saved_data["channels_last"] = is_channels_last(input);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const bool multiplicative = ctx->saved_data["multiplicative"].toBool();
    const bool needs_input_grad = ctx->needs_input_grad(0);
    const at::Tensor grad_output = grad_outputs[0].contiguous(
        ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    // saved: channel_mean, spatial, argmax, hidden_pre, channel_logits, gamma, kept_input, fc1_weight,
    // fc2_weight, spatial_weight, spatial_bias
    variable_list grads;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a node that refuses to be differentiated
      grads = ResidualAttentionBackwardFunction::apply(grad_output, optional_input(saved[6]), saved[0], saved[1],
                                                       saved[2], saved[3], saved[4], saved[5], saved[7], saved[8],
                                                       saved[9], saved[10], multiplicative, needs_input_grad);
    } else {
      // Below the Autograd key: the op has no autograd kernel of its own, and PyTorch's
      // fallback for such ops would check each of its fourteen arguments on every call.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      grads = as_list(backward_op(grad_output, optional_input(saved[6]), saved[0], saved[1], saved[2], saved[3],
                                  saved[4], saved[5], saved[7], saved[8], saved[9], saved[10], multiplicative,
                                  needs_input_grad));
    }
    if (!needs_input_grad) {
      grads[0] = at::Tensor();  // the op returned an empty placeholder
    }
    grads.emplace_back();  // multiplicative
    grads.emplace_back();  // saved_input_dtype
    return grads;
  }
};

at::Tensor residual_attention_autograd(const at::Tensor& input, const at::Tensor& fc1_weight,
                                       const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                       const at::Tensor& fc2_bias, const at::Tensor& spatial_weight,
                                       const at::Tensor& spatial_bias, const at::Tensor& gamma, bool multiplicative,
                                       c10::optional<at::ScalarType> saved_input_dtype) {
  return ResidualAttentionFunction::apply(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight,
                                          spatial_bias, gamma, multiplicative, saved_input_dtype);
}

// Where autograd is off (inference mode; or called from below the Autograd key): the forward alone.
at::Tensor residual_attention_no_autograd(const at::Tensor& input, const at::Tensor& fc1_weight,
                                          const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                          const at::Tensor& fc2_bias, const at::Tensor& spatial_weight,
                                          const at::Tensor& spatial_bias, const at::Tensor& gamma,
                                          bool multiplicative, c10::optional<at::ScalarType> /*saved_input_dtype*/) {
  return std::get<0>(forward_op(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias,
                                gamma, multiplicative));
}

}  // namespace
}  // namespace ops
}  // namespace da2ext

TORCH_LIBRARY_FRAGMENT(da2ext, m) {
  // y = F + gamma*A (multiplicative false) or F * (1 + gamma*A), with autograd; mode mul keeps F for
  // backward, in saved_input_dtype if given.
  m.def(
      "residual_attention(Tensor input, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, "
      "Tensor spatial_weight, Tensor spatial_bias, Tensor gamma, bool multiplicative, "
      "ScalarType? saved_input_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(da2ext, Autograd, m) {
  m.impl("residual_attention", &da2ext::ops::residual_attention_autograd);
}

TORCH_LIBRARY_IMPL(da2ext, CPU, m) {
  m.impl("residual_attention", &da2ext::ops::residual_attention_no_autograd);
}

#ifdef DA2EXT_WITH_CUDA
// The CUDA forward and backward ops (cuda/residual_attention_one_op_cuda.cpp) run under the same node.
TORCH_LIBRARY_IMPL(da2ext, CUDA, m) {
  m.impl("residual_attention", &da2ext::ops::residual_attention_no_autograd);
}
#endif

#endif  // torch >= 1.11
