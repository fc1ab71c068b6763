"""ReLU and ReLU6 that keep one bit per element for backward (docs/design.md §1 and §3).

A frozen layer's activation needs, for the input gradient, only where it was
active. The fused op writes the output and that mask, packed 32 elements to an
int32 word, in one pass; the backward reads the mask and the incoming gradient.
What is kept for backward is the mask alone, 4 * ceil(numel / 32) bytes (1/32
of a float32 input), saved through ctx.save_for_backward so that
da2ext.SavedTensorCounter counts it.

Gradient convention (as torch's): ReLU passes the gradient where x > 0; ReLU6
(and any finite `upper`) where 0 < x < upper, so exactly 0 and exactly `upper`
pass nothing. At a NaN input the output is NaN and no gradient passes.

A channels_last input keeps its memory order: the kernels run over memory in
order (see memory_order.py), the mask follows it, and so must the gradient.

The modules, PackedReLU and PackedReLU6, are in da2ext/nn/packed_relu.py.
"""
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._extension import kernels_available, warn_fallback
from .memory_order import in_memory_order, memory_order

__all__ = ["packed_activation", "packed_activation_backward", "packed_relu", "packed_relu6"]


class PackedActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, upper, inplace):
        if inplace:
            mask = torch.ops.da2ext.packed_activation_(x, upper)
            ctx.mark_dirty(x)
            output = x
        else:
            output, mask = torch.ops.da2ext.packed_activation(x, upper)
        ctx.order = memory_order(x)  # the caller made x dense
        ctx.save_for_backward(mask)  # the only thing kept: ceil(numel / 32) int32 words
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        mask, = ctx.saved_tensors
        return packed_activation_backward(grad_output, mask, ctx.order), None, None


def packed_activation_backward(grad_output, mask, order):
    """grad_output where the activation passed it (mask, packed in `order`), 0
    elsewhere; the result is dense in `order`."""
    return torch.ops.da2ext.packed_activation_backward(in_memory_order(grad_output, order), mask)


def _reference(x, upper, inplace=False):
    """The same values and gradients in plain PyTorch (keeps x or the output for backward)."""
    if math.isinf(upper):
        return torch.relu_(x) if inplace else torch.relu(x)
    return F.hardtanh(x, 0.0, upper, inplace=inplace)


def packed_activation(x, upper, inplace=False):
    """clamp(x, 0, upper) keeping only a bit mask for backward.

    `upper` > 0: float("inf") gives ReLU, 6 gives ReLU6. `x` is a float16,
    float32 or float64 tensor of any shape; a contiguous or channels_last `x`
    keeps its memory order, any other is made contiguous first (a copy).
    `inplace=True` (as nn.ReLU's) overwrites such an `x` and returns it, which
    saves a new output (on the CPU, also faulting its pages in); autograd
    rejects it, as it does torch.relu_, where x is a leaf that requires grad or
    is saved by another op for its backward. Any other `x` is never written: the
    result is its contiguous copy, whatever `inplace` says. Where no kernels
    exist for x's device, plain PyTorch (relu/hardtanh) runs instead, with a
    warning (see da2ext.backend()).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError("packed_activation: x must be a torch.Tensor, got {}".format(type(x).__name__))
    upper = float(upper)
    if not upper > 0:  # also rejects NaN
        raise ValueError("packed_activation: upper must be > 0 (float('inf') for ReLU, 6 for ReLU6), "
                         "got {}".format(upper))
    if x.dtype not in (torch.float16, torch.float32, torch.float64):
        raise TypeError("packed_activation: x must be float16, float32 or float64, got {}".format(x.dtype))
    if not kernels_available(x.device.type):
        warn_fallback(x.device.type)
        return _reference(x, upper, inplace)
    if memory_order(x) is None:
        # The contiguous copy is ours alone: the result goes into it, and x is left as it was.
        x, inplace = x.contiguous(), True
    if torch.is_grad_enabled() and x.requires_grad:
        return PackedActivationFunction.apply(x, upper, bool(inplace))
    if inplace:
        torch.ops.da2ext.packed_activation_(x, upper)
        return x
    output, _ = torch.ops.da2ext.packed_activation(x, upper)
    return output


def packed_relu(x, inplace=False):
    """ReLU keeping one bit per element for backward (see packed_activation)."""
    return packed_activation(x, float("inf"), inplace)


def packed_relu6(x, inplace=False):
    """ReLU6 keeping one bit per element for backward (see packed_activation)."""
    return packed_activation(x, 6.0, inplace)
