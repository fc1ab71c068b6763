"""Methods that train a plainly frozen backbone's head and/or BN shifts in
ordinary PyTorch (eval-mode BN, original modules): last (the head only) and bias
(TinyTL-B: BN shifts, all biases and the head), and bias on the lean backbone
for comparison."""
from torch import nn

from ..lean.adapt import adapt
from .method import Method


def _last(backbone, num_classes):
    return adapt(backbone, num_classes, adaptors=False, shifts=False, lean=False)


def _bias(backbone, num_classes):
    model = adapt(backbone, num_classes, adaptors=False, shifts=True, lean=False)
    for module in model.modules():  # "all biases": convs with a bias too
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            module.bias.requires_grad_(True)
    return model


def _bias_lean(backbone, num_classes):
    return adapt(backbone, num_classes, adaptors=False, shifts=True)


LAST = Method("last", "the new head only", _last, {"default": 3e-3})
BIAS = Method("bias", "BN shifts, biases and head, plain PyTorch (TinyTL-B)", _bias, {"default": 3e-3})
BIAS_LEAN = Method("bias_lean", "BN shifts and head on the lean backbone (masks only)", _bias_lean,
                   {"default": 3e-3})
