"""Max pooling that keeps one byte per output element for backward.

PyTorch's max_pool2d keeps int64 indices into the input plane: 8 bytes per
output element, 12.25 MiB after ResNet-50's stem at batch 8 - more than all
the network's packed activation masks together. The backward needs only which
of the k*k window positions won, which fits in a uint8 for windows of up to
256 positions. The forward converts the plane indices to window offsets; the
backward turns them back and scatter-adds (windows overlap when stride <
kernel, so two outputs may send gradient to one input). A channels_last input
gets its gradient in channels_last, scattered along the positions of its
N x (H*W) x C memory.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from .memory_order import CHANNELS_LAST, from_memory_view, in_memory_order, memory_order, memory_view

__all__ = ["LeanMaxPool2d"]


def _window_origins(out_size, stride, padding, device):
    """Top (or left) input coordinate of each output's window, shape (out_size,)."""
    return torch.arange(out_size, device=device) * stride - padding


class LeanMaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        y, plane_index = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        width = x.shape[-1]
        out_h, out_w = y.shape[-2:]
        row = plane_index // width - _window_origins(out_h, stride[0], padding[0], x.device).view(-1, 1)
        col = plane_index % width - _window_origins(out_w, stride[1], padding[1], x.device).view(1, -1)
        # Window position in units of the dilation: row // d * k + col // d, in [0, k*k).
        offset = (row // dilation[0]) * kernel_size[1] + col // dilation[1]
        offset = offset.to(torch.uint8)
        ctx.pool_args = (kernel_size, stride, padding, dilation)
        ctx.input_shape = x.shape
        ctx.order = memory_order(x)
        ctx.save_for_backward(offset)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        offset, = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.pool_args
        n, c, height, width = ctx.input_shape
        out_h, out_w = grad_output.shape[-2:]
        offset = offset.long()
        row = (offset // kernel_size[1]) * dilation[0] + _window_origins(out_h, stride[0], padding[0],
                                                                          offset.device).view(-1, 1)
        col = (offset % kernel_size[1]) * dilation[1] + _window_origins(out_w, stride[1], padding[1],
                                                                          offset.device).view(1, -1)
        plane_index = row * width + col  # N x C x H_out x W_out
        if ctx.order == CHANNELS_LAST:
            index = memory_view(plane_index, CHANNELS_LAST).reshape(n, -1, c)
            grad = memory_view(in_memory_order(grad_output, CHANNELS_LAST), CHANNELS_LAST).reshape(n, -1, c)
            grad_input = grad_output.new_zeros(n, height * width, c)
            grad_input.scatter_add_(1, index, grad)
            return (from_memory_view(grad_input.view(n, height, width, c), CHANNELS_LAST), None, None, None, None,
                    None)
        grad_input = grad_output.new_zeros(n, c, height * width)
        grad_input.scatter_add_(2, plane_index.reshape(n, c, -1), grad_output.reshape(n, c, -1))
        return grad_input.view(n, c, height, width), None, None, None, None, None


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
