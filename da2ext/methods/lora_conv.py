"""lora_conv: LoRA on the backbone's convs through the `peft` library, as a user
would set it up today (docs/design.md §5): a LoraConfig naming the conv modules and
peft.inject_adapter_in_model, after a new head.

Each targeted conv W gets a parallel low-rank path, conv(x, W) + s * B(A(x)),
A a conv with W's kernel and stride to r channels, B a 1x1 conv back, B zero at
first: the model starts as the pretrained network. Trainable: the LoRA A and B
and the head; everything else frozen, BNs in eval mode whatever model.train()
says (freeze_backbone, shared with piggyback).

inject_adapter_in_model rather than get_peft_model: it rewrites the model in
place and keeps its class, forward and our Head (exactly one Head must remain
for MultiDomainModel); get_peft_model wraps the model in a PeftModel, and its
modules_to_save would copy the head.
"""
import re

from torch import nn

from ..lean.adapt import Head
from .method import Method
from .piggyback import freeze_backbone

__all__ = ["LORA_CONV", "lora_targets"]

# r = 8: peft's default rank. The 1x1 convs of an EfficientNet-lite0 have 16..1280
# channels, so rank 8 is a small fraction of every one of them (and still a
# non-trivial delta for the 3-channel stem). lora_alpha = r: scaling 1, so the
# learning rate alone says how fast the delta grows.
RANK = 8
ALPHA = 8


def lora_targets(model):
    """Names of the convs LoRA goes on: every nn.Conv2d with groups == 1.

    Depthwise (groups > 1) convs are left out. peft 0.21 accepts them only when r
    is a multiple of groups (= channels for a depthwise conv, so r >= 32..1152:
    no low rank at all), and even then its A is a full conv mixing all input
    channels, not a low-rank change of the depthwise kernel; merging is
    unsupported for them. A depthwise kernel has 9 weights per channel anyway:
    there is nothing to compress.
    """
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.groups == 1]


def _build(backbone, num_classes):
    try:
        import peft
    except ImportError as error:  # optional (docs/design.md §7): the Jetson may lack it
        raise ImportError("the lora_conv method needs peft: pip install peft (import failed: {})".format(error))
    model = freeze_backbone(backbone, num_classes, "lora_conv")
    targets = lora_targets(model)
    # A regex matched against the whole module name: a list entry would also match
    # any module whose name merely ends with ".<entry>" (peft's suffix rule).
    pattern = "^(?:{})$".format("|".join(re.escape(name) for name in targets))
    # lora_dropout 0: the rest of the backbone runs deterministically (eval-mode BN),
    # and so does the adaptation; bias "none": the frozen convs' biases stay frozen.
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", target_modules=pattern)
    model = peft.inject_adapter_in_model(config, model)
    # peft freezes everything but its adapters, the new head included: say exactly what trains.
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    for module in model.modules():
        if isinstance(module, Head):
            for p in module.parameters():
                p.requires_grad_(True)
    return model.train()


# Adam. LoRA ("other") at 1e-3: the usual LoRA rate for small vision models (B
# starts at zero, so a smaller rate barely moves it in a short run; much larger
# and the low-rank path overwhelms the pretrained features). The head at 1e-2 like
# every other method here, so comparisons differ only in the backbone side.
LORA_CONV = Method("lora_conv", "LoRA (r=8) on the groups=1 convs through peft + head", _build,
                   {"other": 3e-4, "head": 3e-3, "default": 3e-4})
