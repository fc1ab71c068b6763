"""DA2 and its ablations (DESIGN.md §3a): the fused adaptors, the BN shifts and
a head on the lean frozen backbone; the same recipe in plain PyTorch
(da2_eager); the adaptors without the shifts (da2_adaptor_only)."""
from ..adapt import adapt
from .method import Method

# §3a's default: Adam, lr 1e-2 for shifts and head, 3e-3 for the adaptors.
_LEARNING_RATES = {"adaptors": 3e-3, "shifts": 1e-2, "head": 1e-2, "default": 1e-2}

DA2 = Method("da2", "fused adaptors + BN shifts + head, lean frozen backbone",
             lambda backbone, num_classes: adapt(backbone, num_classes), _LEARNING_RATES)
DA2_EAGER = Method("da2_eager", "the da2 recipe in plain PyTorch on a plainly frozen backbone",
                   lambda backbone, num_classes: adapt(backbone, num_classes, lean=False), _LEARNING_RATES)
DA2_ADAPTOR_ONLY = Method("da2_adaptor_only", "fused adaptors + head, no BN shifts, lean backbone",
                          lambda backbone, num_classes: adapt(backbone, num_classes, shifts=False), _LEARNING_RATES)
