"""The fused residual attention op with autograd (docs/design.md §2), any rank k.

On the CPU (extension built against torch >= 1.11) the adaptor is one op,
torch.ops.da2ext.residual_attention, whose forward, saved tensors and backward
node are C++ (csrc/ops/residual_attention_autograd.cpp): the passes below run
from C++ with no Python or dispatch between them. On CUDA the same op runs the
passes and the small branch as eight kernel launches
(csrc/ops/cuda/residual_attention_one_op_cuda.cpp) where DA2EXT_CUDA_ONE_OP=1 (or
within one_op_on_cuda()); until its tests have run on a GPU, and elsewhere (older
torch), ResidualAttentionFunction runs the passes op by op:

Forward: one kernel pools the descriptors from F, the small branch (MLP and
spatial conv) runs in plain PyTorch, one kernel writes y. What is kept for
backward, all through ctx.save_for_backward: the descriptors, the argmax
channel per position, the MLP's hidden layer, the channel logits and the
parameters - O(N * (k*C + H*W)) numbers; the k spatial logit maps are
recomputed from the descriptors - plus F itself in mode "mul"
(optionally as a float16 copy). The attention map is never stored: every
kernel rebuilds it from the two gates.

Backward: one kernel reduces g (and F in mode "mul") into the two attention
sums, the small branch's backward is written out on small tensors
(attention_branch_backward.py), and one kernel writes dF including the
descriptor paths.
"""
import os

import torch
from torch.autograd.function import once_differentiable

from ._extension import kernels_available, warn_fallback
from ._validation import check_feature_map
from .attention_branch import attention_logits_with_hidden, spatial_attention_logits
from .attention_branch_backward import attention_logits_backward
from .memory_order import dense, in_memory_order, memory_order
from .reference import residual_attention_reference

__all__ = ["one_op_on_cuda", "op_by_op", "residual_attention", "uses_one_op"]


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gates(channel_logits, spatial_logits, gamma, acc_dtype):
    """sigmoid(a_c), gate_channel = gamma * sigmoid(a_c) and gate_spatial = sigmoid(a_s),
    in the accumulation dtype: N x C and N x H x W at rank 1, N x k x C and
    N x k x H x W at rank k (the kernels' two gate layouts)."""
    rank = spatial_logits.shape[1]
    shape = (channel_logits.shape[0], gamma.shape[-1]) if rank == 1 else (
        channel_logits.shape[0], rank, gamma.shape[-1])
    channel_sigmoid = torch.sigmoid(channel_logits.to(acc_dtype)).reshape(shape)
    gate_channel = (gamma.to(acc_dtype) * channel_sigmoid).contiguous()
    gate_spatial = torch.sigmoid(spatial_logits.to(acc_dtype))
    gate_spatial = (gate_spatial.squeeze(1) if rank == 1 else gate_spatial).contiguous()
    return channel_sigmoid, gate_channel, gate_spatial


def _keep_for_backward(ctx, x, multiplicative, saved_input_dtype, channel_mean, spatial, argmax, hidden_pre,
                       channel_logits, gamma, fc1_weight, fc2_weight, spatial_weight, spatial_bias):
    """What ResidualAttentionFunction keeps (the one-op adaptor keeps the same), all through
    ctx.save_for_backward. All small: the descriptors, the argmax, the MLP's hidden layer,
    the channel logits, the parameters (the spatial logits, k maps of N x H x W, are
    recomputed in backward from the descriptors); plus F in mode "mul", in
    saved_input_dtype if given."""
    kept_input = None
    if multiplicative:
        kept_input = x if saved_input_dtype is None else x.to(saved_input_dtype)
    ctx.multiplicative = multiplicative
    ctx.order = memory_order(x)  # the kernels read the gradient in the input's memory order
    ctx.save_for_backward(channel_mean, spatial, argmax, hidden_pre, channel_logits, gamma, kept_input,
                          fc1_weight, fc2_weight, spatial_weight, spatial_bias)


class ResidualAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma,
                multiplicative, saved_input_dtype):
        branch = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias)
        channel_mean, spatial, argmax = torch.ops.da2ext.descriptor_pool(x)
        hidden_pre, channel_logits, spatial_logits = attention_logits_with_hidden(channel_mean, spatial, *branch)
        _, gate_channel, gate_spatial = _gates(channel_logits, spatial_logits, gamma, _accumulate_dtype(x.dtype))
        y = torch.ops.da2ext.attention_apply(x, gate_channel, gate_spatial, multiplicative)
        _keep_for_backward(ctx, x, multiplicative, saved_input_dtype, channel_mean, spatial, argmax, hidden_pre,
                           channel_logits, gamma, fc1_weight, fc2_weight, spatial_weight, spatial_bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (channel_mean, spatial, argmax, hidden_pre, channel_logits, gamma, kept_input, fc1_weight, fc2_weight,
         spatial_weight, spatial_bias) = ctx.saved_tensors
        spatial_logits = spatial_attention_logits(spatial, spatial_weight, spatial_bias)
        needs = ctx.needs_input_grad
        grad_output = in_memory_order(grad_output, ctx.order)
        acc_dtype = _accumulate_dtype(grad_output.dtype)
        channel_sigmoid, gate_channel, gate_spatial = _gates(channel_logits, spatial_logits, gamma, acc_dtype)

        input_for_reduce = None
        if ctx.multiplicative:
            input_for_reduce = in_memory_order(kept_input.to(grad_output.dtype), ctx.order)
        channel_sum, spatial_sum = torch.ops.da2ext.attention_backward_reduce(
            grad_output, input_for_reduce, gate_channel, gate_spatial, ctx.multiplicative)

        grad_gamma = (channel_sigmoid * channel_sum).sum(0).to(gamma.dtype) if needs[7] else None
        # Rank k: the sums come as N x k x C and N x k x H x W; the logits are N x k*C and N x k x H x W.
        grad_channel_logits = (gamma.to(acc_dtype) * channel_sigmoid * (1 - channel_sigmoid) *
                               channel_sum).reshape(channel_logits.shape)
        grad_spatial_logits = (gate_spatial * (1 - gate_spatial) * spatial_sum).reshape(spatial_logits.shape)
        # The small branch's backward runs in the accumulation dtype too (its tensors
        # are O(N*(C + H*W)), the casts cost nothing): its one-element spatial.bias
        # gradient sums N*H*W terms that largely cancel: summed in float16 on an
        # H100 it came out 4.9e-3 off (relative), above the tests' float16 bound of 2e-3.
        # (channel_mean, spatial) need gradients exactly when the input does.
        grads = attention_logits_backward(
            grad_channel_logits, grad_spatial_logits, channel_mean.to(acc_dtype), spatial.to(acc_dtype),
            hidden_pre.to(acc_dtype), fc1_weight.to(acc_dtype), fc2_weight.to(acc_dtype),
            spatial_weight.to(acc_dtype), (needs[0], needs[0]) + tuple(needs[1:7]))
        # Back to each parameter's dtype: fc1's weight and bias share it, as do fc2's and the conv's.
        param_dtypes = (fc1_weight.dtype,) * 2 + (fc2_weight.dtype,) * 2 + (spatial_weight.dtype,) * 2
        param_grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads[2:], param_dtypes))

        grad_input = None
        if needs[0]:
            grad_input = torch.ops.da2ext.attention_input_grad(
                grad_output, gate_channel, gate_spatial, grads[0].contiguous(), grads[1].contiguous(), argmax,
                ctx.multiplicative)
        return (grad_input,) + param_grads + (grad_gamma, None, None)


