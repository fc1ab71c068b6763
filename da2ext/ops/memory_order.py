"""The two memory orders the lean backbone runs in, and how its elementwise
kernels see them.

On the CPU the frozen backbone runs channels_last (N x H x W x C in memory):
oneDNN's convolutions run there without reordering every activation to and
from their blocked layout, which in NCHW costs a good part of each frozen
conv's forward and input-gradient pass (see adapt()'s `cpu_channels_last`).
Every lean module keeps the memory order its input came in; on CUDA that is
NCHW, which the CUDA kernels expect.

The CPU kernels take both orders: the packed activation's are elementwise
over memory, so a channels_last tensor's mask follows its memory order, and its
backward must read the gradient in that same order (in_memory_order); the
adaptor's and the fused mask-and-channel-sum pass have loops for each. A
channels_last tensor's memory_view, its (N, H, W, C) permutation, is
contiguous: a product over its channels is one matrix product.
"""
import torch

__all__ = ["CHANNELS_LAST", "CONTIGUOUS", "dense", "from_memory_view", "in_memory_order", "memory_order", "memory_view"]

CONTIGUOUS = "contiguous"
CHANNELS_LAST = "channels_last"


def memory_order(t):
    """CONTIGUOUS for a contiguous tensor (NCHW, for 4-D), CHANNELS_LAST for a 4-D
    tensor dense in channels_last order (and not contiguous), None otherwise."""
    if t.is_contiguous():
        return CONTIGUOUS
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return CHANNELS_LAST
    return None


def in_memory_order(t, order):
    """`t` dense in `order` (itself if it is already, else a copy)."""
    if order == CHANNELS_LAST:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def memory_view(t, order):
    """A contiguous view of `t`'s memory (dense in `order`): `t` itself, or for
    channels_last its (N, H, W, C) permutation."""
    return t.permute(0, 2, 3, 1) if order == CHANNELS_LAST else t


def from_memory_view(v, order):
    """The inverse of memory_view: the logical (N, C, H, W) tensor."""
    return v.permute(0, 3, 1, 2) if order == CHANNELS_LAST else v


def dense(x):
    """`x` as the lean modules run it: as it is when contiguous, or channels_last
    on the CPU; otherwise a contiguous copy (the CUDA kernels read NCHW)."""
    order = memory_order(x)
    if order == CONTIGUOUS or (order == CHANNELS_LAST and x.device.type == "cpu"):
        return x
    return x.contiguous()
