"""The learning-rate schedule of every training run (docs/design.md §5): a
short linear warmup, then one cosine decay to zero, per step.

Why the warmup: Adam's first steps move every parameter by about its full
rate whatever the gradient's size (the second-moment estimate starts from a
single sample). For DA2's adaptors (rate 0.1, gamma starting at 0) and for a
trainable tail on frozen BN statistics those first steps are the ones that
throw a run off; ramping the rate up over the first tenth of the steps steadies
every method, baselines included (benchmarks/results/training_recipe.md).
"""
import math

import torch

__all__ = ["WARMUP_FRACTION", "WarmupCosine", "warmup_cosine_scheduler"]

WARMUP_FRACTION = 0.1


class WarmupCosine(object):
    """The factor on the base rate at step `step` (0-based) of `total_steps`:
    (step + 1) / (warmup_steps + 1) during the warmup, then a cosine from 1 to 0
    over the remaining steps. A callable object, not a closure, so that the
    scheduler's state_dict (a checkpoint) holds its two integers."""

    def __init__(self, total_steps, warmup_steps):
        if total_steps < 1:
            raise ValueError("total_steps must be >= 1, got {}".format(total_steps))
        if not 0 <= warmup_steps < total_steps:
            raise ValueError("warmup_steps must be in [0, total_steps={}), got {}".format(total_steps, warmup_steps))
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1.0) / (self.warmup_steps + 1.0)
        progress = (step - self.warmup_steps) / float(self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_scheduler(optimizer, total_steps, warmup_fraction=WARMUP_FRACTION):
    """A LambdaLR stepping WarmupCosine over total_steps, the warmup lasting
    round(warmup_fraction * total_steps) steps (0 for a plain cosine)."""
    if not 0 <= warmup_fraction < 1:
        raise ValueError("warmup_fraction must be in [0, 1), got {!r}".format(warmup_fraction))
    total_steps = max(1, int(total_steps))
    warmup_steps = min(int(round(warmup_fraction * total_steps)), total_steps - 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))
