// C++ test of the CPU kernels, built and run by the CMake build (ctest). It calls
// the ops through the torch dispatcher, as torch.ops.da2ext.* does, and compares
// them in float64 with plain ATen compositions of the formulas documented in
// ops/residual_attention.cpp and ops/residual_attention_math.h. One line per
// check; the exit status is non-zero when any check fails.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>

namespace {

using at::Tensor;

int failures = 0;

// The ops, looked up by name in the dispatcher (they are registered when
// libda2ext_ops is loaded).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::tuple<Tensor, Tensor, Tensor> descriptor_pool(const Tensor& input) {
  static const auto op = find_op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&)>("da2ext::descriptor_pool");
  return op.call(input);
}

Tensor attention_apply(const Tensor& input, const Tensor& gate_channel, const Tensor& gate_spatial,
                       bool multiplicative) {
  static const auto op =
      find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>("da2ext::attention_apply");
  return op.call(input, gate_channel, gate_spatial, multiplicative);
}

std::tuple<Tensor, Tensor> attention_backward_reduce(const Tensor& grad_output, const c10::optional<Tensor>& input,
                                                     const Tensor& gate_channel, const Tensor& gate_spatial,
                                                     bool multiplicative) {
  static const auto op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const c10::optional<Tensor>&,
                                                            const Tensor&, const Tensor&, bool)>(
      "da2ext::attention_backward_reduce");
  return op.call(grad_output, input, gate_channel, gate_spatial, multiplicative);
}

Tensor attention_input_grad(const Tensor& grad_output, const Tensor& gate_channel, const Tensor& gate_spatial,
                            const Tensor& grad_channel_mean, const Tensor& grad_spatial, const Tensor& argmax,
                            bool multiplicative) {
  static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                        const Tensor&, bool)>("da2ext::attention_input_grad");
  return op.call(grad_output, gate_channel, gate_spatial, grad_channel_mean, grad_spatial, argmax, multiplicative);
}

std::string shape_name(const Tensor& t) {
  std::string name;
  for (int64_t d = 0; d < t.dim(); ++d) {
    name += (d ? "x" : "") + std::to_string(t.size(d));
  }
  return name;
}

// actual == expected in shape and dtype, values within tolerance * max(1, max|expected|).
void check_close(const std::string& what, const Tensor& actual, const Tensor& expected, double tolerance = 1e-10) {
  std::string problem;
  double diff = 0;
  if (actual.sizes() != expected.sizes()) {
    problem = "shape " + shape_name(actual) + ", expected " + shape_name(expected);
  } else if (actual.scalar_type() != expected.scalar_type()) {
    problem = std::string("dtype ") + c10::toString(actual.scalar_type()) + ", expected " +
              c10::toString(expected.scalar_type());
  } else if (actual.numel() > 0) {
    const Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
    diff = (a - e).abs().max().item<double>();
    const double scale = std::max(1.0, e.abs().max().item<double>());
    if (!(diff <= tolerance * scale)) {  // also catches NaN
      char text[96];
      std::snprintf(text, sizeof(text), "max|diff| = %.3g > %.3g", diff, tolerance * scale);
      problem = text;
    }
  }
  if (problem.empty()) {
    std::printf("PASS  %-58s max|diff| = %.3g\n", what.c_str(), diff);
  } else {
    std::printf("FAIL  %-58s %s\n", what.c_str(), problem.c_str());
    ++failures;
  }
}

void check(const std::string& what, bool ok, const std::string& detail = "") {
  std::printf("%s  %-58s %s\n", ok ? "PASS" : "FAIL", what.c_str(), detail.c_str());
  failures += ok ? 0 : 1;
}

