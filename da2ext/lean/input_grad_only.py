"""Frozen convs and eval-mode BNs that keep nothing for backward, for the inside of a
RecomputedBlock (docs/design.md §3, "Blocks beyond ReLU").

While a RecomputedBlock's backward runs, its forward runs again under autograd, and
what autograd keeps then is the step's transient peak. Plain PyTorch keeps a frozen
conv's input (its backward op computes the input and weight gradients together) and an
eval-mode BN's input, though neither is read for the input gradient: the conv's needs
only its weight, the BN's only its scale. In an inverted-residual block those inputs
are the six-times-wide maps, most of the transient. These two modules compute exactly
what the originals compute forward, with the original parameters, and keep nothing
but the model's own tensors: the recompute then holds only what SiLU, GELU,
squeeze-excitation and LayerNorm read.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..ops.conv_passes import conv2d_input_grad
from .autocast_state import autocast_state
from .frozen_blocks import is_timm

__all__ = ["InputGradOnlyBatchNorm2d", "InputGradOnlyConv2d", "keep_nothing_inside"]


class _FrozenConv2dFunction(torch.autograd.Function):
    """F.conv2d with a frozen weight: backward gives the input's gradient (and a
    trainable bias's) from the weight alone."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.geometry = (tuple(x.shape), stride, padding, dilation, groups)
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.save_for_backward(weight)  # the model's own: it costs nothing
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        weight, = ctx.saved_tensors
        input_shape, stride, padding, dilation, groups = ctx.geometry
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = conv2d_input_grad(grad_output, input_shape, weight, stride, padding, dilation, groups)
        grad_bias = grad_output.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias, None, None, None, None


class InputGradOnlyConv2d(nn.Module):
    """A frozen nn.Conv2d (zero padding given as numbers) that keeps nothing for
    backward; `conv` is held, its parameters unchanged."""

    def __init__(self, conv):
        super(InputGradOnlyConv2d, self).__init__()
        if not applies_to_conv(conv):
            raise ValueError("InputGradOnlyConv2d: conv must be a frozen nn.Conv2d with zero padding given as numbers")
        self.conv = conv

    def forward(self, x):
        conv = self.conv
        trainable_bias = conv.bias is not None and conv.bias.requires_grad
        # Under autocast the conv's own autograd (its casts) keeps its input, as plain PyTorch does.
        if not torch.is_grad_enabled() or not (x.requires_grad or trainable_bias) or autocast_state(x.device.type)[0]:
            return conv(x)
        return _FrozenConv2dFunction.apply(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                           conv.groups)


class _EvalBatchNormFunction(torch.autograd.Function):
    """F.batch_norm in eval mode with a frozen scale: the input's gradient is the
    output's times weight / sqrt(running_var + eps), the shift's its sum."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        ctx.eps = eps
        ctx.save_for_backward(running_var, weight)  # the model's own
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        running_var, weight = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = torch.rsqrt(running_var + ctx.eps)
            if weight is not None:
                scale = scale * weight
            grad_input = grad_output * scale.to(grad_output.dtype).view(1, -1, 1, 1)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_input, None, None, None, grad_bias, None


class InputGradOnlyBatchNorm2d(nn.Module):
    """An eval-mode BatchNorm2d with running statistics and a frozen scale (its shift
    may train) that keeps nothing for backward; `bn` is held, unchanged. timm's
    BatchNormAct2d is taken too: its dropout and activation follow, as in its own
    forward (the activation keeps what it keeps)."""

    def __init__(self, bn):
        super(InputGradOnlyBatchNorm2d, self).__init__()
        if not applies_to_batchnorm(bn):
            raise ValueError("InputGradOnlyBatchNorm2d: bn must be an nn.BatchNorm2d (or timm's BatchNormAct2d) with "
                             "running statistics and a frozen scale")
        self.bn = bn
        self.timm_activation = is_timm(bn, "BatchNormAct2d")

    def forward(self, x):
        bn = self.bn
        # Put on batch statistics from outside (calibrate_shifts), or under autocast (its casts): the module
        # itself, hooks and all.
        if bn.training or autocast_state(x.device.type)[0]:
            return bn(x)
        trainable_shift = bn.bias is not None and bn.bias.requires_grad
        if not torch.is_grad_enabled() or not (x.requires_grad or trainable_shift):
            y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            y = _EvalBatchNormFunction.apply(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        if self.timm_activation:
            y = bn.act(bn.drop(y))
        return y


def applies_to_conv(module):
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and not module.weight.requires_grad)


def applies_to_batchnorm(module):
    return ((type(module) is nn.BatchNorm2d or is_timm(module, "BatchNormAct2d")) and module.running_mean is not None and module.running_var is not None
            and (module.weight is None or not module.weight.requires_grad))


def keep_nothing_inside(module):
    """Replace, below `module`, every frozen nn.Conv2d and eval-mode nn.BatchNorm2d
    (exactly those classes, and timm's BatchNormAct2d: another subclass may compute
    something else) by its
    InputGradOnly twin, in place; returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if applies_to_conv(child):
            setattr(module, name, InputGradOnlyConv2d(child))
            replaced += 1
        elif applies_to_batchnorm(child):
            setattr(module, name, InputGradOnlyBatchNorm2d(child))
            replaced += 1
        elif not isinstance(child, (InputGradOnlyConv2d, InputGradOnlyBatchNorm2d)):
            replaced += keep_nothing_inside(child)
    return replaced
