"""Frozen, lean versions of the residual blocks of torchvision's ResNets,
MobileNetV2 and RegNet-X and of timm's ResNets and EfficientNet family
(docs/design.md §3).

Every one of these blocks has the same shape: a chain of conv-BN-activation
layers, an optional shortcut (identity or a conv-BN), an add, an optional final
activation. So one module, FrozenBlock, holds them all; the freeze_* functions
below read each library's block into it. What backward keeps: a packed bit mask
per activation (FrozenConvBNAct), nothing for the add.
"""
import torch
from torch import nn

from ..ops.packed_activation import packed_activation
from .frozen_conv import FrozenConvBNAct, fused_cpu_kernels, activate_inplace, activation_upper

__all__ = ["FrozenBlock", "InferenceOnly", "freeze_block", "freeze_conv_bn_act", "block_out_channels", "is_timm"]


class FrozenBlock(nn.Module):
    """out = act(main(x) + shortcut(x)), each part optional:
    main: an nn.Sequential of FrozenConvBNAct;
    shortcut: a FrozenConvBNAct (projection), "identity", or None (no skip);
    final_upper: clamp(., 0, upper) after the add (inf: ReLU), or None."""

    def __init__(self, main, shortcut=None, final_upper=None):
        super(FrozenBlock, self).__init__()
        self.main = main
        self.projection = shortcut if isinstance(shortcut, nn.Module) else None
        self.has_skip = shortcut is not None
        self.final_upper = final_upper

    @property
    def out_channels(self):
        return self.main[-1].weight.shape[0]

    def forward(self, x):
        x = x.to(self.main[0].weight.dtype)
        if self._fuses_tail(x):
            # The last conv, the add and the activation in one pass over the output (CPU).
            out = x
            for layer in list(self.main)[:-1]:
                out = layer(out)
            shortcut = self.projection(x) if self.projection is not None else x
            return self.main[-1].forward_add_activation(out, shortcut, self.final_upper)
        out = self.main(x)
        # `out` is the last conv's fresh result, used by nothing else: the add and the
        # activation write into it (an add keeps nothing for backward; the activation
        # a bit mask), saving two new tensors of the block's output size.
        if self.has_skip:
            out = out.add_(self.projection(x) if self.projection is not None else x)
        if self.final_upper is None:
            return out
        if torch.is_grad_enabled() and out.requires_grad:
            return packed_activation(out, self.final_upper, inplace=True)
        return activate_inplace(out, self.final_upper)

    def _fuses_tail(self, x):
        """Whether this forward runs the last conv, the add and the final activation as
        one node: under autograd, on the CPU with its kernels, for a block whose last
        conv has no activation of its own (ResNet's blocks)."""
        last = self.main[-1]
        return (self.has_skip and self.final_upper is not None and last.upper is None and not last.tf_same
                and torch.is_grad_enabled() and fused_cpu_kernels(x)
                and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def extra_repr(self):
        return "has_skip={}, final_activation={}".format(self.has_skip, self.final_upper)


class InferenceOnly(nn.Module):
    """Runs `module` unchanged and frozen, in eval mode whatever model.train() says
    (a BN inside must not start updating its statistics)."""

    def __init__(self, module):
        super(InferenceOnly, self).__init__()
        self.module = module.eval()

    def train(self, mode=True):
        super(InferenceOnly, self).train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# The timm modules that define the blocks freeze_block reads (older timm spells the second without "_").
_TIMM_RESNET = ("resnet",)
_TIMM_EFFICIENTNET_BLOCKS = ("_efficientnet_blocks", "efficientnet_blocks")
_TIMM_REGNET = ("regnet",)
_TIMM_CONV_BN_ACT = ("conv_bn_act",)


def is_timm(module, class_name, timm_modules=None):
    """Whether `module` is timm's class `class_name` (checked by name: timm is optional),
    defined in one of `timm_modules` (the last part of the module's name) when given:
    timm has several classes of one name (a RegNet's Bottleneck is not a ResNet's)."""
    cls = type(module)
    if cls.__name__ != class_name or not cls.__module__.startswith("timm."):
        return False
    return timm_modules is None or cls.__module__.rsplit(".", 1)[-1] in timm_modules


def _bn_activation(bn):
    """timm's BatchNormAct2d carries its activation (and a dropout, which must be a no-op)."""
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise NotImplementedError("BatchNormAct2d with a dropout")
    return getattr(bn, "act", None)


def freeze_conv_bn_act(conv, bn, activation, train_shift, dtype):
    return FrozenConvBNAct.fold(conv, bn, activation, train_shift=train_shift, dtype=dtype)


def _freeze_conv_norm_activation(seq, train_shift, dtype):
    """torchvision's Conv2dNormActivation: Sequential(Conv2d, BatchNorm2d[, activation])."""
    layers = list(seq)
    if len(layers) not in (2, 3) or not isinstance(layers[0], nn.Conv2d) or not isinstance(layers[1], nn.BatchNorm2d):
        raise NotImplementedError("expected Sequential(Conv2d, BatchNorm2d[, activation])")
    return freeze_conv_bn_act(layers[0], layers[1], layers[2] if len(layers) == 3 else None, train_shift, dtype)


def _freeze_resnet_block(block, convs, train_shift, dtype):
    # torchvision BasicBlock/Bottleneck: the last conv-BN has no activation, the ReLU
    # comes after the add; the middle ones use the block's one ReLU.
    main = []
    for i, (conv_name, bn_name) in enumerate(convs):
        last = i == len(convs) - 1
        main.append(freeze_conv_bn_act(getattr(block, conv_name), getattr(block, bn_name),
                                       None if last else block.relu, train_shift, dtype))
    shortcut = "identity"
    if block.downsample is not None:
        shortcut = _freeze_conv_norm_activation(block.downsample, train_shift, dtype)
    return FrozenBlock(nn.Sequential(*main), shortcut, activation_upper(block.relu))


def _check_inference_identity(block, names):
    """Parts of a timm block that must do nothing at inference: absent, Identity, or
    a training-time regulariser (drop_path: stochastic depth) that is a no-op in eval."""
    for name in names:
        part = getattr(block, name, None)
        if part is None or isinstance(part, nn.Identity) or name == "drop_path":
            continue
        raise NotImplementedError("{} is {}, not Identity".format(name, type(part).__name__))


def _freeze_timm_resnet_block(block, layers, final_activation, train_shift, dtype):
    """timm's BasicBlock/Bottleneck: conv-BN-act layers (the last one's activation comes
    after the add, as `final_activation`), an optional conv-BN downsample."""
    _check_inference_identity(block, ("drop_block", "aa", "se", "drop_path"))
    main = [freeze_conv_bn_act(getattr(block, conv), getattr(block, bn), getattr(block, act) if act else None,
                               train_shift, dtype) for conv, bn, act in layers]
    shortcut = "identity"
    if block.downsample is not None:
        shortcut = _freeze_conv_norm_activation(block.downsample, train_shift, dtype)
    return FrozenBlock(nn.Sequential(*main), shortcut, activation_upper(getattr(block, final_activation)))


def _freeze_torchvision_inverted_residual(block, train_shift, dtype):
    main, pending_conv = [], None
    for layer in block.conv:
        if isinstance(layer, nn.Sequential):
            main.append(_freeze_conv_norm_activation(layer, train_shift, dtype))
        elif isinstance(layer, nn.Conv2d) and pending_conv is None:
            pending_conv = layer
        elif isinstance(layer, nn.BatchNorm2d) and pending_conv is not None:
            main.append(freeze_conv_bn_act(pending_conv, layer, None, train_shift, dtype))
            pending_conv = None
        else:
            raise NotImplementedError("unexpected layer {} in InvertedResidual".format(type(layer).__name__))
    if pending_conv is not None:
        raise NotImplementedError("a Conv2d without BN in InvertedResidual")
    return FrozenBlock(nn.Sequential(*main), "identity" if block.use_res_connect else None, None)


def _freeze_torchvision_regnet_block(block, train_shift, dtype):
    """torchvision's ResBottleneckBlock (RegNet): act(proj(x) + c(b(a(x)))), a and b
    conv-BN-ReLU (b grouped), c conv-BN; proj a conv-BN or the identity. RegNetY's
    squeeze-excitation between b and c has no lean form."""
    names = [name for name, _ in block.f.named_children()]
    if names != ["a", "b", "c"]:
        raise NotImplementedError("ResBottleneckBlock with {} (squeeze-excitation has no lean form)".format(
            ", ".join(n for n in names if n not in ("a", "b", "c"))))
    main = [_freeze_conv_norm_activation(getattr(block.f, name), train_shift, dtype) for name in names]
    shortcut = "identity" if block.proj is None else _freeze_conv_norm_activation(block.proj, train_shift, dtype)
    return FrozenBlock(nn.Sequential(*main), shortcut, activation_upper(block.activation))


def _freeze_timm_conv_norm_act(layer, train_shift, dtype):
    """timm's ConvNormAct: conv, then BatchNormAct2d (its activation inside), no anti-aliasing."""
    _check_timm_identity(layer, ("aa",))
    if not isinstance(layer.bn, nn.BatchNorm2d):
        raise NotImplementedError("ConvNormAct with {}".format(type(layer.bn).__name__))
    return freeze_conv_bn_act(layer.conv, layer.bn, _bn_activation(layer.bn), train_shift, dtype)


def _freeze_timm_regnet_block(block, train_shift, dtype):
    """timm's RegNet Bottleneck: act3(conv3(conv2(conv1(x))) + downsample(x)), each conv
    a ConvNormAct; downsample a ConvNormAct, the identity, or None (no add). RegNetY's
    squeeze-excitation has no lean form."""
    _check_inference_identity(block, ("se", "drop_path"))
    main = [_freeze_timm_conv_norm_act(getattr(block, name), train_shift, dtype)
            for name in ("conv1", "conv2", "conv3")]
    if block.downsample is None:
        shortcut = None
    elif isinstance(block.downsample, nn.Identity):
        shortcut = "identity"
    elif is_timm(block.downsample, "ConvNormAct", _TIMM_CONV_BN_ACT):
        shortcut = _freeze_timm_conv_norm_act(block.downsample, train_shift, dtype)
    else:
        raise NotImplementedError("RegNet downsample {}".format(type(block.downsample).__name__))
    return FrozenBlock(nn.Sequential(*main), shortcut, activation_upper(block.act3))


def _check_timm_identity(block, names):
    for name in names:
        part = getattr(block, name, None)
        if part is not None and not isinstance(part, nn.Identity):
            raise NotImplementedError("{} is {}, not Identity".format(name, type(part).__name__))


def _freeze_timm_block(block, pairs, train_shift, dtype):
    # drop_path is a training-time regulariser: frozen blocks compute inference behaviour.
    _check_timm_identity(block, ("aa", "se"))
    main = [freeze_conv_bn_act(getattr(block, conv_name), getattr(block, bn_name),
                               _bn_activation(getattr(block, bn_name)), train_shift, dtype)
            for conv_name, bn_name in pairs]
    return FrozenBlock(nn.Sequential(*main), "identity" if block.has_skip else None, None)


def freeze_block(block, train_shift=True, dtype=torch.float32):
    """The FrozenBlock computing what `block` computes in eval mode, or raise
    NotImplementedError saying why it cannot be rewritten."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.regnet import ResBottleneckBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck
    if isinstance(block, Bottleneck):
        return _freeze_resnet_block(block, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), train_shift, dtype)
    if isinstance(block, BasicBlock):
        return _freeze_resnet_block(block, (("conv1", "bn1"), ("conv2", "bn2")), train_shift, dtype)
    if isinstance(block, InvertedResidual):
        return _freeze_torchvision_inverted_residual(block, train_shift, dtype)
    if isinstance(block, ResBottleneckBlock):
        return _freeze_torchvision_regnet_block(block, train_shift, dtype)
    if is_timm(block, "Bottleneck", _TIMM_RESNET):
        return _freeze_timm_resnet_block(block, (("conv1", "bn1", "act1"), ("conv2", "bn2", "act2"),
                                                 ("conv3", "bn3", None)), "act3", train_shift, dtype)
    if is_timm(block, "BasicBlock", _TIMM_RESNET):
        return _freeze_timm_resnet_block(block, (("conv1", "bn1", "act1"), ("conv2", "bn2", None)), "act2",
                                         train_shift, dtype)
    if is_timm(block, "DepthwiseSeparableConv", _TIMM_EFFICIENTNET_BLOCKS):
        return _freeze_timm_block(block, (("conv_dw", "bn1"), ("conv_pw", "bn2")), train_shift, dtype)
    if is_timm(block, "InvertedResidual", _TIMM_EFFICIENTNET_BLOCKS):
        return _freeze_timm_block(block, (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
                                  train_shift, dtype)
    if is_timm(block, "Bottleneck", _TIMM_REGNET):
        return _freeze_timm_regnet_block(block, train_shift, dtype)
    if is_timm(block, "ConvNormAct", _TIMM_CONV_BN_ACT):
        return FrozenBlock(nn.Sequential(_freeze_timm_conv_norm_act(block, train_shift, dtype)), None, None)
    if isinstance(block, nn.Sequential) and len(block) in (2, 3) and isinstance(block[0], nn.Conv2d):
        return FrozenBlock(nn.Sequential(_freeze_conv_norm_activation(block, train_shift, dtype)), None, None)
    raise NotImplementedError("no lean form for {}".format(type(block).__name__))


def block_out_channels(block):
    """Output channels of a supported (unfrozen) block, for the adaptor after it."""
    for name in ("bn3", "bn2"):
        bn = getattr(block, name, None)
        if isinstance(bn, nn.BatchNorm2d):
            return bn.num_features
    if hasattr(block, "out_channels"):
        return int(block.out_channels)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise NotImplementedError("cannot tell the output channels of {}".format(type(block).__name__))
    return convs[-1].out_channels
