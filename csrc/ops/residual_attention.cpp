// Schema of the residual attention adaptor ops and the checks both backends share.
// The implementations register themselves per device (cpu/, cuda/), so that
// torch.ops.da2ext.* dispatches on the input's device like any ATen op.
#include "residual_attention.h"

#include "memory_order.h"
#include "residual_attention_math.h"

#include <torch/library.h>

#include <limits>

namespace da2ext {
namespace ops {

at::ScalarType accumulate_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

FeatureShape check_feature_map(const at::Tensor& t, const char* op, const char* name, bool allow_channels_last) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D tensor (N, C, H, W), got ", t.dim(),
              "-D with shape ", t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kDouble, op, ": ", name,
              " must be float16, float32 or float64, got ", dtype);
  const bool nchw = t.is_contiguous();
  if (allow_channels_last) {
    TORCH_CHECK(nchw || t.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": ", name,
                " must be contiguous in NCHW or in channels_last order (call .contiguous() on strided tensors); "
                "got strides ",
                t.strides(), " for shape ", t.sizes());
  } else {
    TORCH_CHECK(nchw, op, ": ", name,
                " must be contiguous in NCHW order on ", t.device().type(),
                " (call .contiguous() on channels_last or strided tensors); got strides ", t.strides(),
                " for shape ", t.sizes());
  }
  FeatureShape s;
  s.channels_last = is_channels_last(t);
  s.N = t.size(0);
  s.C = t.size(1);
  s.H = t.size(2);
  s.W = t.size(3);
  s.HW = s.H * s.W;
  TORCH_CHECK(s.C > 0 && s.H > 0 && s.W > 0, op, ": ", name,
              " must have at least one channel and a non-empty spatial size, got shape ", t.sizes());
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(s.C <= int_max && s.HW <= int_max, op, ": ", name,
              " must have C and H*W below 2^31 (channel indices are stored as int32), got shape ", t.sizes());
  return s;
}

void check_same_memory_order(const at::Tensor& t, const FeatureShape& s, const char* op, const char* name) {
  const bool ok = s.channels_last ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous();
  TORCH_CHECK(ok, op, ": ", name, " must be contiguous in the same memory order as the feature map (",
              s.channels_last ? "channels_last" : "NCHW", "); got strides ", t.strides(), " for shape ", t.sizes());
}

