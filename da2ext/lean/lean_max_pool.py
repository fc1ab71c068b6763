"""Max pooling that keeps one byte per output element for backward.

PyTorch's max_pool2d keeps int64 indices into the input plane: 8 bytes per
output element, 12.25 MiB after ResNet-50's stem at batch 8 - more than all
the network's packed activation masks together. The backward needs only which
of the k*k window positions won, which fits in a uint8 for windows of up to
256 positions. The forward converts the plane indices to window offsets (a
table lookup); the backward turns them back into plane indices (a gather from
the k*k steps, plus the window origins) and hands them to max_pool2d's own
backward, which scatter-adds (windows overlap when stride < kernel, so two
outputs may send gradient to one input). Both work in the input's memory
order, contiguous or channels_last. On ResNet-50's stem pool at batch 8 in
channels_last, forward and input gradient took 28 ms (median of 30) against
49 ms for the division, remainder and scatter_add passes this replaced
(e93ddc0), and 13 ms for max_pool2d keeping int64 indices
(DA2EXT_BENCH_ROUNDS=30 pytest benchmarks/test_channels_last_benchmark.py
--benchmark-only -k max_pool).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from ..ops.memory_order import CHANNELS_LAST, from_memory_view, in_memory_order, memory_order, memory_view

__all__ = ["LeanMaxPool2d"]


def _window_starts(out_h, out_w, stride, padding, width, device):
    """Plane index of each output's window origin (its top-left corner, which may lie
    in the padding), shape (out_h, out_w), int64."""
    rows = torch.arange(out_h, device=device) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=device) * stride[1] - padding[1]
    return rows.view(-1, 1) * width + cols.view(1, -1)


def _window_steps(kernel_size, dilation, width, device):
    """How far window position p = i * k_w + j lies from the window's origin in the
    input plane: i * d_h * width + j * d_w, shape (k_h * k_w,), int64."""
    rows = torch.arange(kernel_size[0], device=device) * (dilation[0] * width)
    cols = torch.arange(kernel_size[1], device=device) * dilation[1]
    return (rows.view(-1, 1) + cols.view(1, -1)).reshape(-1)


def _offsets(plane_index, kernel_size, stride, padding, dilation, width):
    """The window position (uint8) of each max, from its plane index."""
    out_h, out_w = plane_index.shape[-2:]
    step = plane_index - _window_starts(out_h, out_w, stride, padding, width, plane_index.device)
    if (kernel_size[1] - 1) * dilation[1] < width:
        # A window's columns are fewer than a row's, so each step belongs to one window
        # position: a lookup table from step to position, one gather. Sized from Python
        # ints, not from `steps` (reading a CUDA tensor on the host would synchronise,
        # and CUDAGraphStep cannot capture that).
        steps = _window_steps(kernel_size, dilation, width, plane_index.device)
        farthest = (kernel_size[0] - 1) * dilation[0] * width + (kernel_size[1] - 1) * dilation[1]
        table = torch.zeros(farthest + 1, dtype=torch.uint8, device=plane_index.device)
        table[steps] = torch.arange(steps.numel(), device=plane_index.device).to(torch.uint8)
        order = memory_order(plane_index)
        return from_memory_view(table.take(memory_view(step, order)), order)
    # A window wider than the plane (padding on both sides): divide it out.
    row, col = step // width, step % width
    return ((row // dilation[0]) * kernel_size[1] + col // dilation[1]).to(torch.uint8)


class LeanMaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        y, plane_index = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        offset = _offsets(plane_index, kernel_size, stride, padding, dilation, x.shape[-1])
        ctx.pool_args = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.input_shape = x.shape
        ctx.order = memory_order(x)
        ctx.save_for_backward(offset)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        offset, = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.pool_args
        width = ctx.input_shape[-1]
        out_h, out_w = offset.shape[-2:]
        device = offset.device
        # Plane index = window origin + the step to the max's position, worked out in
        # memory order (the offsets were stored in the input's).
        starts = _window_starts(out_h, out_w, stride, padding, width, device)
        if ctx.order == CHANNELS_LAST:
            starts = starts.unsqueeze(-1)
        steps = _window_steps(kernel_size, dilation, width, device)
        plane_index = from_memory_view(steps.take(memory_view(offset, ctx.order).long()).add_(starts), ctx.order)
        # max_pool2d's own backward scatters by the plane indices; its input argument
        # gives only the size and the memory order, so an unwritten one serves.
        like_input = torch.empty(ctx.input_shape, dtype=grad_output.dtype, device=device,
                                 memory_format=torch.channels_last if ctx.order == CHANNELS_LAST
                                 else torch.contiguous_format)
        grad_output = in_memory_order(grad_output, ctx.order)
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_output, like_input, list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode,
            plane_index)
        return grad_input, None, None, None, None, None


class LeanMaxPool2d(nn.Module):
    """nn.MaxPool2d (4-D input) keeping a uint8 window offset per output element for
    backward instead of an int64 index. Build it with LeanMaxPool2d.from_module(pool)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super(LeanMaxPool2d, self).__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.ceil_mode = bool(ceil_mode)
        if self.kernel_size[0] * self.kernel_size[1] > 256:
            raise ValueError("LeanMaxPool2d: kernel_size {} has more than 256 window positions".format(
                self.kernel_size))

    @classmethod
    def from_module(cls, pool):
        if not isinstance(pool, nn.MaxPool2d) or pool.return_indices:
            raise NotImplementedError("expected an nn.MaxPool2d without return_indices")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("LeanMaxPool2d: input must be N x C x H x W, got shape {}".format(tuple(x.shape)))
        if torch.is_grad_enabled() and x.requires_grad:
            return LeanMaxPool2dFunction.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                               self.ceil_mode)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self):
        return "kernel_size={}, stride={}, padding={}, dilation={}, ceil_mode={}".format(
            self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
