"""DA2 and its ablations (docs/design.md §3a): the fused adaptors after the early
blocks, low-rank branches beside the late ones, the BN shifts and a head on the
lean frozen backbone; the same recipe in plain PyTorch (da2_eager); without the
shifts (da2_adaptor_only); without the branches (da2_no_branches); at rank 4
(da2_rank4); and DA2 with
a trainable tail, by block count (da2_tail<k>) or by memory budget
(da2_budget<MiB>).

The rates: the adaptors learn only with a rate of their own, far above the
shifts' (gamma starts at 0 and Adam moves it by about its rate per step: at the
shifts' rate a few dozen steps leave it too small to matter). The adaptor rate
was chosen by benchmarks/adaptor_design_probe.py on seed 0
(benchmarks/results/adaptor_design.md): 0.1. The rank: 1. The design probe had
picked 4 on the digits table's own seeds, before the branches and the early
placement; with today's recipe, over seeds 4-9 (none of the table's), rank 1 was
at least as good on every domain and spread less (mnist_m 77.9 against 77.2 %,
three-domain mean 89.0 against 88.3: benchmarks/results/da2_rank_choice.md, where
"da2" is the rank-4 default of its commit), with fewer parameters and bytes.

The placement: adaptors only after the blocks of output stride <= 8 (the early,
high-resolution stages), with the shifts and head at bias_lean's 3e-2. Late
adaptors, most of the parameters, fit a small domain's training images without
generalising; early ones at these rates passed the shifts alone on mnist_m
(benchmarks/adaptor_variants_probe.py, seeds 0, 3 and 4, none of the digits
table's; benchmarks/results/adaptor_variants.md). On the digits table's seeds
that margin did not hold (benchmarks/results/digits.md: every placement within
the seeds' spread of the shifts alone); the placement stays for what it saves.

The branches: beside the blocks of stride 32 (the last stage), a width-64
low-rank convolution branch on the block's input (da2ext.nn.LowRankConvBranch),
at 3e-2 like the shifts. The frozen deep stages cap what the shifts and the
adaptors learn on a far domain; TinyTL's lite branches pass the shifts alone
there, and their margin lives in the late blocks (benchmarks/lite_branch_probe.py,
benchmarks/results/lite_branch_probe.md, seeds none of the digits table's), where
the maps are small: ResNet-50's three branches keep about 2 MiB for backward at
224 x 224, batch 8.

da2_eager, da2_adaptor_only, da2_rank4 and da2_no_branches change one thing of
da2 each; da2_all_blocks puts its adaptors after every block (the placement's
ablation).
The tails keep the recipe they were measured with (rank-4 adaptors after every
block, shifts and head at 1e-2, the tail at 1e-3: benchmarks/training_recipe_probe.py,
benchmarks/results/training_recipe.md).
"""
import re

import torch

from ..lean.adapt import adapt, supported_family
from .method import Method

RANK = 1
# The tails' adaptors: the rank they were measured with (the module's docstring).
TAIL_RANK = 4
# Adaptors after the blocks whose output is at most this many times smaller than the input (adapt()).
ADAPTOR_MAX_STRIDE = 8
# Low-rank branches of this width beside the blocks whose output is at least this many times smaller (adapt()).
BRANCH_WIDTH = 64
BRANCH_MIN_STRIDE = 32
LEARNING_RATES = {"adaptors": 1e-1, "branches": 3e-2, "shifts": 3e-2, "head": 3e-2, "default": 3e-2}
# da2 before its branches: the same groups less "branches" (a method's rates name only groups it trains).
NO_BRANCH_LEARNING_RATES = dict((group, rate) for group, rate in LEARNING_RATES.items() if group != "branches")
# A tail's pretrained weights take a rate well under the shifts' (in the digits table's sweep, at 3x these
# rates, the tail at 3e-3, a frozen-statistics tail stayed at chance: benchmarks/results/digits_sweep.json);
# its shifts and head keep the 1e-2 the tails were measured with.
TAIL_LEARNING_RATES = {"adaptors": 1e-1, "shifts": 1e-2, "head": 1e-2, "default": 1e-2, "tail": 1e-3}
# Where da2_budget<MiB> measures its training memory: docs/design.md §4's nano setting (batch 8, 224 x 224).
BUDGET_INPUT_SHAPE = (8, 3, 224, 224)



