"""tinytl: TinyTL's lite residual branches on top of the bias recipe (Cai et al.,
NeurIPS 2020; docs/design.md §5). Beside every block of the frozen backbone runs a
small trainable branch on the block's input:

    avg-pool by 2 -> k x k group conv (2 groups, the block's stride) -> ReLU
    -> 1x1 conv -> BN (scale initialised to 0) -> bilinear upsampling to the
    block's output size, added to the block's output.

Plus TinyTL-B: the frozen BNs' shifts and the head. The main branch is DA2's lean
frozen block (it keeps only packed masks, as TinyTL's memory accounting assumes);
the lite branch keeps its own, 4x downsampled, activations. Following TinyTL
(expand ratio 1, at most 5x5 kernels) the width of the branch is the block's input
width rounded up to a multiple of 8 and k is 3.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..lean.adapt import AdaptedBlock, adapt
from ..lean.insert_adaptors import feature_map_io_shapes
from .method import Method

__all__ = ["LiteResidual", "LiteResidualBlock", "TINYTL", "add_lite_residuals"]


def _round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


class LiteResidual(nn.Module):
    """The branch itself: in_channels -> out_channels at the given stride (see above)."""

    def __init__(self, in_channels, out_channels, stride, kernel_size=3, groups=2, downsample=2):
        super(LiteResidual, self).__init__()
        mid = _round_up(in_channels, 8)
        while in_channels % groups or mid % groups:  # a group conv needs both widths divisible
            groups -= 1
        self.pool = nn.AvgPool2d(downsample, downsample, ceil_mode=True) if downsample > 1 else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.final_bn = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.final_bn.weight)  # the branch adds nothing at first

    def forward(self, x, size):
        y = self.final_bn(self.conv2(self.act(self.conv1(self.pool(x)))))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class LiteResidualBlock(nn.Module):
    """A frozen (adapted) block plus its lite residual branch on the same input."""

    def __init__(self, main, lite):
        super(LiteResidualBlock, self).__init__()
        self.main = main
        self.lite = lite

    def forward(self, x):
        out = self.main(x)
        return out + self.lite(x.to(self.lite.conv1.weight.dtype), out.shape[-2:]).to(out.dtype)


def add_lite_residuals(model, image_size=64):
    """Put a LiteResidual beside every AdaptedBlock of an adapt()ed model, in place."""
    sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, AdaptedBlock)]
    if not sites:
        raise TypeError("tinytl: the model has no adapted blocks")
    parameter = next(model.parameters())
    traced = feature_map_io_shapes(model, [(i, child) for i, (_, _, child) in enumerate(sites)], torch.zeros(
        1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    shapes = [traced[i] for i in range(len(sites))]
    for (parent, name, child), (in_shape, out_shape) in zip(sites, shapes):
        stride = max(1, int(round(in_shape[-1] / float(out_shape[-1]))))
        lite = LiteResidual(in_shape[1], out_shape[1], stride).to(next(model.parameters()).device)
        setattr(parent, name, LiteResidualBlock(child, lite))
    return model.train()


def _build(backbone, num_classes):
    return add_lite_residuals(adapt(backbone, num_classes, adaptors=False, shifts=True))


# Lite branches at the adaptors' rate, shifts and head at 1e-2 (docs/design.md §3a's rates).
TINYTL = Method("tinytl", "lite residual branches + BN shifts + head (TinyTL-L+B), lean backbone", _build,
                {"other": 9e-4, "default": 3e-3})
