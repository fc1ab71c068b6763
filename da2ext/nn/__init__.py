"""The modules a user puts in a model, over the ops of da2ext.ops:

    adaptor.py      ResidualAttentionAdaptor, the fused residual attention adaptor
    low_rank_branch.py  LowRankConvBranch, a low-rank convolution branch beside a late frozen block
    packed_relu.py  PackedReLU and PackedReLU6, ReLU/ReLU6 keeping one bit per element for backward

The lean frozen backbone's own layers (FrozenConvBNAct, LeanMaxPool2d, ...) are in da2ext.lean.
"""
from .adaptor import ResidualAttentionAdaptor
from .low_rank_branch import LowRankConvBranch
from .packed_relu import PackedReLU, PackedReLU6

__all__ = ["LowRankConvBranch", "PackedReLU", "PackedReLU6", "ResidualAttentionAdaptor"]
