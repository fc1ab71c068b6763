// Schema of the packed activation ops (docs/design.md §3: "activation fused with a
// bit-packing of its mask in the forward") and the checks both backends share.
// The residual attention ops own TORCH_LIBRARY(da2ext); these are added to the
// same namespace with a fragment. Implementations: cpu/, cuda/.
#include "packed_activation.h"

#include <torch/library.h>

#include "packed_activation_math.h"

namespace da2ext {
namespace ops {

void check_activation_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kDouble, op, ": ", name,
              " must be float16, float32 or float64, got ", dtype);
  TORCH_CHECK(t.is_contiguous() || is_channels_last(t), op, ": ", name,
              " must be contiguous or channels_last (call .contiguous() on strided tensors); got strides ",
              t.strides(), " for shape ", t.sizes());
}


void check_activation_upper(double upper, const char* op) {
  TORCH_CHECK(upper > 0, op, ": upper must be > 0 (+inf for ReLU, 6 for ReLU6), got ", upper);
}

void check_activation_mask(const at::Tensor& mask, const at::Tensor& reference, const char* op) {
  TORCH_CHECK(mask.defined(), op, ": mask is undefined");
  TORCH_CHECK(mask.device() == reference.device(), op, ": mask must be on ", reference.device(),
              " like grad_output, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kInt, op, ": mask must be int32, got ", mask.scalar_type());
  const int64_t words = math::packed_mask_words(reference.numel());
  TORCH_CHECK(mask.numel() == words, op, ": mask must have ceil(numel / 32) = ", words,
              " int32 words for grad_output of shape ", reference.sizes(), ", got ", mask.numel(),
              " (shape ", mask.sizes(), ")");
  TORCH_CHECK(mask.is_contiguous(), op, ": mask must be contiguous");
}

uint32_t* mask_words_ptr(const at::Tensor& mask) {
  return reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>());
}

at::Tensor allocate_activation_mask(const at::Tensor& input) {
  return at::empty({math::packed_mask_words(input.numel())}, input.options().dtype(at::kInt));
}

std::tuple<at::Tensor, at::Tensor> allocate_activation_outputs(const at::Tensor& input) {
  return std::make_tuple(empty_in_memory_order(input), allocate_activation_mask(input));
}

}  // namespace ops
}  // namespace da2ext

TORCH_LIBRARY_FRAGMENT(da2ext, m) {
  // output = clamp(input, 0, upper) (upper = inf: ReLU, 6: ReLU6); mask: int32 [ceil(numel / 32)],
  // bit i % 32 of word i / 32 set where the gradient passes (0 < x < upper; x > 0 when upper = inf),
  // i counting elements in memory order (contiguous or channels_last; outputs keep the input's)
  m.def("packed_activation(Tensor input, float upper) -> (Tensor output, Tensor mask)");
  // The same in place: self = clamp(self, 0, upper); returns the mask. Saves a fresh
  // output where the input is a temporary (a frozen conv's result), which on the CPU
  // also saves faulting in the new pages.
  m.def("packed_activation_(Tensor(a!) self, float upper) -> Tensor mask");
  // grad_input = grad_output where the mask bit is set, else 0
  m.def("packed_activation_backward(Tensor grad_output, Tensor mask) -> Tensor grad_input");
  // Fused with the neighbouring passes (CPU kernels; on CUDA the Python callers run the
  // composite): self = clamp(self + bias[c] (+ residual), 0, upper), c the index along
  // dim 1, returning the mask as packed_activation_ does; and grad_input as
  // packed_activation_backward with channel_sums[c], its sum over every dim but 1
  // (float32, float64 for float64). The bias op takes contiguous (NCHW) tensors, the
  // backward channels_last ones too.
  m.def("packed_bias_activation_(Tensor(a!) self, Tensor bias, Tensor? residual, float upper) -> Tensor mask");
  m.def("packed_activation_backward_channel_sums(Tensor grad_output, Tensor mask) -> "
        "(Tensor grad_input, Tensor channel_sums)");
}
