"""Rebuffi et al.'s residual adapters on a frozen backbone (docs/design.md §5):

  series_adapter   (NeurIPS 2017)  y = BN(c + A c),      c = conv(x)
  parallel_adapter (CVPR 2018)     y = BN(conv(x) + A x)

A is a 1x1 conv (bias-free), one per adapted conv; with the papers, every BN
becomes domain-specific and trains as ordinary train-mode BN, and a new head.

Which convs carry an adapter. The papers adapt every 3x3 conv of a ResNet; so
here every 3x3 conv of a torchvision BasicBlock (conv1, conv2) and Bottleneck
(conv2). MobileNetV2 and EfficientNet blocks have no full 3x3 conv: their 3x3 is
depthwise (no channel mixing, and a 1x1 adapter on its expanded width would
outweigh the backbone: 7.5 M parameters on Lite0). Their block output is made by
the projection 1x1 conv, so that one carries the adapter (series after it,
parallel beside it): 0.3 M (series) and 1.5 M (parallel) parameters on Lite0.

A starts at zero, so the adapted network starts from the pretrained one (the
papers initialise it at random and rely on training the BN after it).
"""
from torch import nn

from ..lean.frozen_blocks import is_timm
from .batchnorm_training import freeze_except_batchnorm
from .method import Method

__all__ = ["PARALLEL_ADAPTER", "SERIES_ADAPTER", "ParallelAdapterConv", "SeriesAdapterConv", "adapted_convs"]


def _zero_conv1x1(in_channels, out_channels, stride, like):
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    nn.init.zeros_(conv.weight)
    return conv.to(device=like.weight.device, dtype=like.weight.dtype)


class SeriesAdapterConv(nn.Module):
    """conv followed by a residual 1x1 adapter: c + adapter(c)."""

    def __init__(self, conv):
        super(SeriesAdapterConv, self).__init__()
        self.conv = conv
        self.adapter = _zero_conv1x1(conv.out_channels, conv.out_channels, 1, conv)

    def forward(self, x):
        c = self.conv(x)
        return c + self.adapter(c)


class ParallelAdapterConv(nn.Module):
    """conv with a 1x1 adapter beside it, at the conv's stride: conv(x) + adapter(x)."""

    def __init__(self, conv):
        super(ParallelAdapterConv, self).__init__()
        if conv.dilation != (1, 1):
            raise NotImplementedError("a parallel adapter beside a dilated conv")
        self.conv = conv
        self.adapter = _zero_conv1x1(conv.in_channels, conv.out_channels, conv.stride, conv)

    def forward(self, x):
        out = self.conv(x)
        side = self.adapter(x)
        if side.shape[-2:] != out.shape[-2:]:  # TF "same" padding rounds up where a 1x1 conv rounds down
            side = nn.functional.pad(side, (0, out.shape[-1] - side.shape[-1], 0, out.shape[-2] - side.shape[-2]))
        return out + side


def adapted_convs(model):
    """(parent module, attribute name) of every conv that carries an adapter (see above)."""
    from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionInvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck
    sites = []
    for module in model.modules():
        if isinstance(module, BasicBlock):
            sites += [(module, "conv1"), (module, "conv2")]
        elif isinstance(module, Bottleneck):
            sites.append((module, "conv2"))
        elif isinstance(module, TorchvisionInvertedResidual):
            # block.conv: [expand ConvNormActivation,] depthwise ConvNormActivation, projection Conv2d, BN
            sites.append((module.conv, str(len(module.conv) - 2)))
        elif is_timm(module, "InvertedResidual"):
            sites.append((module, "conv_pwl"))
        elif is_timm(module, "DepthwiseSeparableConv"):
            sites.append((module, "conv_pw"))
    if not sites:
        raise TypeError("residual adapters: no supported block (torchvision BasicBlock, Bottleneck, MobileNetV2 "
                        "InvertedResidual; timm DepthwiseSeparableConv, InvertedResidual) in {}".format(
                            type(model).__name__))
    return sites


def _with_adapters(wrapper):
    def build(backbone, num_classes):
        sites = adapted_convs(backbone)
        model = freeze_except_batchnorm(backbone, num_classes)
        for parent, name in sites:
            setattr(parent, name, wrapper(getattr(parent, name)))  # the adapters' weights are trainable
        return model.train()
    return build


# Adapters and BN scales at 3e-3, BN shifts and head at 1e-2: the rates of the
# other frozen-backbone methods here (docs/design.md §3a).
_LEARNING_RATES = {"other": 9e-3, "default": 3e-2}

SERIES_ADAPTER = Method("series_adapter", "1x1 residual adapters in series + every BN + head (Rebuffi 2017)",
                        _with_adapters(SeriesAdapterConv), _LEARNING_RATES)
PARALLEL_ADAPTER = Method("parallel_adapter", "1x1 adapters in parallel + every BN + head (Rebuffi 2018)",
                          _with_adapters(ParallelAdapterConv), _LEARNING_RATES)
