"""nn.ReLU and nn.ReLU6 that keep one bit per element for backward: the modules
over the packed activation op (ops/packed_activation.py)."""
from torch import nn

from ..ops.packed_activation import packed_relu, packed_relu6

__all__ = ["PackedReLU", "PackedReLU6"]


class PackedReLU(nn.Module):
    """nn.ReLU that keeps one bit per element for backward; `inplace` as nn.ReLU's."""

    def __init__(self, inplace=False):
        super(PackedReLU, self).__init__()
        self.inplace = inplace

    def forward(self, x):
        return packed_relu(x, self.inplace)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class PackedReLU6(nn.Module):
    """nn.ReLU6 that keeps one bit per element for backward; `inplace` as nn.ReLU6's."""

    def __init__(self, inplace=False):
        super(PackedReLU6, self).__init__()
        self.inplace = inplace

    def forward(self, x):
        return packed_relu6(x, self.inplace)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""