def _da2_build(**options):
    """adapt() with da2's rank, adaptor placement and branches, changed by `options`.
    A model adapt() adapts generically (blocks it does not know) gets no branches."""
    settings = dict(rank=RANK, adaptor_max_stride=ADAPTOR_MAX_STRIDE, branch_width=BRANCH_WIDTH,
                    branch_min_stride=BRANCH_MIN_STRIDE)
    settings.update(options)

    def build(backbone, num_classes):
        chosen = dict(settings)
        if supported_family(backbone) is None:
            chosen["branch_width"] = None
        return adapt(backbone, num_classes, **chosen)
    return build


DA2 = Method("da2", "fused rank-{} adaptors after the blocks of stride <= {} + width-{} low-rank branches beside the "
             "blocks of stride {} + BN shifts + head, lean frozen backbone".format(
                 RANK, ADAPTOR_MAX_STRIDE, BRANCH_WIDTH, BRANCH_MIN_STRIDE), _da2_build(), LEARNING_RATES)
DA2_EAGER = Method("da2_eager", "the da2 recipe in plain PyTorch on a plainly frozen backbone",
                   _da2_build(lean=False), LEARNING_RATES)
DA2_ADAPTOR_ONLY = Method("da2_adaptor_only", "da2's adaptors and branches + head, no BN shifts, lean backbone",
                          _da2_build(shifts=False), LEARNING_RATES)
DA2_RANK4 = Method("da2_rank4", "da2 with rank-4 adaptors (the rank's ablation)", _da2_build(rank=4),
                   LEARNING_RATES)
DA2_ALL_BLOCKS = Method("da2_all_blocks", "da2 with an adaptor after every block (the placement's ablation)",
                        _da2_build(adaptor_max_stride=None), LEARNING_RATES)
DA2_NO_BRANCHES = Method("da2_no_branches", "da2 without its low-rank branches (adaptors, shifts and head)",
                         _da2_build(branch_width=None), NO_BRANCH_LEARNING_RATES)

# Not among METHODS (the digits table runs those all): on a backbone whose blocks are all bit-lean it is da2.
DA2_HALF_RECOMPUTE = Method(
    "da2_half_recompute", "da2 with the recomputed blocks' inputs kept in float16 (SiLU, GELU, SE, LayerNorm blocks)",
    _da2_build(recompute_dtype=torch.float16), LEARNING_RATES)

_TAIL = re.compile(r"^da2_tail([1-9][0-9]*)(?:_(batch|frozen)_stats)?$")
_BUDGET = re.compile(r"^da2_budget([1-9][0-9]*)$")


_TAIL_STATISTICS = {"final": ("", "its last BN on batch statistics"),
                    "batch": ("_batch_stats", "every BN on batch statistics"),
                    "frozen": ("_frozen_stats", "frozen BN statistics")}


def da2_with_tail(train_last, statistics="final"):
    """da2 plus the last `train_last` blocks (and the final conv) trained in full;
    statistics: adapt()'s tail_statistics (da2_tail<k>_batch_stats and
    da2_tail<k>_frozen_stats, ablations, name the other two)."""
    suffix, words = _TAIL_STATISTICS[statistics]
    return Method("da2_tail{}{}".format(train_last, suffix),
                  "da2 + the last {} block(s) and the final conv trained, {}".format(train_last, words),
                  lambda backbone, num_classes: adapt(backbone, num_classes, rank=TAIL_RANK, train_last=train_last,
                                                      tail_statistics=statistics),
                  TAIL_LEARNING_RATES)


def da2_with_budget(budget_mib):
    """da2 plus the largest tail whose training memory at BUDGET_INPUT_SHAPE fits budget_mib MiB."""
    return Method("da2_budget{}".format(budget_mib),
                  "da2 + the largest trainable tail within {} MiB of training memory at batch 8, 224x224".format(
                      budget_mib),
                  lambda backbone, num_classes: adapt(backbone, num_classes, rank=TAIL_RANK,
                                                      memory_budget_mib=budget_mib,
                                                      budget_input_shape=BUDGET_INPUT_SHAPE),
                  TAIL_LEARNING_RATES)


def parametrised(name):
    """The Method a name like da2_tail2, da2_tail2_frozen_stats or da2_budget64 spells,
    da2_half_recompute, or None."""
    if name == DA2_HALF_RECOMPUTE.name:
        return DA2_HALF_RECOMPUTE
    match = _TAIL.match(name)
    if match:
        return da2_with_tail(int(match.group(1)), statistics=match.group(2) or "final")
    match = _BUDGET.match(name)
    if match:
        return da2_with_budget(int(match.group(1)))
    return None
