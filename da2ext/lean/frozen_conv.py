"""A frozen conv + eval-mode BN + activation that keeps one bit per element for
backward (docs/design.md §1, §3, §3a).

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

from ..ops import kernels_available, warn_fallback
from ..ops.conv_passes import conv2d_forward, conv2d_input_grad
from ..ops.memory_order import CHANNELS_LAST, CONTIGUOUS, dense, in_memory_order, memory_order
from ..ops.packed_activation import packed_activation_backward

__all__ = ["FrozenConvBNAct", "activate_inplace", "activation_upper", "pad_same", "same_padding"]

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


def pad_same(x, kernel_size, stride, dilation):
    """(x padded as TensorFlow's "SAME", in x's memory order; the pads)."""
    top, bottom = same_padding(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    pads = (left, right, top, bottom)
    if not any(pads):
        return x, pads
    return in_memory_order(F.pad(x, pads), memory_order(x) or CONTIGUOUS), pads


def activate_inplace(y, upper):
    if upper is None:
        return y
    if math.isinf(upper):
        return y.clamp_(min=0)
    return y.clamp_(0, upper)


def fused_cpu_kernels(t):
    """Whether the CPU kernels that fuse neighbouring passes into the activation's
    (packed_bias_activation_, packed_activation_backward_channel_sums) serve `t`.
    Elsewhere (CUDA) the same maths runs as separate passes."""
    return t.device.type == "cpu" and kernels_available("cpu")


# The fused CPU kernels walk 32-element mask words, and a word across two channel
# planes (or a plane's ragged ends, in the backward) takes their per-element path.
# Medians of 30 rounds against the separate passes on the development VM
# (`DA2EXT_BENCH_ROUNDS=30 pytest benchmarks/test_fused_activation_benchmark.py
# --benchmark-only`), ResNet-50 block outputs at batch 8:
#   forward  (bias + shortcut + activation): 6.6 vs 10.2 ms at 56x56, 3.1 vs 3.7 at 28x28,
#            1.7 vs 1.5 at 14x14, 2.3 vs 0.7 at 7x7;
#   backward (mask + channel sums):          3.6 vs 5.1 ms at 56x56, 1.7 vs 2.4 at 28x28,
#            1.3 vs 0.9 at 14x14, 2.4 vs 0.4 at 7x7.
# So both run fused on planes of whole words or of 512 elements and more.
_FUSED_MIN_PLANE = 512
_MASK_WORD = 32


def _plane_fits_fused(plane):
    return plane % _MASK_WORD == 0 or plane >= _FUSED_MIN_PLANE


# In channels_last the fused backward walks rows of C channels: whole words when C
# is a multiple of 32 (all of ResNet's widths), element by element otherwise, where
# it loses to the separate passes (medians of 15 rounds, development VM, batch 8:
# 0.34 vs 0.64 ms at 64x56x56, 0.52 vs 0.90 at 1024x14x14, 5.2 vs 5.2 at 256x56x56;
# 2.9 vs 0.28 ms at 24x56x56, 0.58 vs 0.24 at 144x28x28).
def _fused_backward_pays(grad, order):
    if order == CONTIGUOUS:
        return _plane_fits_fused(grad[0, 0].numel() if grad.shape[0] * grad.shape[1] > 0 else 0)
    return grad.shape[1] % _MASK_WORD == 0


def _conv_output_plane(x, weight, stride, padding, dilation):
    """H_out * W_out of conv2d(x, weight, ...)."""
    plane = 1
    for i in range(2):
        size = x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1
        plane *= size // stride[i] + 1
    return plane


def _conv_bias_activation(x, weight, bias, residual, upper, conv_args, order):
    """(y, mask): y = clamp(conv(x, weight) + bias (+ residual), 0, upper) in a new
    tensor, dense in `order` (x's), and its packed mask (None without activation,
    upper None).

    On the CPU, in NCHW, on maps where that pays (above), the bias and the
    residual are added in the activation's own pass: the conv (a GEMM for 1x1)
    writes its plain product, and one pass over it adds, clamps and packs.
    Otherwise the conv adds the bias (oneDNN and cuDNN fuse it), the residual is
    added in place and the activation runs in place."""
    stride, padding, dilation, groups = conv_args
    if (upper is not None and order == CONTIGUOUS and fused_cpu_kernels(x)
            and _plane_fits_fused(_conv_output_plane(x, weight, stride, padding, dilation))):
        y = conv2d_forward(x, weight, None, stride, padding, dilation, groups).contiguous()
        return y, torch.ops.da2ext.packed_bias_activation_(y, bias, residual, upper)
    y = in_memory_order(conv2d_forward(x, weight, bias, stride, padding, dilation, groups), order)
    if residual is not None:
        y.add_(residual)
    if upper is None:
        return y, None
    return y, torch.ops.da2ext.packed_activation_(y, upper)


def _masked_grad_and_shift_grad(grad_output, mask, needs_shift, shift_dtype, order):
    """(the gradient at the BN's output, i.e. grad_output through the mask, dense
    in `order` like the forward's output; the shift's gradient, its sum over
    every dim but the channels, or None). Summed in at least float32 (a float16
    backbone has a float32 shift); on the CPU, in the same pass as the masking
    (in NCHW on maps where that pays, above)."""
    grad = in_memory_order(grad_output, order)
    if mask is not None and needs_shift and fused_cpu_kernels(grad) and _fused_backward_pays(grad, order):
        grad, channel_sums = torch.ops.da2ext.packed_activation_backward_channel_sums(grad, mask)
        return grad, channel_sums.to(shift_dtype)
    if mask is not None:
        grad = packed_activation_backward(grad, mask, order)
    if not needs_shift:
        return grad, None
    dims = [0] + list(range(2, grad.dim()))
    return grad, grad.sum(dim=dims, dtype=torch.promote_types(grad.dtype, torch.float32)).to(shift_dtype)


class FrozenConvBNActFunction(torch.autograd.Function):
    """conv(x) + bias (+ residual), then clamp(., 0, upper) with a packed mask (upper
    None: no activation). Keeps the folded weight (a buffer held anyway) and the mask.

    `residual` (or None) is a shortcut added before the activation: the last conv
    of a residual block, the add and the block's activation as one node, so that
    on the CPU one pass adds the bias and the shortcut and activates. Its gradient
    is the masked gradient itself."""

    @staticmethod
    def forward(ctx, x, residual, weight, frozen_bias, shift, stride, padding, dilation, groups, tf_same, upper):
        pads = (0, 0, 0, 0)
        if tf_same:
            x, pads = pad_same(x, weight.shape[-2:], stride, dilation)
        bias = (frozen_bias + shift).to(weight.dtype)
        order = memory_order(x)  # the caller made x dense; TF padding keeps its order
        # In place: the conv's result is ours alone, and a new tensor would cost
        # another pass over memory (on the CPU, also faulting in fresh pages).
        y, mask = _conv_bias_activation(x, weight, bias, None if residual is None else in_memory_order(residual, order),
                                        upper, (stride, padding, dilation, groups), order)
        ctx.order = order
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
        needs_input, needs_residual, needs_shift = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                                    ctx.needs_input_grad[4])
        grad, grad_shift = _masked_grad_and_shift_grad(grad_output, mask, needs_shift, ctx.shift_dtype, ctx.order)
        grad_input = None
        if needs_input:
            stride, padding, dilation, groups = ctx.conv_args
            grad_input = conv2d_input_grad(grad, ctx.input_shape, weight, stride, padding, dilation, groups)
            left, right, top, bottom = ctx.pads
            if any(ctx.pads):
                grad_input = grad_input[:, :, top:grad_input.shape[2] - bottom, left:grad_input.shape[3] - right]
        return (grad_input, grad if needs_residual else None, None, None, grad_shift, None, None, None, None, None,
                None)


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
                 train_shift=True, bn_train_mode=None):
        super(FrozenConvBNAct, self).__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("frozen_bias", frozen_bias)
        # (|gamma|, eps * scale^2) per channel of the folded BN, or None without one: what the BN in
        # train mode would compute from the folded output (domain statistics, lean/domain_statistics.py).
        # Not saved in state_dict (persistent=False): it follows from the weights.
        self.register_buffer("bn_train_mode", bn_train_mode, persistent=False)
        self.statistics = None  # a DomainStatistics while one is estimated
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
                bn_train_mode = torch.stack([gamma.abs(), bn.eps * scale * scale])
            else:
                frozen_bias = torch.zeros_like(conv_bias)
                shift = conv_bias
                bn_train_mode = None
        # The bias and the trainable shift stay float32 under a float16 backbone.
        bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return cls(weight.to(dtype).contiguous(), frozen_bias.to(bias_dtype), shift.to(bias_dtype), conv.stride,
                   (0, 0) if tf_same else conv.padding, conv.dilation, conv.groups, tf_same, upper, train_shift,
                   None if bn_train_mode is None else bn_train_mode.to(bias_dtype))

    def _weight_for(self, x):
        """The folded weight, held in the memory order that suits `x` (dense): channels_last
        for a channels_last CPU input, else contiguous. oneDNN reorders a contiguous
        k x k weight to channels_last in every forward and input-gradient pass of a
        channels_last input, and a channels_last weight would turn an NCHW input's
        result channels_last (on cuDNN too). The buffer itself is converted, once,
        when the order it needs changes; 1x1 weights are in both orders already, and
        an input in both (1 x 1 maps, one channel) takes the weight as it is."""
        if x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return self.weight
        self.hold_weight_in(torch.channels_last if x.device.type == "cpu" and memory_order(x) == CHANNELS_LAST
                            else torch.contiguous_format)
        return self.weight

    def hold_weight_in(self, memory_format):
        """Store the folded weight in `memory_format` (adapt() does it for the CPU's
        channels_last up front, so that no forward converts it)."""
        if not self.weight.is_contiguous(memory_format=memory_format):
            self.weight = self.weight.contiguous(memory_format=memory_format)

    def forward(self, x):
        x = dense(x.to(self.weight.dtype))
        if self.statistics is not None:
            return self._train_mode_bn_forward(x, None, self.upper)
        weight = self._weight_for(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.shift.requires_grad):
            if kernels_available(x.device.type) or self.upper is None:
                return FrozenConvBNActFunction.apply(x, None, weight, self.frozen_bias, self.shift,
                                                     self.stride, self.padding, self.dilation, self.groups,
                                                     self.tf_same, self.upper)
            warn_fallback(x.device.type)
            return self._plain_autograd(x)
        # Nothing upstream trains: no autograd at all, the activation in place.
        with torch.no_grad():
            return activate_inplace(self._conv(x, (self.frozen_bias + self.shift).to(self.weight.dtype)),
                                     self.upper)

    def forward_add_activation(self, x, residual, upper):
        """clamp(self(x) + residual, 0, upper) for a layer with no activation of its
        own (the last conv of a residual block), as one autograd node whose backward
        keeps the folded weight and a packed mask (FrozenConvBNActFunction with a residual)."""
        if self.upper is not None or self.tf_same:
            raise ValueError("forward_add_activation is for a conv without activation or TF padding "
                             "(this one: activation upper={}, tf_same={})".format(self.upper, self.tf_same))
        x = dense(x.to(self.weight.dtype))
        if self.statistics is not None:
            return self._train_mode_bn_forward(x, residual.to(self.weight.dtype), upper)
        return FrozenConvBNActFunction.apply(x, residual.to(self.weight.dtype), self._weight_for(x),
                                             self.frozen_bias, self.shift, self.stride, self.padding, self.dilation,
                                             self.groups, False, upper)

    def _train_mode_bn_forward(self, x, residual, upper):
        """The forward as if the folded BN ran in train mode (normalised with this
        batch's mean and variance), without autograd, while domain statistics are
        estimated; records the batch's per-channel mean of the folded output.

        With y = conv(x, folded weight) + frozen_bias = (r - mu) * scale, where r
        is the conv's output and mu the running mean, BN in train mode gives
        (r - mean(r)) / sqrt(var(r) + eps) * gamma + beta
        = (y - mean(y)) * |gamma| / sqrt(var(y) + eps * scale^2) + beta."""
        with torch.no_grad():
            y = self._conv(x, self.frozen_bias.to(self.weight.dtype))
            variance, mean = torch.var_mean(y.float() if y.dtype == torch.float16 else y, dim=(0, 2, 3),
                                            unbiased=False)
            self.statistics.record(self, mean, y.shape[0])
            gamma_abs, eps_scale2 = self.bn_train_mode.to(mean.dtype)
            factor = gamma_abs / torch.sqrt(variance + eps_scale2)
            y = (y - mean.to(y.dtype).view(1, -1, 1, 1)) * factor.to(y.dtype).view(1, -1, 1, 1) + \
                self.shift.to(y.dtype).view(1, -1, 1, 1)
            if residual is not None:
                y = y + residual
            return activate_inplace(y, upper)

    def _conv(self, x, bias):
        if self.tf_same:
            x, _ = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        x = dense(x)
        return conv2d_forward(x, self._weight_for(x), bias, self.stride, self.padding, self.dilation,
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
