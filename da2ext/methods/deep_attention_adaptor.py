"""DA2 and its ablations (docs/design.md §3a): the fused adaptors, the BN shifts and
a head on the lean frozen backbone; the same recipe in plain PyTorch
(da2_eager); the adaptors without the shifts (da2_adaptor_only); and DA2 with a
trainable tail, by block count (da2_tail<k>) or by memory budget
(da2_budget<MiB>).

The rates: the adaptors learn only with a rate of their own, far above the
shifts' (gamma starts at 0 and Adam moves it by about its rate per step: at the
shifts' rate a few dozen steps leave it too small to matter). The adaptor rate
and the rank are chosen by benchmarks/adaptor_design_probe.py (rate on seed 0,
rank on seeds 1-2; benchmarks/results/adaptor_design.md): rank 4 at 0.1.
"""
import re

from ..adapt import adapt
from .method import Method

RANK = 4
LEARNING_RATES = {"adaptors": 1e-1, "shifts": 3e-3, "head": 3e-3, "tail": 3e-3, "default": 3e-3}
# With a trainable tail the adaptors' 0.1 is too high: in the digits sweep (seed 0, mnist_m) every tail
# row diverged at it with the tail at 3e-3, and learned best at 0.3x da2's rates with the tail near 1e-3
# (benchmarks/results/digits_sweep.json at 6593f64). The tail methods are centred there.
TAIL_LEARNING_RATES = {"adaptors": 3e-2, "shifts": 1e-3, "head": 1e-3, "tail": 1e-3, "default": 1e-3}
# Where da2_budget<MiB> measures its training memory: docs/design.md §4's nano setting (batch 8, 224 x 224).
BUDGET_INPUT_SHAPE = (8, 3, 224, 224)

DA2 = Method("da2", "fused rank-{} adaptors + BN shifts + head, lean frozen backbone".format(RANK),
             lambda backbone, num_classes: adapt(backbone, num_classes, rank=RANK), LEARNING_RATES)
DA2_EAGER = Method("da2_eager", "the da2 recipe in plain PyTorch on a plainly frozen backbone",
                   lambda backbone, num_classes: adapt(backbone, num_classes, lean=False, rank=RANK), LEARNING_RATES)
DA2_ADAPTOR_ONLY = Method("da2_adaptor_only", "fused adaptors + head, no BN shifts, lean backbone",
                          lambda backbone, num_classes: adapt(backbone, num_classes, shifts=False, rank=RANK),
                          LEARNING_RATES)
DA2_RANK1 = Method("da2_rank1", "da2 with rank-1 adaptors (the original adaptor; ablation)",
                   lambda backbone, num_classes: adapt(backbone, num_classes, rank=1), LEARNING_RATES)

_TAIL = re.compile(r"^da2_tail([1-9][0-9]*)$")
_BUDGET = re.compile(r"^da2_budget([1-9][0-9]*)$")


def da2_with_tail(train_last):
    """da2 plus the last `train_last` blocks (and the final conv) trained in full."""
    return Method("da2_tail{}".format(train_last),
                  "da2 + the last {} block(s) and the final conv trained (frozen BN statistics)".format(train_last),
                  lambda backbone, num_classes: adapt(backbone, num_classes, rank=RANK, train_last=train_last),
                  TAIL_LEARNING_RATES)


def da2_with_budget(budget_mib):
    """da2 plus the largest tail whose training memory at BUDGET_INPUT_SHAPE fits budget_mib MiB."""
    return Method("da2_budget{}".format(budget_mib),
                  "da2 + the largest trainable tail within {} MiB of training memory at batch 8, 224x224".format(
                      budget_mib),
                  lambda backbone, num_classes: adapt(backbone, num_classes, rank=RANK, memory_budget_mib=budget_mib,
                                                      budget_input_shape=BUDGET_INPUT_SHAPE),
                  TAIL_LEARNING_RATES)


def parametrised(name):
    """The Method a name like da2_tail2 or da2_budget64 spells, or None."""
    match = _TAIL.match(name)
    if match:
        return da2_with_tail(int(match.group(1)))
    match = _BUDGET.match(name)
    if match:
        return da2_with_budget(int(match.group(1)))
    return None
