"""A trainable tail (docs/design.md §3a): the last blocks of the pretrained
network trained in full, in plain autograd, while everything before them stays
lean and frozen.

Why the tail: on a domain far from ImageNet the frozen deep stages cap every
frozen method, and the deep stages are where training is cheap in activations
(their maps are small: 7x7 at 224 px). What they cost is their weights'
gradients and optimiser state, so how many blocks to train is a memory
budget's decision: `largest_tail_within_budget` measures it.
"""
import copy

import torch
import torch.nn.functional as F

from ..profiling import profile_step
from .frozen_blocks import InferenceOnly

__all__ = ["TAIL_STATISTICS", "TrainableTail", "training_bytes", "largest_tail_within_budget"]

MIB = float(2 ** 20)


TAIL_STATISTICS = ("final", "batch", "frozen")


class TrainableTail(InferenceOnly):
    """Runs `module` as it is with every parameter trainable (convs, BN scales
    and shifts), in eval mode except for the BNs that `statistics` names:

    "frozen": none; every BN keeps the pretrained running statistics.
    "batch": every BN of the module.
    "last": the module's last BN (the one nearest the head).

    A BN on batch statistics normalises with the batch's in training, as in
    fine-tuning, and its running statistics become the domain's own
    (MultiDomainModel keeps one set per domain and saves it in the domain
    file); eval uses them. adapt() puts the tail's last BN on batch statistics
    and keeps the others frozen (its tail_statistics="final"): measured on
    mnist_m (benchmarks/results/training_recipe.md), that last BN lifts a
    5-block tail by about 10 points over frozen statistics, while batch
    statistics in every block lose most of it again (their deep maps are 2x2 at
    64 px: few values per channel for a batch's statistics)."""

    def __init__(self, module, statistics="frozen"):
        super(TrainableTail, self).__init__(module)
        if statistics not in ("frozen", "batch", "last"):
            raise ValueError('TrainableTail: statistics must be "frozen", "batch" or "last", got {!r}'.format(
                statistics))
        self.statistics = statistics
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.train(self.training)

    def domain_statistics(self):
        """(qualified name within this module, BN) of the BNs on batch
        statistics, whose running statistics the domain owns."""
        if self.statistics == "frozen":
            return []
        bns = [(name, m) for name, m in self.module.named_modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        return bns if self.statistics == "batch" else bns[-1:]

    def train(self, mode=True):
        super(TrainableTail, self).train(mode)  # the module to eval
        for _, bn in self.domain_statistics():
            bn.train(mode)
        return self


def training_bytes(model, input_shape, num_classes=None):
    """What one Adam training step of `model` costs at `input_shape` (N, C, H, W),
    beyond the model's own tensors: kept for backward + gradients + optimiser
    state, in bytes (docs/design.md §4), measured by one da2ext.profile_step on
    random data. Returns (total, profile)."""
    device = next(model.parameters()).device
    inputs = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.0)  # rate 0: the measurement leaves the weights as they are
    model.train()
    with torch.no_grad():
        classes = model(inputs[:1]).shape[1] if num_classes is None else num_classes
    targets = torch.arange(input_shape[0], device=device) % classes
    profile = profile_step(model, inputs, targets, F.cross_entropy, optimizer, warmup=0, steps=0)
    for p in trainable:
        p.grad = None
    total = profile["saved_bytes"] + profile["grad_bytes"] + profile["optimizer_bytes"]
    return total, profile


def largest_tail_within_budget(model, adapt_with_tail, max_blocks, budget_mib, input_shape):
    """The largest k in [0, max_blocks] such that adapt_with_tail(copy of model, k)
    trains within budget_mib MiB (training_bytes at input_shape), by bisection
    (the cost grows with k). Returns (k, {k: bytes measured}). `model` itself is
    left untouched; k = 0 is returned even when it does not fit (the lean model
    is the least there is), with its measurement, so the caller can say so."""
    measured = {}

    def cost(k):
        if k not in measured:
            candidate = adapt_with_tail(copy.deepcopy(model), k)
            measured[k] = training_bytes(candidate, input_shape)[0]
            del candidate
        return measured[k]

    budget = budget_mib * MIB
    low, high = 0, max_blocks  # invariant: the answer is in [low, high]
    cost(0)
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low, measured
