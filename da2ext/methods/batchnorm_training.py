"""Methods that train the backbone's BatchNorm layers as ordinary train-mode BN
(ft, bn_train, and the residual adapters, whose papers make every BN
domain-specific): scales, shifts and batch statistics. They keep each BN's input
for backward, which is what DA2's recipe avoids (docs/design.md §3a)."""
from torch import nn

from ..lean.adapt import replace_head
from .method import Method

__all__ = ["BN_TRAIN", "freeze_except_batchnorm", "train_batchnorm"]

# PyTorch's default decay. EfficientNet-Lite0's weights come from TF, whose 0.99
# decay (momentum 0.01) would keep the ImageNet statistics for most of a short
# run (docs/design.md §6); timm builds the layers with 0.1, set here so it holds for any backbone.
BN_MOMENTUM = 0.1


def train_batchnorm(model, momentum=BN_MOMENTUM):
    """Make every BN layer of `model` trainable (scale and shift) with the given momentum."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    return model


def freeze_except_batchnorm(model, num_classes):
    """A new head; every weight frozen but the BN layers' and the head's; train mode
    (so the BNs use and update batch statistics)."""
    for p in model.parameters():
        p.requires_grad_(False)
    replace_head(model, num_classes)
    return train_batchnorm(model).train()


# BN scales at a lower rate than shifts and head: a scale multiplies a whole
# channel, and Adam moves every parameter by about lr per step.
BN_TRAIN = Method("bn_train", "BN scales, shifts and batch statistics + head (FT-Norm+Last)",
                  freeze_except_batchnorm, {"other": 3e-2, "default": 1e-1})