void check_companion(const at::Tensor& t, const at::Tensor& reference, at::ScalarType dtype, int64_t numel,
                     const char* op, const char* name, const char* expected_shape, const FeatureShape* same_as) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " must be on ", reference.device(),
              " like the feature map, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have shape ", expected_shape, " (", numel,
              " elements), got shape ", t.sizes());
  if (same_as != nullptr) {
    TORCH_CHECK(t.sizes() == reference.sizes(), op, ": ", name, " must have shape ", expected_shape, " ",
                reference.sizes(), ", got ", t.sizes());
    check_same_memory_order(t, *same_as, op, name);
    return;
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_pool_outputs(const at::Tensor& input,
                                                                     const FeatureShape& s) {
  return std::make_tuple(at::empty({s.N, s.C}, input.options()), at::empty({s.N, 2, s.H, s.W}, input.options()),
                         at::empty({s.N, s.H, s.W}, input.options().dtype(at::kInt)));
}

GateRank check_gates(const at::Tensor& feature, const FeatureShape& s, const at::Tensor& gate_channel,
                     const at::Tensor& gate_spatial, const char* op) {
  TORCH_CHECK(gate_channel.defined(), op, ": gate_channel is undefined");
  TORCH_CHECK(gate_spatial.defined(), op, ": gate_spatial is undefined");
  const at::ScalarType acc = accumulate_dtype(feature.scalar_type());
  const bool channel_stacked = gate_channel.dim() == 3, spatial_stacked = gate_spatial.dim() == 4;
  if (!channel_stacked && !spatial_stacked) {  // the rank-1 form, checked as it always was
    check_companion(gate_channel, feature, acc, s.N * s.C, op, "gate_channel", "[N, C]");
    check_companion(gate_spatial, feature, acc, s.N * s.HW, op, "gate_spatial", "[N, H, W]");
    return GateRank{1, false};
  }
  TORCH_CHECK(channel_stacked, op, ": gate_spatial is 4-D ([N, k, H, W], rank k), so gate_channel must be 3-D "
              "[N, k, C] with the same k (a 2-D gate_channel [N, C] goes with a 3-D gate_spatial [N, H, W]); "
              "got gate_channel of shape ", gate_channel.sizes(), " and gate_spatial of shape ", gate_spatial.sizes());
  TORCH_CHECK(spatial_stacked, op, ": gate_channel is 3-D ([N, k, C], rank k), so gate_spatial must be 4-D "
              "[N, k, H, W] with the same k (a 2-D gate_channel [N, C] goes with a 3-D gate_spatial [N, H, W]); "
              "got gate_channel of shape ", gate_channel.sizes(), " and gate_spatial of shape ", gate_spatial.sizes());
  const int64_t k = gate_channel.size(1);
  TORCH_CHECK(k >= 1 && k <= math::kMaxRank, op, ": gate_channel [N, k, C] must have a rank k between 1 and ",
              math::kMaxRank, ", got k = ", k, " (shape ", gate_channel.sizes(), ")");
  TORCH_CHECK(gate_spatial.size(1) == k, op, ": gate_spatial [N, k, H, W] must have the same rank k as gate_channel ",
              "(k = ", k, "), got k = ", gate_spatial.size(1), " (gate_spatial of shape ", gate_spatial.sizes(),
              ", gate_channel of shape ", gate_channel.sizes(), ")");
  check_companion(gate_channel, feature, acc, s.N * k * s.C, op, "gate_channel", "[N, k, C]");
  check_companion(gate_spatial, feature, acc, s.N * k * s.HW, op, "gate_spatial", "[N, k, H, W]");
  TORCH_CHECK(gate_channel.sizes() == at::IntArrayRef({s.N, k, s.C}), op, ": gate_channel must have shape [N, k, C] ",
              at::IntArrayRef({s.N, k, s.C}), ", got ", gate_channel.sizes());
  TORCH_CHECK(gate_spatial.sizes() == at::IntArrayRef({s.N, k, s.H, s.W}), op,
              ": gate_spatial must have shape [N, k, H, W] ", at::IntArrayRef({s.N, k, s.H, s.W}), ", got ",
              gate_spatial.sizes());
  return GateRank{k, true};
}

std::tuple<at::Tensor, at::Tensor> allocate_reduce_outputs(const at::Tensor& feature, const FeatureShape& s,
                                                           const GateRank& rank) {
  const at::TensorOptions options = feature.options().dtype(accumulate_dtype(feature.scalar_type()));
  if (!rank.stacked) {
    return std::make_tuple(at::empty({s.N, s.C}, options), at::empty({s.N, s.H, s.W}, options));
  }
  return std::make_tuple(at::empty({s.N, rank.k, s.C}, options), at::empty({s.N, rank.k, s.H, s.W}, options));
}

void check_descriptor_grads(const at::Tensor& feature, const FeatureShape& s, const at::Tensor& grad_channel_mean,
                            const at::Tensor& grad_spatial, const at::Tensor& argmax, const char* op) {
  const at::ScalarType acc = accumulate_dtype(feature.scalar_type());
  check_companion(grad_channel_mean, feature, acc, s.N * s.C, op, "grad_channel_mean", "[N, C]");
  check_companion(grad_spatial, feature, acc, s.N * 2 * s.HW, op, "grad_spatial", "[N, 2, H, W]");
  check_companion(argmax, feature, at::kInt, s.N * s.HW, op, "argmax", "[N, H, W]");
}

BranchShape branch_shape(const FeatureShape& map, const at::Tensor& fc1_weight, const at::Tensor& spatial_weight) {
  BranchShape s;
  s.N = map.N;
  s.C = map.C;
  s.H = map.H;
  s.W = map.W;
  s.hidden = fc1_weight.size(0);
  s.rank = spatial_weight.size(0);
  s.K = spatial_weight.size(-1);
  return s;
}

void check_parameter(const at::Tensor& input, const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type() && t.device() == input.device(), op,
              ": the adaptor's parameters must have the input's dtype and device (", input.scalar_type(), " on ",
              input.device(), "), got ", t.scalar_type(), " on ", t.device());
}

void check_branch_weights(const at::Tensor& input, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                          const at::Tensor& spatial_weight, const at::Tensor& spatial_bias, const at::Tensor& gamma,
                          const char* op) {
  const int64_t c = input.size(1);
  TORCH_CHECK(gamma.dim() == 1 || gamma.dim() == 2, op, ": gamma must be [C] or [k, C], got shape ", gamma.sizes());
  const int64_t rank = gamma.dim() == 2 ? gamma.size(0) : 1;
  TORCH_CHECK(gamma.size(-1) == c, op, ": gamma must have C = ", c, " entries per row, got shape ", gamma.sizes());
  TORCH_CHECK(fc1_weight.dim() == 2 && fc1_weight.size(1) == c, op, ": fc1_weight must be [hidden, C = ", c,
              "], got shape ", fc1_weight.sizes());
  const int64_t hidden = fc1_weight.size(0);
  TORCH_CHECK(fc2_weight.dim() == 2 && fc2_weight.size(0) == rank * c && fc2_weight.size(1) == hidden, op,
              ": fc2_weight must be [k*C = ", rank * c, ", hidden = ", hidden, "], got shape ", fc2_weight.sizes());
  TORCH_CHECK(spatial_weight.dim() == 4 && spatial_weight.size(0) == rank && spatial_weight.size(1) == 2 &&
                  spatial_weight.size(2) == spatial_weight.size(3) && spatial_weight.size(2) % 2 == 1,
              op, ": spatial_weight must be [k = ", rank, ", 2, K, K] with K odd, got shape ", spatial_weight.sizes());
  TORCH_CHECK(spatial_bias.dim() == 1 && spatial_bias.size(0) == rank, op, ": spatial_bias must be [k = ", rank,
              "], got shape ", spatial_bias.sizes());
  for (const at::Tensor* t : {&fc1_weight, &fc2_weight, &spatial_weight, &spatial_bias, &gamma}) {
    check_parameter(input, *t, op);
  }
}

