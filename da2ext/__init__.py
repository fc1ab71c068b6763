"""da2ext: Deep Attention Adaptor (DA2) with fused C++/CUDA kernels.

Freeze a pretrained CNN, learn a light residual attention adaptor after every
block, keep what backward needs near the floor. See README.md and docs/design.md.
"""
import torch  # noqa: F401  (the extension links against libtorch: load it first)

# Only the layers a model needs load here: da2ext.data, da2ext.methods and
# da2ext.cli load where they are used (`from da2ext import methods`).
from .domains.domain_file import DomainFileError
from .domains.multidomain import MultiDomainModel
from .lean.adapt import adapt
from .lean.frozen_conv import FrozenConvBNAct
from .lean.insert_adaptors import insert_adaptors
from .lean.kept_bytes import kept_bytes_by_part, largest_recompute_transient
from .lean.lean_max_pool import LeanMaxPool2d
from .lean.recomputed_block import RecomputedBlock
from .lean.shift_calibration import calibrate_shifts
from .lean.trainable import print_trainable_parameters, trainable_parameters
from .models import backbones
from .nn import LowRankConvBranch, PackedReLU, PackedReLU6, ResidualAttentionAdaptor
from .ops import backend, packed_activation, packed_relu, packed_relu6, reference, residual_attention
from .ops.attention_branch import spatial_kernel_size
from .profiling import SavedTensorCounter, profile_step, saved_bytes
from .training.cuda_graph_step import CUDAGraphStep

__version__ = "0.1.0"

__all__ = [
    "CUDAGraphStep",
    "DomainFileError",
    "FrozenConvBNAct",
    "LeanMaxPool2d",
    "LowRankConvBranch",
    "MultiDomainModel",
    "PackedReLU",
    "PackedReLU6",
    "RecomputedBlock",
    "ResidualAttentionAdaptor",
    "SavedTensorCounter",
    "adapt",
    "backend",
    "calibrate_shifts",
    "insert_adaptors",
    "kept_bytes_by_part",
    "largest_recompute_transient",
    "packed_activation",
    "packed_relu",
    "packed_relu6",
    "print_trainable_parameters",
    "profile_step",
    "reference",
    "residual_attention",
    "saved_bytes",
    "spatial_kernel_size",
    "trainable_parameters",
]
