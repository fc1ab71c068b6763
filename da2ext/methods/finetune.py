"""ft: full fine-tuning with train-mode BN, a new head (the paper's baseline).
It keeps every activation for backward."""
from ..lean.adapt import replace_head
from .batchnorm_training import train_batchnorm
from .method import Method


def _build(backbone, num_classes):
    replace_head(backbone, num_classes)
    for p in backbone.parameters():
        p.requires_grad_(True)
    return train_batchnorm(backbone).train()


# Adam 3e-4 for everything (docs/design.md §3a's ft row).
FT = Method("ft", "full fine-tuning, train-mode BN", _build, {"default": 3e-3})
