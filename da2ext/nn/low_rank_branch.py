"""A low-rank convolution branch beside a late frozen block (docs/design.md §2,
"Late branches").

The frozen deep stages cap what the BN shifts and the adaptors can learn on a far
domain; their maps are small (7 x 7 at 224 px, 2 x 2 at 64 px), so a branch there
costs little activation memory. Beside a block of stride s (its output s times
smaller than its input) it computes, from the block's input x,

    p = mean_pool_2(x)                           C_in x ceil(H / 2) x ceil(W / 2)
    h = relu(conv_3x3,s(relu(conv_down(p))))     width channels, the 3x3 conv at stride s
    z = bn(conv_up(h))                           C_out channels; bn's scale starts at 0

and adds z, bilinearly upsampled to the block's output size, to the block's
output: TinyTL's lite residual (da2ext/methods/lite_residual.py), narrowed to
`width` inner channels. A fresh branch adds exactly zero. The BN normalises
with the batch's statistics in training (its running statistics, for inference,
are per domain); its scale starting at zero grows the branch's share by about
its rate per step.

Kept for backward: the pooled input p (for conv_down's weight gradient; in
float16 when the branch runs in float32), the width-channel maps, and per channel
of the output the batch mean and inverse deviation. Nothing of the block's input
(autograd's avg_pool2d would keep x: pool_and_project keeps only p) and nothing of
C_out channels at map size (the BN's input is recomputed from h in backward:
project_and_normalise).
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankConvBranch", "pool_and_project", "project_and_normalise"]


def _window_counts(size, factor, like):
    """How many of `size` positions each `factor`-wide window of a ceil-mode pool covers."""
    windows = (size + factor - 1) // factor
    counts = torch.full((windows,), float(factor), dtype=like.dtype, device=like.device)
    counts[-1] = float(size - factor * (windows - 1))
    return counts


def _spread(grad, input_size, factor):
    """The input gradient of a ceil-mode factor x factor average pool of an input of
    `input_size` (H, W), given its output gradient: each output position's gradient,
    divided by its window's count, spread over its window."""
    height, width = input_size
    grad = grad / (_window_counts(height, factor, grad)[:, None] * _window_counts(width, factor, grad)[None, :])
    grad = grad.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return grad[..., :height, :width]


class _PoolAndProjectFunction(torch.autograd.Function):
    """conv_1x1(avg_pool2d(x, 2, 2, ceil_mode=True), weight), keeping for backward
    only the pooled input, in `keep_dtype` (the weight gradient's input), never x:
    autograd's avg_pool2d would keep x, a full-size activation."""

    @staticmethod
    def forward(ctx, x, weight, keep_dtype):
        pooled = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        ctx.input_size = tuple(x.shape[-2:])
        ctx.save_for_backward(pooled if keep_dtype is None else pooled.to(keep_dtype), weight)
        return F.conv2d(pooled, weight)

    @staticmethod
    def backward(ctx, grad):
        pooled, weight = ctx.saved_tensors
        grad_x = _spread(F.conv_transpose2d(grad, weight), ctx.input_size, 2) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.einsum("nchw,nkhw->ck", grad, pooled.to(grad.dtype))[:, :, None, None]
        return grad_x, grad_weight, None


