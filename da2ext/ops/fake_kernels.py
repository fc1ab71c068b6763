"""Fake (meta) implementations of the torch.ops.da2ext ops, for tracing.

torch.compile, torch.export and AOTAutograd run a model on fake tensors first:
tensors with shapes, dtypes, strides and devices but no data. A custom op
takes part only if it says what it returns without computing it, and it must
say exactly what the kernels return, strides included (torch.library.opcheck
compares them). So each function below mirrors the allocation of its kernel in
csrc/ops (the same on the CPU and CUDA):

- a result "in the memory order" of a feature map is channels_last where the
  map is channels_last and not also contiguous (C == 1 or H == W == 1 make
  the two orders one), else contiguous: csrc/ops/memory_order.h;
- the small tensors (descriptors, gates' sums, masks) are contiguous; what is
  accumulated is float32, or float64 for float64 inputs;
- a mask holds ceil(numel / 32) int32 words.

The checks stay in the kernels, which run on real tensors with the same
arguments; here only what decides the outputs' shapes is read.

Registered through torch.library.register_fake (torch >= 2.4) or
impl_abstract (2.1 to 2.3); older torch (the Jetson's 1.10) has no fake tensor
tracing to take part in, and nothing is registered.
"""
import torch

from .memory_order import CHANNELS_LAST, memory_order

__all__ = ["has_op", "register_fake_kernels"]


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_in_memory_order(like, dtype=None):
    """An empty tensor shaped as `like`, in its memory order (memory_order.h's empty_in_memory_order)."""
    fmt = torch.channels_last if memory_order(like) == CHANNELS_LAST else torch.contiguous_format
    return torch.empty(like.shape, dtype=like.dtype if dtype is None else dtype, device=like.device,
                       memory_format=fmt)


def _mask_words(like):
    """The packed mask of `like`'s elements: ceil(numel / 32) int32 words."""
    return like.new_empty(((like.numel() + 31) // 32,), dtype=torch.int32)


def _gate_sums(feature, gate_channel):
    """attention_backward_reduce's two sums, shaped as the gates: [N, C] and [N, H, W] at
    rank 1 (2-D gate_channel), [N, k, C] and [N, k, H, W] at rank k."""
    n, c, h, w = feature.shape
    acc = _accumulate_dtype(feature.dtype)
    if gate_channel.dim() == 2:
        return feature.new_empty((n, c), dtype=acc), feature.new_empty((n, h, w), dtype=acc)
    k = gate_channel.shape[1]
    return feature.new_empty((n, k, c), dtype=acc), feature.new_empty((n, k, h, w), dtype=acc)


def descriptor_pool(input):
    n, c, h, w = input.shape
    return (input.new_empty((n, c)), input.new_empty((n, 2, h, w)),
            input.new_empty((n, h, w), dtype=torch.int32))


def attention_apply(input, gate_channel, gate_spatial, multiplicative):
    return _empty_in_memory_order(input)


def attention_backward_reduce(grad_output, input, gate_channel, gate_spatial, multiplicative):
    return _gate_sums(grad_output, gate_channel)


def attention_input_grad(grad_output, gate_channel, gate_spatial, grad_channel_mean, grad_spatial, argmax,
                         multiplicative):
    return _empty_in_memory_order(grad_output)


def packed_activation(input, upper):
    return _empty_in_memory_order(input), _mask_words(input)


def packed_activation_(self, upper):
    return _mask_words(self)  # self is written in place: its fake stays what it was


def packed_activation_backward(grad_output, mask):
    return _empty_in_memory_order(grad_output)


def packed_bias_activation_(self, bias, residual, upper):
    return _mask_words(self)


def packed_activation_backward_channel_sums(grad_output, mask):
    return (_empty_in_memory_order(grad_output),
            grad_output.new_empty((grad_output.shape[1],), dtype=_accumulate_dtype(grad_output.dtype)))


def residual_attention_forward(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias,
                               gamma, multiplicative):
    n = input.shape[0]
    channel_mean, spatial, argmax = descriptor_pool(input)
    return (_empty_in_memory_order(input), channel_mean, spatial, argmax, input.new_empty((n, fc1_weight.shape[0])),
            input.new_empty((n, fc2_weight.shape[0])))


def residual_attention_backward(grad_output, input, channel_mean, spatial, argmax, hidden_pre, channel_logits, gamma,
                                fc1_weight, fc2_weight, spatial_weight, spatial_bias, multiplicative,
                                needs_input_grad):
    grad_input = _empty_in_memory_order(grad_output) if needs_input_grad else grad_output.new_empty((0,))
    hidden, channels = fc1_weight.shape
    return (grad_input, fc1_weight.new_empty((hidden, channels)), fc1_weight.new_empty((hidden,)),
            fc2_weight.new_empty(tuple(fc2_weight.shape)), fc2_weight.new_empty((fc2_weight.shape[0],)),
            spatial_weight.new_empty(tuple(spatial_weight.shape)), spatial_weight.new_empty((spatial_weight.shape[0],)),
            gamma.new_empty(tuple(gamma.shape)))


def residual_attention(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma,
                       multiplicative, saved_input_dtype=None):
    return _empty_in_memory_order(input)


FAKE_KERNELS = (descriptor_pool, attention_apply, attention_backward_reduce, attention_input_grad,
                packed_activation, packed_activation_, packed_activation_backward, packed_bias_activation_,
                packed_activation_backward_channel_sums, residual_attention_forward, residual_attention_backward,
                residual_attention)


def _registrar():
    """torch.library's function that registers a fake kernel, or None where this torch has none."""
    library = getattr(torch, "library", None)
    for name in ("register_fake", "impl_abstract"):
        register = getattr(library, name, None)
        if register is not None:
            return register
    return None


def register_fake_kernels():
    """Register every function above as the fake kernel of torch.ops.da2ext.<its name>.

    Called once, after da2ext._C has defined the ops. Returns the names
    registered (empty where this torch cannot trace custom ops)."""
    register = _registrar()
    if register is None:
        return ()
    registered = []
    for kernel in FAKE_KERNELS:
        if not has_op(kernel.__name__):  # the one-op adaptor's ops are built only against torch >= 1.11
            continue
        register("da2ext::" + kernel.__name__, kernel)
        registered.append(kernel.__name__)
    return tuple(registered)


def has_op(name):
    """Whether the loaded extension defines torch.ops.da2ext.<name>."""
    try:
        getattr(torch.ops.da2ext, name)
    except (AttributeError, RuntimeError):
        return False
    return True
