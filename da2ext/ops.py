"""The fused residual attention op with autograd (DESIGN.md §2).

Forward: one kernel pools the descriptors from F, the small branch (MLP and
spatial conv) runs in plain PyTorch, one kernel writes y. What is kept for
backward, all through ctx.save_for_backward: the descriptors, the argmax
channel per position and the parameters - O(N * (C + H*W)) numbers - plus F
itself in mode "mul" (optionally as a float16 copy). The attention factors are
recomputed in backward from the descriptors.

Backward: one kernel reduces g (and F in mode "mul") into the two attention
sums, the small branch's backward runs as ordinary autograd on small tensors,
and one kernel writes dF including the descriptor paths.
"""
import torch
from torch.autograd.function import once_differentiable

from ._extension import kernels_available, warn_fallback
from .attention_branch import attention_logits
from .reference import residual_attention_reference

__all__ = ["residual_attention"]


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gates(channel_logits, spatial_logits, gamma, acc_dtype):
    """sigmoid(a_c), gate_channel = gamma * sigmoid(a_c) (N x C) and
    gate_spatial = sigmoid(a_s) (N x H x W), in the accumulation dtype."""
    channel_sigmoid = torch.sigmoid(channel_logits.to(acc_dtype))
    gate_channel = (gamma.to(acc_dtype) * channel_sigmoid).contiguous()
    gate_spatial = torch.sigmoid(spatial_logits.to(acc_dtype)).squeeze(1).contiguous()
    return channel_sigmoid, gate_channel, gate_spatial


class ResidualAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma,
                multiplicative, saved_input_dtype):
        branch = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias)
        channel_mean, spatial, argmax = torch.ops.da2ext.descriptor_pool(x)
        channel_logits, spatial_logits = attention_logits(channel_mean, spatial, *branch)
        _, gate_channel, gate_spatial = _gates(channel_logits, spatial_logits, gamma, _accumulate_dtype(x.dtype))
        y = torch.ops.da2ext.attention_apply(x, gate_channel, gate_spatial, multiplicative)
        kept_input = None
        if multiplicative:
            kept_input = x if saved_input_dtype is None else x.to(saved_input_dtype)
        ctx.multiplicative = multiplicative
        ctx.save_for_backward(channel_mean, spatial, argmax, gamma, kept_input, *branch)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        channel_mean, spatial, argmax, gamma, kept_input = ctx.saved_tensors[:5]
        branch = ctx.saved_tensors[5:]
        needs_input, needs_branch, needs_gamma = ctx.needs_input_grad[0], ctx.needs_input_grad[1:7], \
            ctx.needs_input_grad[7]
        grad_output = grad_output.contiguous()
        acc_dtype = _accumulate_dtype(grad_output.dtype)

        # Re-run the small branch (a few kB) with autograd on, from the saved descriptors.
        with torch.enable_grad():
            channel_mean = channel_mean.detach().requires_grad_(needs_input)
            spatial = spatial.detach().requires_grad_(needs_input)
            branch = [t.detach().requires_grad_(need) for t, need in zip(branch, needs_branch)]
            channel_logits, spatial_logits = attention_logits(channel_mean, spatial, *branch)
        channel_sigmoid, gate_channel, gate_spatial = _gates(channel_logits.detach(), spatial_logits.detach(),
                                                             gamma, acc_dtype)

        input_for_reduce = None
        if ctx.multiplicative:
            input_for_reduce = kept_input.to(grad_output.dtype).contiguous()
        channel_sum, spatial_sum = torch.ops.da2ext.attention_backward_reduce(
            grad_output, input_for_reduce, gate_channel, gate_spatial, ctx.multiplicative)

        grad_gamma = (channel_sigmoid * channel_sum).sum(0).to(gamma.dtype) if needs_gamma else None
        grad_channel_logits = gamma.to(acc_dtype) * channel_sigmoid * (1 - channel_sigmoid) * channel_sum
        grad_spatial_logits = (gate_spatial * (1 - gate_spatial) * spatial_sum).unsqueeze(1)

        wanted = [channel_mean, spatial] if needs_input else []
        wanted += [t for t in branch if t.requires_grad]
        grads = {}
        if wanted:
            outputs, output_grads = [], []
            for logits, grad in ((channel_logits, grad_channel_logits), (spatial_logits, grad_spatial_logits)):
                if logits.requires_grad:
                    outputs.append(logits)
                    output_grads.append(grad.to(logits.dtype))
            found = torch.autograd.grad(outputs, wanted, output_grads, allow_unused=True)
            grads = {id(t): g if g is not None else torch.zeros_like(t) for t, g in zip(wanted, found)}

        grad_input = None
        if needs_input:
            grad_input = torch.ops.da2ext.attention_input_grad(
                grad_output, gate_channel, gate_spatial,
                grads[id(channel_mean)].to(acc_dtype).contiguous(), grads[id(spatial)].to(acc_dtype).contiguous(),
                argmax, ctx.multiplicative)
        grad_branch = [grads.get(id(t)) for t in branch]
        return (grad_input,) + tuple(grad_branch) + (grad_gamma, None, None)


def residual_attention(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma,
                       mode="add", saved_input_dtype=None):
    """y = F + gamma*A (mode "add") or F * (1 + gamma*A) (mode "mul") with the fused kernels.

    `x` is an (N, C, H, W) tensor with the parameters' dtype and device; a
    channels_last or otherwise strided `x` is made contiguous first (a copy).
    `saved_input_dtype` (mode "mul" only): keep F for backward in this dtype,
    e.g. torch.float16 to halve what mode "mul" keeps. Where no kernels exist for
    x's device the reference runs instead, with a warning (see da2ext.backend()).
    """
    if mode not in ("add", "mul"):
        raise ValueError('mode must be "add" or "mul", got {!r}'.format(mode))
    if saved_input_dtype is not None and not saved_input_dtype.is_floating_point:
        raise TypeError("saved_input_dtype must be a floating-point dtype, got {}".format(saved_input_dtype))
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma)
    if not kernels_available(x.device.type):
        warn_fallback(x.device.type)
        return residual_attention_reference(x, *params, mode=mode)
    return ResidualAttentionFunction.apply(x.contiguous(), *params, mode == "mul", saved_input_dtype)
