"""piggyback: a learned binary mask on every frozen conv weight (Mallya et al. 2018,
"Piggyback: Adapting a Single Network to Multiple Tasks by Learning to Mask
Weights"; docs/design.md §5).

Each conv of the backbone (depthwise ones and timm's TF-"same" Conv2dSame
included) becomes a PiggybackConv2d that computes the conv with

    effective weight = weight * (scores > 5e-3)

where `scores` are real-valued, of the weight's shape, initialised to 1e-2: the
mask starts all ones, so training starts from the pretrained network. The step
function has no useful gradient, so the scores get the straight-through one,
d scores = d effective_weight * weight. A domain is its scores and its head; the
backbone's weights and BN statistics are only ever read (BNs run in eval mode
whatever model.train() says). The paper stores the thresholded mask (1 bit per
weight); what trains, and what a domain file holds, are the real-valued scores.

freeze_backbone() is shared with lora_conv: both methods freeze the same way.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..lean.adapt import replace_head, supported_family
from ..lean.frozen_blocks import InferenceOnly
from ..lean.frozen_conv import pad_same
from ..lean.submodules import replace_submodule
from .method import Method

__all__ = ["PIGGYBACK", "PiggybackConv2d", "freeze_backbone", "masked_weight"]

# The paper's values: scores start at twice the threshold, so every weight is kept at first.
SCORE_INIT = 1e-2
THRESHOLD = 5e-3


class MaskedWeight(torch.autograd.Function):
    """weight * (scores > threshold), with the straight-through gradient for the
    scores: d scores = d out * weight (the paper's rule: the mask's gradient,
    passed through the step function unchanged)."""

    @staticmethod
    def forward(ctx, scores, weight, threshold):
        mask = scores > threshold
        # Backward needs the weight (held by the model anyway: no extra memory) and,
        # only if the weight itself trains (never here), the mask.
        ctx.save_for_backward(weight, mask if ctx.needs_input_grad[1] else None)
        return weight * mask.to(weight.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        grad_scores = grad * weight if ctx.needs_input_grad[0] else None
        grad_weight = grad * mask.to(grad.dtype) if ctx.needs_input_grad[1] else None
        return grad_scores, grad_weight, None


def masked_weight(scores, weight, threshold=THRESHOLD):
    """The effective weight weight * (scores > threshold), straight-through to scores."""
    return MaskedWeight.apply(scores, weight, threshold)


class PiggybackConv2d(nn.Module):
    """A frozen nn.Conv2d whose weight is masked by trainable scores. It keeps the
    conv's weight and bias under their own names (so the pretrained state_dict
    keys still read) and its stride, padding (TF "same" for timm's Conv2dSame,
    any padding_mode), dilation and groups."""

    def __init__(self, conv, score_init=SCORE_INIT, threshold=THRESHOLD):
        super(PiggybackConv2d, self).__init__()
        if not isinstance(conv, nn.Conv2d):
            raise NotImplementedError("expected an nn.Conv2d, got {}".format(type(conv).__name__))
        tf_same = type(conv).__name__ == "Conv2dSame" and type(conv).__module__.startswith("timm.")
        if not tf_same and type(conv).forward is not nn.Conv2d.forward:
            # Its forward may do more than a conv; recomputing it here could silently differ.
            raise NotImplementedError("{} has its own forward; piggyback supports nn.Conv2d and timm's "
                                      "Conv2dSame".format(type(conv).__name__))
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scores = nn.Parameter(torch.full_like(conv.weight.detach(), score_init))
        self.threshold = float(threshold)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation, self.groups = (conv.kernel_size, conv.stride, conv.dilation,
                                                                     conv.groups)
        self.tf_same = tf_same
        self.padding = (0, 0) if tf_same else conv.padding  # Conv2dSame pads in forward
        self.padding_mode = conv.padding_mode
        # What nn.Conv2d pads with for a padding_mode other than "zeros".
        self._mode_padding = getattr(conv, "_reversed_padding_repeated_twice", None)

    def mask(self):
        """The binary mask this domain applies (1 keeps a weight)."""
        return self.scores.detach() > self.threshold

    def forward(self, x):
        weight = masked_weight(self.scores, self.weight, self.threshold)
        padding = self.padding
        if self.tf_same:
            x, _ = pad_same(x, self.kernel_size, self.stride, self.dilation)
        elif self.padding_mode != "zeros":
            x = F.pad(x, self._mode_padding, mode=self.padding_mode)
            padding = (0, 0)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self):
        return "{}, {}, kernel_size={}, stride={}, groups={}{}, threshold={}".format(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups,
            ", padding=tf_same" if self.tf_same else ", padding={}".format(self.padding), self.threshold)


def _replace_children(model, predicate, wrap):
    """Replace, in place, every module for which predicate(module) holds by wrap(module)."""
    found = [(name, module) for name, module in model.named_modules() if name and predicate(module)]
    for name, module in found:
        replace_submodule(model, name, wrap(module))
    return len(found)


def freeze_backbone(backbone, num_classes, method_name):
    """The common start of piggyback and lora_conv: a new trainable Head, every
    other parameter frozen, every BN wrapped to run in eval mode whatever
    model.train() says (its statistics are the pretrained ones and stay so;
    MultiDomainModel then sees no BN statistics to own). Returns the backbone."""
    if supported_family(backbone) is None:
        raise TypeError("{}: model must be a torchvision ResNet or MobileNetV2 or a timm EfficientNet, got {}".format(
            method_name, type(backbone).__name__))
    for p in backbone.parameters():
        p.requires_grad_(False)
    _replace_children(backbone, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm), InferenceOnly)
    replace_head(backbone, num_classes)  # trainable, the only Head in the model
    return backbone


def _build(backbone, num_classes):
    model = freeze_backbone(backbone, num_classes, "piggyback")
    _replace_children(model, lambda m: isinstance(m, nn.Conv2d), PiggybackConv2d)
    return model.train()


# Adam. The scores ("other") at 1e-3, ten times the paper's 1e-4: a score starts
# 5e-3 above the threshold and Adam moves it about lr per step, so at 1e-4 no mask
# bit can flip within ~50 steps, and a short run (the digits benchmark's 48 steps)
# learns nothing but the head - measured: exactly last's accuracies. At 1e-3 a
# consistently pushed weight is dropped after ~5 steps; the benchmark's sweep
# still tries 1e-4. The head at 1e-2 like every other method here (last, bias,
# da2), so comparisons differ only in what trains in the backbone.
PIGGYBACK = Method("piggyback", "learned binary masks on the frozen conv weights + head (Piggyback)", _build,
                   {"other": 3e-4, "head": 3e-3, "default": 3e-4})