void check_branch(const at::Tensor& input, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
                  const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, const at::Tensor& spatial_weight,
                  const at::Tensor& spatial_bias, const at::Tensor& gamma, const char* op) {
  check_branch_weights(input, fc1_weight, fc2_weight, spatial_weight, spatial_bias, gamma, op);
  const int64_t hidden = fc1_weight.size(0), rows = fc2_weight.size(0);
  TORCH_CHECK(fc1_bias.dim() == 1 && fc1_bias.size(0) == hidden, op, ": fc1_bias must be [", hidden, "], got shape ",
              fc1_bias.sizes());
  TORCH_CHECK(fc2_bias.dim() == 1 && fc2_bias.size(0) == rows, op, ": fc2_bias must be [k*C = ", rows,
              "], got shape ", fc2_bias.sizes());
  check_parameter(input, fc1_bias, op);
  check_parameter(input, fc2_bias, op);
}

void check_saved(const at::Tensor& grad_output, const FeatureShape& s, const at::Tensor& channel_mean,
                 const at::Tensor& spatial, const at::Tensor& argmax, const at::Tensor& hidden_pre,
                 const at::Tensor& channel_logits, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
                 const char* op) {
  const at::ScalarType dtype = grad_output.scalar_type();
  check_companion(channel_mean, grad_output, dtype, s.N * s.C, op, "channel_mean", "[N, C]");
  check_companion(spatial, grad_output, dtype, s.N * 2 * s.HW, op, "spatial", "[N, 2, H, W]");
  check_companion(argmax, grad_output, at::kInt, s.N * s.HW, op, "argmax", "[N, H, W]");
  check_companion(hidden_pre, grad_output, dtype, s.N * fc1_weight.size(0), op, "hidden_pre", "[N, hidden]");
  check_companion(channel_logits, grad_output, dtype, s.N * fc2_weight.size(0), op, "channel_logits", "[N, k*C]");
}

}  // namespace ops
}  // namespace da2ext

// The three heavy passes of docs/design.md §2. `multiplicative` selects mode "mul".
// Gates and gradients of the small branch are in the accumulation dtype
// (float32 for float16/float32 feature maps, float64 for float64).
TORCH_LIBRARY(da2ext, m) {
  // (channel_mean [N, C], spatial [N, 2, H, W] = (mean, max over C), argmax [N, H, W] int32)
  m.def("descriptor_pool(Tensor input) -> (Tensor, Tensor, Tensor)");
  // y = F + gate_channel*gate_spatial (add) or F * (1 + gate_channel*gate_spatial) (mul); gates [N, C] and
  // [N, H, W], or for rank k [N, k, C] and [N, k, H, W] with the sum over j of gate_channel*gate_spatial
  m.def("attention_apply(Tensor input, Tensor gate_channel, Tensor gate_spatial, bool multiplicative) -> Tensor");
  // (channel_sum [N, C] = sum_hw t*gate_spatial, spatial_sum [N, H, W] = sum_c t*gate_channel),
  // t = grad_output (add) or grad_output*input (mul; input is required then and ignored otherwise);
  // rank k: channel_sum [N, k, C], spatial_sum [N, k, H, W], one per term j (outputs shaped like the gates)
  m.def(
      "attention_backward_reduce(Tensor grad_output, Tensor? input, Tensor gate_channel, Tensor gate_spatial, "
      "bool multiplicative) -> (Tensor, Tensor)");
  // dF: the direct term (scale 1, or 1 + sum_j gate_channel*gate_spatial in mode mul) plus the descriptor
  // paths (grad_spatial holds dL/d mean and dL/d max)
  m.def(
      "attention_input_grad(Tensor grad_output, Tensor gate_channel, Tensor gate_spatial, Tensor grad_channel_mean, "
      "Tensor grad_spatial, Tensor argmax, bool multiplicative) -> Tensor");
}
