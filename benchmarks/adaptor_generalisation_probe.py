"""Probe: do da2's adaptors fit mnist_m without generalising? (docs/design.md §3a)

With calibrated shifts and the baselines' best rates, da2 (rank-4 adaptors after
every block, BN shifts, head) no longer passes the BN shifts alone (bias_lean)
on the digits table's far domain (benchmarks/results/digits.md). This probe
records, per run, the final epoch's training accuracy beside the val accuracy, so
that "the adaptors learn nothing" and "the adaptors fit what does not carry to
unseen images" can be told apart, and tries the two cheapest remedies for the
second: fewer adaptors (only after the last block, or the last four) and an L2
penalty on the adaptors' parameters (Adam's weight_decay on that group alone).

Every run: mnist_m, 720 training images, 64x64, 4 epochs, batch 64,
EfficientNet-Lite0 (ImageNet weights), warmup then cosine, --calibrate-shifts,
seeds none of the digits table's.

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/adaptor_generalisation_probe.py --data /tmp/digits   # ~5 min on 2 cores

Writes benchmarks/results/adaptor_generalisation.{md,json}.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from da2ext.lean.adapt import AdaptedBlock, adapt  # noqa: E402
from da2ext.methods.method import Method  # noqa: E402
from probe_runs import (ACCURACY_COLUMNS, BIAS_LEAN_TABLE_RATES, PROBE_RANK, accuracy_row, probe_method,  # noqa: E402
                        provenance, run_configuration, run_probe)


class _AdaptorWeightDecay(Method):
    """A method whose adaptor group alone gets Adam's weight_decay (an L2 penalty)."""

    def __init__(self, base, weight_decay):
        Method.__init__(self, base.name, base.description, base.build, base.learning_rates)
        self.weight_decay = weight_decay

    def param_groups(self, model, lr_scale=1.0, learning_rates=None):
        groups = Method.param_groups(self, model, lr_scale, learning_rates)
        for group in groups:
            if group["name"] == "adaptors":
                group["weight_decay"] = self.weight_decay
        return groups


def _adaptors_after_last(blocks):
    """da2 with an adaptor after the last `blocks` blocks only (the others removed)."""
    def build(backbone, num_classes):
        model = adapt(backbone, num_classes, rank=PROBE_RANK)
        adapted = [m for m in model.modules() if isinstance(m, AdaptedBlock) and m.adaptor is not None]
        for block in adapted[:len(adapted) - blocks]:
            block.adaptor = None
        return model
    da2 = probe_method("da2")
    return Method("da2", "da2, adaptors after the last {} block(s) only".format(blocks), build, da2.learning_rates)


def configurations():
    """(label, method, learning-rate overrides)"""
    da2 = probe_method("da2")
    wide = dict(BIAS_LEAN_TABLE_RATES, adaptors=da2.learning_rates["adaptors"])
    return (
        ("bias_lean, shifts and head {:g}".format(BIAS_LEAN_TABLE_RATES["shifts"]), probe_method("bias_lean"),
         dict(BIAS_LEAN_TABLE_RATES)),
        ("da2 (its defaults)", da2, None),
        ("da2, adaptors after the last block only", _adaptors_after_last(1), wide),
        ("da2, adaptors after the last 4 blocks only", _adaptors_after_last(4), wide),
        ("da2, adaptor weight decay 0.1", _AdaptorWeightDecay(da2, 0.1), None),
        ("da2, adaptor weight decay 1", _AdaptorWeightDecay(da2, 1.0), None),
    )


def run_one(args, label, seed):
    return run_configuration(args, configurations(), label, seed)


def markdown(records, args, argv):
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = ["# Do da2's adaptors generalise on mnist_m?", "",
             "{} with {} training images, 64x64, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup "
             "then cosine, every run with `--calibrate-shifts`. Seeds {} (none of the digits table's). train: the "
             "last epoch's accuracy on the training batches (dropout on, as it trained); val: the held-out images. "
             "{}".format(args.domain, args.subsample, args.epochs, seeds,
                         provenance("adaptor_generalisation_probe.py", argv)), "",
             ACCURACY_COLUMNS, "| --- | --- | --- | --- | --- |"]
    for label, _, _ in configurations():
        lines.append(accuracy_row(label, [r for r in records if r["config"] == label])[0])
    return "\n".join(lines) + "\n"


def _runs(args):
    return [(label, seed) for label, _, _ in configurations() for seed in args.seeds]


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown, "adaptor_generalisation",
              "adaptor_generalisation_probe.py")


if __name__ == "__main__":
    main()
