"""A frozen conv + eval-mode BN + activation that keeps one bit per element for
backward (DESIGN.md §1, §3, §3a).

At freeze time the BN is folded into the conv once:

    scale        = bn.weight / sqrt(running_var + eps)
    weight       = conv.weight * scale            (per output channel)
    frozen_bias  = (conv.bias - running_mean) * scale
    y            = act(conv(x, weight) + frozen_bias + shift),   shift = bn.bias

`shift` is the BN's beta, the only parameter that may train (the §3a recipe).
The backward needs, for the input gradient, the folded weight (held anyway) and
where the activation was active: a packed bit mask, ceil(numel / 32) int32
words. The shift's gradient is the sum over n, h, w of the masked gradient the
backward computes anyway, so it keeps nothing more. The conv's weight gradient
is never computed, and when the input needs no gradient (the stem, say) the
backward computes only the shift's.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._extension import kernels_available, warn_fallback
from .conv_passes import conv2d_forward, conv2d_input_grad

__all__ = ["FrozenConvBNAct", "activate_inplace", "activation_upper", "same_padding"]

# clamp(x, 0, upper): the activations the packed kernels implement.
_RELU_UPPER = float("inf")
_RELU6_UPPER = 6.0


def activation_upper(activation):
    """The `upper` of clamp(x, 0, upper) that `activation` computes: inf for ReLU,
    6 for ReLU6, None for no activation (Identity or None). Raises
    NotImplementedError for anything else (SiLU, GELU, ...), which has no packed
    form here."""
    if activation is None or isinstance(activation, nn.Identity):
        return None
    if isinstance(activation, nn.ReLU6):  # before Hardtanh: ReLU6 is a Hardtanh
        return _RELU6_UPPER
    if isinstance(activation, nn.ReLU):
        return _RELU_UPPER
    if isinstance(activation, nn.Hardtanh) and activation.min_val == 0.0 and activation.max_val > 0:
        return float(activation.max_val)
    raise NotImplementedError("no packed-bit form for activation {}".format(type(activation).__name__))


def same_padding(input_size, kernel_size, stride, dilation):
    """TensorFlow's "SAME" padding for one spatial dimension (as timm's Conv2dSame):
    (before, after), the extra pixel going after."""
    total = max((int(math.ceil(input_size / float(stride))) - 1) * stride + (kernel_size - 1) * dilation + 1
                - input_size, 0)
    return total // 2, total - total // 2


def _pad_same(x, kernel_size, stride, dilation):
    top, bottom = same_padding(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    pads = (left, right, top, bottom)
    return (F.pad(x, pads) if any(pads) else x), pads


def activate_inplace(y, upper):
    if upper is None:
        return y
    if math.isinf(upper):
        return y.clamp_(min=0)
    return y.clamp_(0, upper)


class FrozenConvBNActFunction(torch.autograd.Function):
    """conv(x) + bias, then clamp(., 0, upper) with a packed mask (upper None: no
    activation). Keeps the folded weight (a buffer held anyway) and the mask."""

    @staticmethod
    def forward(ctx, x, weight, frozen_bias, shift, stride, padding, dilation, groups, tf_same, upper):
        pads = (0, 0, 0, 0)
        if tf_same:
            x, pads = _pad_same(x, weight.shape[-2:], stride, dilation)
        bias = (frozen_bias + shift).to(weight.dtype)
        y = conv2d_forward(x, weight, bias, stride, padding, dilation, groups).contiguous()
        mask = None
        if upper is not None:
            # In place: the conv's result is ours alone, and a new tensor would cost
            # another pass over memory (on the CPU, also faulting in fresh pages).
            mask = torch.ops.da2ext.packed_activation_(y, upper)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.input_shape = x.shape  # after TF padding; the padding is cut off again in backward
        ctx.pads = pads
        ctx.shift_dtype = shift.dtype
        ctx.save_for_backward(weight, mask)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        weight, mask = ctx.saved_tensors
        needs_input, needs_shift = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad = grad_output.contiguous()
        if mask is not None:
            grad = torch.ops.da2ext.packed_activation_backward(grad, mask)
        grad_shift = None
        if needs_shift:
            # d shift = sum over n, h, w of the gradient at the BN's output (after the mask).
            # Summed in at least float32 (a float16 backbone has a float32 shift).
            grad_shift = grad.sum(dim=(0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32))
            grad_shift = grad_shift.to(ctx.shift_dtype)
        grad_input = None
        if needs_input:
            stride, padding, dilation, groups = ctx.conv_args
            grad_input = conv2d_input_grad(grad, ctx.input_shape, weight, stride, padding, dilation, groups)
            left, right, top, bottom = ctx.pads
            if any(ctx.pads):
                grad_input = grad_input[:, :, top:grad_input.shape[2] - bottom, left:grad_input.shape[3] - right]
        return grad_input, None, None, grad_shift, None, None, None, None, None, None


class FrozenConvBNAct(nn.Module):
    """A frozen Conv2d (+ optional eval-mode BN folded into it) (+ optional ReLU or
    ReLU6), whose backward keeps one bit per activation element.

    Build it with `FrozenConvBNAct.fold(conv, bn, activation)`. `shift` (the BN's
    beta, or the conv's bias when there is no BN) is a Parameter, trainable when
    `train_shift` is set; everything else is a buffer. `dtype` (e.g. float16) is
    the dtype the frozen weight and the activations are held in; `shift` stays
    float32 whatever it is.
    """

    def __init__(self, weight, frozen_bias, shift, stride, padding, dilation, groups, tf_same, upper,
                 train_shift=True):
        super(FrozenConvBNAct, self).__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("frozen_bias", frozen_bias)
        self.shift = nn.Parameter(shift, requires_grad=train_shift)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = int(groups)
        self.tf_same = bool(tf_same)
        self.upper = upper

    @classmethod
    def fold(cls, conv, bn=None, activation=None, train_shift=True, dtype=torch.float32):
        """Fold `bn` (eval mode: running statistics) into `conv`. `conv` is an
        nn.Conv2d with zero padding, or timm's Conv2dSame (TF "SAME" padding);
        `bn` an nn.BatchNorm2d (timm's BatchNormAct2d included) or None;
        `activation` ReLU, ReLU6, Identity or None (see activation_upper)."""
        if not isinstance(conv, nn.Conv2d):
            raise NotImplementedError("expected an nn.Conv2d, got {}".format(type(conv).__name__))
        if conv.padding_mode != "zeros":
            raise NotImplementedError("padding_mode {!r} is not supported".format(conv.padding_mode))
        if isinstance(conv.padding, str):  # nn.Conv2d(padding="same"/"valid"), torch >= 1.9
            raise NotImplementedError("string padding {!r} is not supported".format(conv.padding))
        upper = activation_upper(activation)
        tf_same = type(conv).__name__ == "Conv2dSame"
        with torch.no_grad():
            weight = conv.weight.detach().double()
            conv_bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(
                conv.out_channels, dtype=torch.float64, device=weight.device)
            if bn is not None:
                if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
                    raise NotImplementedError("expected an nn.BatchNorm2d with running statistics, got {}".format(
                        type(bn).__name__))
                gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(conv_bias)
                beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(conv_bias)
                scale = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
                weight = weight * scale.view(-1, 1, 1, 1)
                frozen_bias = (conv_bias - bn.running_mean.detach().double()) * scale
                shift = beta
            else:
                frozen_bias = torch.zeros_like(conv_bias)
                shift = conv_bias
        # The bias and the trainable shift stay float32 under a float16 backbone.
        bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return cls(weight.to(dtype).contiguous(), frozen_bias.to(bias_dtype), shift.to(bias_dtype), conv.stride,
                   (0, 0) if tf_same else conv.padding, conv.dilation, conv.groups, tf_same, upper, train_shift)

    def forward(self, x):
        x = x.to(self.weight.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or self.shift.requires_grad):
            if kernels_available(x.device.type) or self.upper is None:
                return FrozenConvBNActFunction.apply(x.contiguous(), self.weight, self.frozen_bias, self.shift,
                                                     self.stride, self.padding, self.dilation, self.groups,
                                                     self.tf_same, self.upper)
            warn_fallback(x.device.type)
            return self._plain_autograd(x)
        # Nothing upstream trains: no autograd at all, the activation in place.
        with torch.no_grad():
            return activate_inplace(self._conv(x, (self.frozen_bias + self.shift).to(self.weight.dtype)),
                                     self.upper)

    def _conv(self, x, bias):
        if self.tf_same:
            x, _ = _pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return conv2d_forward(x.contiguous(), self.weight, bias, self.stride, self.padding, self.dilation,
                              self.groups)

    def _plain_autograd(self, x):
        """The same maths in plain autograd (keeps the input: for devices without kernels)."""
        y = self._conv(x, (self.frozen_bias + self.shift).to(self.weight.dtype))
        if self.upper is None:
            return y
        return torch.relu(y) if math.isinf(self.upper) else F.hardtanh(y, 0.0, self.upper)

    def extra_repr(self):
        act = {None: "none", _RELU_UPPER: "relu", _RELU6_UPPER: "relu6"}.get(self.upper, "clamp(0, {})".format(
            self.upper))
        return "{}, {}, kernel_size={}, stride={}, groups={}, activation={}{}, train_shift={}".format(
            self.weight.shape[1] * self.groups, self.weight.shape[0], tuple(self.weight.shape[-2:]), self.stride,
            self.groups, act, ", padding=tf_same" if self.tf_same else "", self.shift.requires_grad)
