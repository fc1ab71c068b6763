"""The learnable part of a residual attention adaptor (docs/design.md §2), shared by the
fused module and the pure-PyTorch reference so both have one constructor and the
same state_dict keys: fc1/fc2 (the channel MLP), spatial (the 2 -> 1 conv) and gamma.
"""
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("add", "mul")


# The spatial conv (2 -> k channels, 7 x 7) on the CPU: on small maps oneDNN (mkldnn)
# loses to PyTorch's im2col + GEMM kernel (slow_conv2d), on large ones it wins by far.
# Measured on the idle 2-core development VM, 7x7 kernel, batch 8, forward / backward in
# ms: 112x112 oneDNN 2.5 / 16, im2col 27 / 36; 56x56 0.7 / 3.8 against 1.4 / 4.9; 28x28
# 0.22 / 1.04 against 0.25 / 0.49. So maps of at most 28x28 call the im2col kernel by
# name (aten::thnn_conv2d and its backward), which changes no global setting: a
# thread-safe choice per call. (Switching oneDNN off instead, as da2ext did before,
# let F.conv2d pick NNPACK at larger batches: same maths, other rounding.) Torch builds
# without those ops take F.conv2d's choice.
IM2COL_MAX_PIXELS = 28 * 28


def aten_op(name):
    """torch.ops.aten.<name>, or None where this torch has no such op."""
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):  # not in this torch
        return None


_IM2COL_CONV2D = aten_op("thnn_conv2d")
IM2COL_CONV2D_BACKWARD = aten_op("_slow_conv2d_backward")  # torch >= 1.11


def _tracing():
    """Whether torch.compile or torch.export is tracing (False on torch without them)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def uses_im2col_conv(spatial):
    """Whether the spatial conv over `spatial` (N x 2 x H x W) runs the im2col kernel.

    Not while tracing: the im2col ops have no fake kernel for symbolic shapes (a
    dynamic batch), and a compiler picks its own convolution anyway."""
    return (_IM2COL_CONV2D is not None and spatial.device.type == "cpu" and not _tracing() and
            spatial.dtype in (torch.float32, torch.float64) and
            spatial.shape[-1] * spatial.shape[-2] <= IM2COL_MAX_PIXELS)


def hidden_width(channels, reduction):
    """Width of the channel MLP: channels // reduction, at least 8."""
    return max(channels // reduction, 8)


def spatial_kernel_size(height, width, default=7):
    """The spatial conv size for an H x W map: `default`, or the largest odd size
    that fits a smaller map (a 7 x 7 kernel on a 2 x 2 map only adds dead weights)."""
    k = min(default, height, width)
    return max(1, k if k % 2 == 1 else k - 1)


def attention_logits_with_hidden(channel_mean, spatial, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                 spatial_weight, spatial_bias):
    """The MLP's hidden pre-activation (N x hidden), a_c = MLP(d_c) (N x k*C, the
    k channel logits of rank k one after the other) and a_s = conv([d_mean; d_max])
    (N x k x H x W)."""
    hidden_pre = F.linear(channel_mean, fc1_weight, fc1_bias)
    channel_logits = F.linear(F.relu(hidden_pre), fc2_weight, fc2_bias)
    return hidden_pre, channel_logits, spatial_attention_logits(spatial, spatial_weight, spatial_bias)


def spatial_attention_logits(spatial, spatial_weight, spatial_bias):
    """a_s = conv([d_mean; d_max]) (N x k x H x W). The fused op's backward calls it
    again rather than keeping a_s: k maps of N x H x W cost more to keep than to
    recompute from the two descriptor maps (a 2 -> k conv)."""
    size, padding = spatial_weight.shape[-1], spatial_weight.shape[-1] // 2
    if uses_im2col_conv(spatial):
        return _IM2COL_CONV2D(spatial, spatial_weight, [size, size], spatial_bias, [1, 1], [padding, padding])
    return F.conv2d(spatial, spatial_weight, spatial_bias, padding=padding)


def attention_logits(channel_mean, spatial, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight,
                     spatial_bias):
    """a_c = MLP(d_c) (N x k*C) and a_s = conv([d_mean; d_max]) (N x k x H x W)."""
    return attention_logits_with_hidden(channel_mean, spatial, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                        spatial_weight, spatial_bias)[1:]


MAX_RANK = 16  # the fused kernels' bound on the rank


class AttentionBranch(nn.Module):
    """Parameters and settings of one adaptor; subclasses define forward.

    Rank k (docs/design.md §2): the MLP gives k x C channel logits and the
    spatial conv k maps; the attention is the sum of k products, each with its
    own gamma row. Rank 1 keeps gamma as a vector of C (the original adaptor);
    rank k > 1 has gamma of shape (k, C)."""

    def __init__(self, channels, reduction=16, spatial_kernel=7, mode="add", rank=1):
        super(AttentionBranch, self).__init__()
        if int(channels) != channels or channels < 1:
            raise ValueError("channels must be a positive integer, got {!r}".format(channels))
        if int(reduction) != reduction or reduction < 1:
            raise ValueError("reduction must be a positive integer, got {!r}".format(reduction))
        if int(spatial_kernel) != spatial_kernel or spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError("spatial_kernel must be a positive odd integer, got {!r}".format(spatial_kernel))
        if mode not in MODES:
            raise ValueError("mode must be one of {}, got {!r}".format(MODES, mode))
        if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= MAX_RANK:
            raise ValueError("rank must be an integer from 1 to {}, got {!r}".format(MAX_RANK, rank))
        self.rank = int(rank)
        self.channels = int(channels)
        self.reduction = int(reduction)
        self.spatial_kernel = int(spatial_kernel)
        self.mode = mode
        hidden = hidden_width(self.channels, self.reduction)
        self.fc1 = nn.Linear(self.channels, hidden)
        self.fc2 = nn.Linear(hidden, self.rank * self.channels)
        self.spatial = nn.Conv2d(2, self.rank, self.spatial_kernel, padding=self.spatial_kernel // 2)
        # gamma = 0: an adapted network starts out computing exactly the pretrained one.
        self.gamma = nn.Parameter(torch.zeros(self.channels) if self.rank == 1 else
                                  torch.zeros(self.rank, self.channels))

    def branch_parameters(self):
        """The small branch's tensors in the order attention_logits takes them."""
        return self.adaptor_tensors()[:6]

    def adaptor_tensors(self):
        """The small branch's tensors and gamma, in the order the fused op takes them.

        Read from the modules' parameter dicts: on a small map the seven lookups through
        nn.Module.__getattr__ (about 8 us on a desktop CPU) cost a third as much as the
        fused adaptor's whole forward. A tensor that is not a plain parameter there (a
        parametrisation, one replaced by an attribute) is read as an attribute."""
        try:
            modules = self._modules
            fc1, fc2, spatial = (modules["fc1"]._parameters, modules["fc2"]._parameters,
                                 modules["spatial"]._parameters)
            return (fc1["weight"], fc1["bias"], fc2["weight"], fc2["bias"], spatial["weight"], spatial["bias"],
                    self._parameters["gamma"])
        except KeyError:
            return (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.spatial.weight,
                    self.spatial.bias, self.gamma)

    def extra_repr(self):
        return "channels={}, reduction={}, spatial_kernel={}, mode={!r}, rank={}".format(
            self.channels, self.reduction, self.spatial_kernel, self.mode, self.rank)