// Gates of the accumulation dtype with the documented shapes, values around 1.
std::tuple<Tensor, Tensor> random_gates(const Tensor& feature) {
  const auto options = feature.options().dtype(feature.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return std::make_tuple(at::randn({feature.size(0), feature.size(1)}, options),
                         at::rand({feature.size(0), feature.size(2), feature.size(3)}, options));
}

// Broadcast views of the gates against N x C x H x W.
Tensor channel_view(const Tensor& gate_channel) {
  return gate_channel.unsqueeze(-1).unsqueeze(-1);  // N, C, 1, 1
}
Tensor spatial_view(const Tensor& gate_spatial) {
  return gate_spatial.unsqueeze(1);  // N, 1, H, W
}

// The first channel holding the maximum (ties: lowest index), as int32 [N, H, W].
Tensor first_argmax(const Tensor& x) {
  const int64_t C = x.size(1);
  const Tensor channel = at::arange(C, x.options().dtype(at::kLong)).view({1, C, 1, 1}).expand(x.sizes());
  const Tensor is_max = x == std::get<0>(x.max(1, /*keepdim=*/true));
  return at::where(is_max, channel, at::full_like(channel, C)).amin(1).to(at::kInt);
}

void test_descriptor_pool(const Tensor& x, double tolerance = 1e-10) {
  const std::string tag = std::string("descriptor_pool ") + c10::toString(x.scalar_type()) + " " + shape_name(x);
  Tensor channel_mean, spatial, argmax;
  std::tie(channel_mean, spatial, argmax) = descriptor_pool(x);
  const Tensor xd = x.to(at::kDouble);
  check_close(tag + " channel_mean", channel_mean, xd.mean({2, 3}).to(x.scalar_type()), tolerance);
  check_close(tag + " spatial mean", spatial.select(1, 0), xd.mean(1).to(x.scalar_type()), tolerance);
  check_close(tag + " spatial max", spatial.select(1, 1), xd.amax(1).to(x.scalar_type()), tolerance);
  check(tag + " argmax", argmax.scalar_type() == at::kInt && argmax.sizes() == first_argmax(xd).sizes() &&
                             argmax.equal(first_argmax(xd)));
}

void test_attention_apply(const Tensor& x, bool multiplicative) {
  const std::string tag =
      std::string("attention_apply ") + (multiplicative ? "mul " : "add ") + shape_name(x);
  Tensor gc, gs;
  std::tie(gc, gs) = random_gates(x);
  const Tensor attention = channel_view(gc) * spatial_view(gs);
  const Tensor expected = multiplicative ? x * (1 + attention) : x + attention;
  check_close(tag, attention_apply(x, gc, gs, multiplicative), expected);
}

void test_attention_backward_reduce(const Tensor& x, bool multiplicative) {
  const std::string tag =
      std::string("attention_backward_reduce ") + (multiplicative ? "mul " : "add ") + shape_name(x);
  Tensor gc, gs;
  std::tie(gc, gs) = random_gates(x);
  const Tensor grad_output = at::randn_like(x);
  // add mode ignores the input: pass none there, as the autograd function does
  const c10::optional<Tensor> input = multiplicative ? c10::optional<Tensor>(x) : c10::nullopt;
  Tensor channel_sum, spatial_sum;
  std::tie(channel_sum, spatial_sum) = attention_backward_reduce(grad_output, input, gc, gs, multiplicative);
  const Tensor term = multiplicative ? grad_output * x : grad_output;
  check_close(tag + " channel_sum", channel_sum, (term * spatial_view(gs)).sum({2, 3}));
  check_close(tag + " spatial_sum", spatial_sum, (term * channel_view(gc)).sum(1));
}

void test_attention_input_grad(const Tensor& x, bool multiplicative) {
  const std::string tag =
      std::string("attention_input_grad ") + (multiplicative ? "mul " : "add ") + shape_name(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  Tensor gc, gs;
  std::tie(gc, gs) = random_gates(x);
  const Tensor grad_output = at::randn_like(x);
  const Tensor grad_channel_mean = at::randn({N, C}, x.options());
  const Tensor grad_spatial = at::randn({N, 2, H, W}, x.options());
  const Tensor argmax = at::randint(C, {N, H, W}, x.options().dtype(at::kInt));
  // dF = g * (1 | 1 + gc*gs) + dmean_c / HW + dmean_s / C + [c == argmax] * dmax_s
  const Tensor direct = multiplicative ? grad_output * (1 + channel_view(gc) * spatial_view(gs)) : grad_output;
  const Tensor is_argmax =
      argmax.to(at::kLong).unsqueeze(1) == at::arange(C, x.options().dtype(at::kLong)).view({1, C, 1, 1});
  const Tensor expected = direct + channel_view(grad_channel_mean) / static_cast<double>(H * W) +
                          grad_spatial.narrow(1, 0, 1) / static_cast<double>(C) +
                          is_argmax.to(x.scalar_type()) * grad_spatial.narrow(1, 1, 1);
  check_close(tag, attention_input_grad(grad_output, gc, gs, grad_channel_mean, grad_spatial, argmax, multiplicative),
              expected);
}

void test_rejects_non_contiguous() {
  const Tensor x = at::randn({2, 3, 4, 5}, at::kDouble).transpose(2, 3);  // 2x3x5x4, strided
  std::string message;
  try {
    descriptor_pool(x);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  check("descriptor_pool rejects a non-contiguous input", message.find("contiguous") != std::string::npos,
        message.empty() ? "no c10::Error raised" : "(c10::Error: " + message.substr(0, message.find(';')) + ")");
}

}  // namespace

int main() {
  try {
    at::manual_seed(0);
    const Tensor small = at::randn({3, 5, 7, 9}, at::kDouble);    // H*W = 63: one tile of 256 positions
    const Tensor tiled = at::randn({2, 4, 20, 30}, at::kDouble);  // H*W = 600: three tiles, the last partial
    const Tensor ties = at::randint(0, 3, {2, 6, 5, 4}, at::kDouble);  // equal maxima: the first channel wins

    test_descriptor_pool(small);
    test_descriptor_pool(tiled);
    test_descriptor_pool(ties);
    test_descriptor_pool(tiled.to(at::kFloat), 1e-5);  // float path: float accumulation
    for (const Tensor& x : {small, tiled}) {
      for (bool multiplicative : {false, true}) {
        test_attention_apply(x, multiplicative);
        test_attention_backward_reduce(x, multiplicative);
        test_attention_input_grad(x, multiplicative);
      }
    }
    test_rejects_non_contiguous();
  } catch (const std::exception& e) {
    std::printf("FAIL  unexpected exception: %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::printf("%d check(s) FAILED\n", failures);
  } else {
    std::printf("all checks passed\n");
  }
  return failures ? 1 : 0;
}