def pool_and_project(x, weight, keep_dtype=None):
    """F.conv2d(F.avg_pool2d(x, 2, 2, ceil_mode=True), weight) for a 1x1 `weight`,
    keeping only the pooled input for backward, in keep_dtype (None: as it is;
    torch.float16 halves it, the weight gradient then computed from the rounded
    copy)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _PoolAndProjectFunction.apply(x, weight, keep_dtype)
    return F.conv2d(F.avg_pool2d(x, 2, 2, ceil_mode=True), weight)  # exported and traced as the standard ops


def _per_channel(v):
    return v[None, :, None, None]


def _all_reduce_sum(tensor, group):
    import torch.distributed as dist
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class _ProjectAndNormaliseFunction(torch.autograd.Function):
    """bn_weight * (z - mean) * invstd + bn_bias with z = conv_1x1(h, weight) and the
    batch's per-channel mean and inverse deviation, keeping h, not z: backward
    recomputes z from h (one small conv) and applies batch norm's own gradient.
    group: a torch.distributed process group whose processes share the batch (its
    statistics and their gradient's two sums are summed over the group, as
    SyncBatchNorm does), or None."""

    @staticmethod
    def forward(ctx, h, weight, bn_weight, bn_bias, eps, group):
        z = F.conv2d(h, weight)
        count = z.numel() // z.shape[1]
        if group is None:
            mean = z.mean(dim=(0, 2, 3))
            var = z.var(dim=(0, 2, 3), unbiased=False)
        else:  # the group's batch: sums over the processes, then the mean, then the deviations from it
            sums = _all_reduce_sum(torch.cat([z.sum(dim=(0, 2, 3)), z.new_tensor([count])]), group)
            count = int(round(float(sums[-1])))
            mean = sums[:-1] / count
            var = _all_reduce_sum((z - _per_channel(mean)).pow(2).sum(dim=(0, 2, 3)), group) / count
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(h, weight, bn_weight, mean, invstd)
        ctx.count, ctx.group = count, group
        ctx.mark_non_differentiable(mean, var)
        out = (z - _per_channel(mean)) * _per_channel(invstd * bn_weight) + _per_channel(bn_bias)
        return out, mean, var, z.new_tensor(float(count))

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var, _grad_count):
        h, weight, bn_weight, mean, invstd = ctx.saved_tensors
        dims = (0, 2, 3)
        normalised = (F.conv2d(h, weight) - _per_channel(mean)) * _per_channel(invstd)
        grad_bn_bias = grad.sum(dim=dims)
        grad_bn_weight = (grad * normalised).sum(dim=dims)
        # batch norm's input gradient, per channel: (g - mean(g) - x_hat * mean(g * x_hat)) * invstd, g the
        # gradient at x_hat, the means over the (group's) batch
        grad_normalised = grad * _per_channel(bn_weight)
        sums = torch.stack([grad_normalised.sum(dim=dims), (grad_normalised * normalised).sum(dim=dims)])
        if ctx.group is not None:
            sums = _all_reduce_sum(sums, ctx.group)
        grad_z = (grad_normalised - _per_channel(sums[0] / ctx.count)
                  - normalised * _per_channel(sums[1] / ctx.count)) * _per_channel(invstd)
        grad_h = F.conv_transpose2d(grad_z, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.einsum("nchw,nkhw->ck", grad_z, h)[:, :, None, None] if ctx.needs_input_grad[1] else None
        return grad_h, grad_weight, grad_bn_weight, grad_bn_bias, None, None


def project_and_normalise(h, weight, bn, group=None):
    """bn(F.conv2d(h, weight)) for a BatchNorm2d `bn` in training (the batch's
    statistics; its running statistics moved as its own forward moves them),
    keeping h for backward instead of the C_out-channel projection. group: a
    torch.distributed process group sharing the batch (statistics over all of it,
    as SyncBatchNorm), or None."""
    out, mean, var, count = _ProjectAndNormaliseFunction.apply(h, weight, bn.weight, bn.bias, bn.eps, group)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            count = float(count)
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var * count / max(count - 1, 1), alpha=factor)  # unbiased, as BN
    return out


class LowRankConvBranch(nn.Module):
    """Args:
        in_channels: C_in, the channels of the block's input.
        out_channels: C_out, the channels of the block's output.
        stride: the block's own stride (its output is this many times smaller than its input),
            the 3x3 conv's.
        width: the branch's inner channels (its rank).
        keep_dtype: the dtype the pooled input is kept in for backward when the branch
            runs in float32 (torch.float16: half the bytes; conv_down's weight gradient
            then comes from the rounded copy); None keeps it as it is.
    forward(x, size=None): the branch's contribution for block input x, upsampled to
        `size` (H_out, W_out), or at its own resolution (None: see upsample).
    """

    def __init__(self, in_channels, out_channels, stride=1, width=64, keep_dtype=torch.float16):
        super(LowRankConvBranch, self).__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride),
                            ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError("LowRankConvBranch: {} must be a positive int, got {!r}".format(name, value))
        if keep_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError("LowRankConvBranch: keep_dtype must be None, torch.float16 or torch.bfloat16, got "
                             "{!r}".format(keep_dtype))
        self.in_channels, self.out_channels, self.stride, self.width = in_channels, out_channels, stride, width
        self.keep_dtype = keep_dtype
        self.down = nn.Conv2d(in_channels, width, 1, bias=False)
        self.conv = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.up = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.bn.weight)  # a fresh branch adds nothing: the adapted model starts as the pretrained one
        # A torch.distributed process group whose processes share each batch (set by
        # da2ext.training.distributed.DistributedRun.wrap): the BN's statistics are then the group's.
        self.statistics_group = None

    def extra_repr(self):
        return "{}, {}, stride={}, width={}".format(self.in_channels, self.out_channels, self.stride, self.width)

    def forward(self, x, size=None):
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.in_channels):  # an export traces
            raise ValueError("LowRankConvBranch: x must be N x {} x H x W, got {}".format(
                self.in_channels, tuple(x.shape)))
        # A float32 branch keeps its pooled input in keep_dtype; float64 (gradient checks) keeps it exact.
        keep = self.keep_dtype if x.dtype == torch.float32 else None
        h = torch.relu(self.conv(torch.relu(pool_and_project(x, self.down.weight, keep))))
        if self.bn.training and torch.is_grad_enabled():
            z = project_and_normalise(h, self.up.weight, self.bn, self.statistics_group)
        else:
            z = self.bn(self.up(h))  # inference (running statistics), exported and traced as standard ops
        return z if size is None else self.upsample(z, size)

    @staticmethod
    def upsample(z, size):
        """z bilinearly resized to `size` (keeps nothing for backward)."""
        return F.interpolate(z, size=tuple(size), mode="bilinear", align_corners=False)
