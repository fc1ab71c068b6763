"""da2ext: Deep Attention Adaptor (DA2) with fused C++/CUDA kernels.

Freeze a pretrained CNN, learn a light residual attention adaptor after every
block, keep what backward needs near the floor. See README.md and DESIGN.md.
"""
import torch  # noqa: F401  (the extension links against libtorch: load it first)

from . import reference
from ._extension import backend
from .adaptor import ResidualAttentionAdaptor
from .attention_branch import spatial_kernel_size
from .memory import SavedTensorCounter, saved_bytes
from .ops import residual_attention
from .packed_activation import PackedReLU, PackedReLU6, packed_activation, packed_relu, packed_relu6

__version__ = "0.1.0"

__all__ = [
    "PackedReLU",
    "PackedReLU6",
    "ResidualAttentionAdaptor",
    "SavedTensorCounter",
    "backend",
    "packed_activation",
    "packed_relu",
    "packed_relu6",
    "reference",
    "residual_attention",
    "saved_bytes",
    "spatial_kernel_size",
]