def _default_one_op_devices():
    """The CPU; and CUDA where DA2EXT_CUDA_ONE_OP=1 asks for it: the CUDA forward and backward
    ops (csrc/ops/cuda/residual_attention_one_op_cuda.cpp, eight launches an adaptor) are
    compiled and checked against the op-by-op path by tests/test_one_op_adaptor_cuda.py, and
    become the default once those have passed on a GPU."""
    return ("cpu", "cuda") if os.environ.get("DA2EXT_CUDA_ONE_OP") == "1" else ("cpu",)


_ONE_OP_DEVICES = _default_one_op_devices()  # where the one-op adaptor runs


def uses_one_op(x):
    """Whether residual_attention runs torch.ops.da2ext.residual_attention for `x`: on
    the devices it is registered for, with an extension that has it (torch >= 1.11)."""
    return x.device.type in _ONE_OP_DEVICES and _one_op() is not None


def _one_op():
    """torch.ops.da2ext.residual_attention.default, or None where the extension lacks it;
    looked up once (an overload called directly skips the packet's overload resolution)."""
    global _ONE_OP
    if _ONE_OP is None:
        from .fake_kernels import has_op
        _ONE_OP = torch.ops.da2ext.residual_attention.default if has_op("residual_attention") else False
    return _ONE_OP or None


_ONE_OP = None


class _one_op_devices(object):
    """Within it, the one-op adaptor runs on `devices` (device types) and the op-by-op path elsewhere."""

    def __init__(self, devices):
        self._devices = tuple(devices)

    def __enter__(self):
        global _ONE_OP_DEVICES
        self._saved, _ONE_OP_DEVICES = _ONE_OP_DEVICES, self._devices
        return self

    def __exit__(self, *exc):
        global _ONE_OP_DEVICES
        _ONE_OP_DEVICES = self._saved
        return False


class op_by_op(_one_op_devices):
    """Within it, residual_attention runs the op-by-op path on every device (the
    CUDA path by default, and the baseline the one-op adaptor is measured and tested against)."""

    def __init__(self):
        super(op_by_op, self).__init__(())


class one_op_on_cuda(_one_op_devices):
    """Within it, residual_attention runs the one-op adaptor on CUDA too (what
    DA2EXT_CUDA_ONE_OP=1 makes the default): for its tests and benchmarks."""

    def __init__(self):
        super(one_op_on_cuda, self).__init__(("cpu", "cuda"))


def residual_attention(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma,
                       mode="add", saved_input_dtype=None):
    """y = F + gamma*A (mode "add") or F * (1 + gamma*A) (mode "mul") with the fused kernels.

    Rank k (gamma of shape (k, C), fc2 giving k*C logits, the spatial conv k
    maps): gamma*A is the sum of k such products (docs/design.md §2).

    `x` is an (N, C, H, W) tensor with the parameters' dtype and device. On the
    CPU a channels_last `x` is read as it is and y comes out channels_last too;
    elsewhere (CUDA), and for any other strides, `x` is made contiguous first (a copy).
    `saved_input_dtype` (mode "mul" only): keep F for backward in this dtype,
    e.g. torch.float16 to halve what mode "mul" keeps. Where no kernels exist for
    x's device the reference runs instead, with a warning (see da2ext.backend()).
    """
    check_feature_map(x, gamma.shape[-1], gamma, "residual_attention")
    if mode not in ("add", "mul"):
        raise ValueError('mode must be "add" or "mul", got {!r}'.format(mode))
    if saved_input_dtype is not None and not saved_input_dtype.is_floating_point:
        raise TypeError("saved_input_dtype must be a floating-point dtype, got {}".format(saved_input_dtype))
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma)
    if not kernels_available(x.device.type):
        warn_fallback(x.device.type)
        return residual_attention_reference(x, *params, mode=mode)
    if uses_one_op(x):
        # one dispatch: the forward, what is kept and the backward node all in C++
        return _one_op()(dense(x), *params, mode == "mul", saved_input_dtype)
    return ResidualAttentionFunction.apply(dense(x), *params, mode == "mul", saved_input_dtype)
