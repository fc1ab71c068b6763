r"""Probe: where does TinyTL's gain on mnist_m live? (docs/design.md §3a)

In the digits table tinytl (lite residual branches beside every block, plus the BN
shifts and head) reaches mnist_m 78.3 % against the shifts alone's 71.7 %: the
margin issue 17 asks of da2. This probe keeps tinytl's branches beside only some
blocks, to say whether what helps is early (the large maps, where da2's adaptors
sit) or late (the small maps, whose activations cost little at any input size),
and adds the late branches to da2 to see whether the two add up.

Every run: 720 training images, 64x64, 4 epochs, batch 64, EfficientNet-Lite0
(ImageNet weights), warmup then cosine, --calibrate-shifts, seeds none of the
digits table's, each method at its digits-table rates (bias_lean and tinytl at
their sweep's 10x: shifts and head 3e-2, tinytl's branches 9e-3).

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/lite_branch_probe.py --data /tmp/digits    # ~6 min on 2 cores

Writes benchmarks/results/lite_branch_probe.{md,json} (or lite_branch_probe_<domain>).
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from da2ext import methods  # noqa: E402
from da2ext.methods.deep_attention_adaptor import ADAPTOR_MAX_STRIDE, RANK  # noqa: E402
from da2ext.methods.lite_residual import LiteResidualBlock, add_lite_residuals  # noqa: E402
from da2ext.methods.method import Method  # noqa: E402
from da2ext.lean.adapt import adapt  # noqa: E402
from probe_runs import (ACCURACY_COLUMNS, BIAS_LEAN_TABLE_RATES, accuracy_row, provenance,  # noqa: E402
                        run_configuration, run_probe)

# EfficientNet-Lite0's 16 blocks: the first 5 end at output stride <= 8 (2, 4, 4, 8, 8), the rest at 16 and 32.
EARLY_BLOCKS = 5
TINYTL_TABLE_RATES = {"other": 9e-3, "default": 3e-2}  # tinytl's rates at its sweep's 10x (digits.md)


def _lite_branches(keep, adaptors):
    """A build: the lean backbone with its shifts and head, tinytl's lite branches beside
    the blocks whose index `keep` accepts, and da2's adaptors if `adaptors`."""
    def build(backbone, num_classes):
        if adaptors:
            model = adapt(backbone, num_classes, rank=RANK, adaptor_max_stride=ADAPTOR_MAX_STRIDE)
        else:
            model = adapt(backbone, num_classes, adaptors=False, shifts=True)
        add_lite_residuals(model)
        sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                 if isinstance(child, LiteResidualBlock)]
        for index, (parent, name, child) in enumerate(sites):
            if not keep(index):
                setattr(parent, name, child.main)
        return model.train()
    return build


def configurations():
    """(label, method, rates) in the order of the table."""
    def row(label, keep, adaptors=False):
        rates = dict(BIAS_LEAN_TABLE_RATES, other=TINYTL_TABLE_RATES["other"])
        if adaptors:
            rates["adaptors"] = methods.get("da2").learning_rates["adaptors"]
        return label, Method("lite_branch_variant", label, _lite_branches(keep, adaptors), TINYTL_TABLE_RATES), rates
    return (
        ("bias_lean (shifts and head 3e-2)", methods.get("bias_lean"), dict(BIAS_LEAN_TABLE_RATES)),
        row("tinytl: branches beside every block", lambda i: True),
        row("branches beside the first 5 blocks (stride <= 8)", lambda i: i < EARLY_BLOCKS),
        row("branches beside the last 11 blocks (stride >= 16)", lambda i: i >= EARLY_BLOCKS),
        row("branches beside the last 5 blocks (stride 32)", lambda i: i >= 11),
        row("da2 + branches beside the last 11 blocks", lambda i: i >= EARLY_BLOCKS, adaptors=True),
    )


def run_one(args, label, seed):
    return run_configuration(args, configurations(), label, seed)


def markdown(records, args, argv):
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = ["# Where tinytl's gain lives ({})".format(args.domain), "",
             "{} with {} training images, 64x64, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup "
             "then cosine, every run with `--calibrate-shifts`. Seeds {} (none of the digits table's). Lite branches "
             "(TinyTL's, da2ext/methods/lite_residual.py) at 9e-3, shifts and head at 3e-2, da2's adaptors (rank {}, "
             "after the blocks of stride <= {}) at their 0.1. train: the last epoch's accuracy on the training "
             "batches; val: the held-out images. {}".format(args.domain, args.subsample, args.epochs, seeds, RANK,
                                                             ADAPTOR_MAX_STRIDE,
                                                             provenance("lite_branch_probe.py", argv)),
             "", ACCURACY_COLUMNS, "| --- | --- | --- | --- | --- |"]
    for label, _, _ in configurations():
        rows = [r for r in records if r["config"] == label]
        if rows:
            lines.append(accuracy_row(label, rows)[0])
    return "\n".join(lines) + "\n"


def _runs(args):
    return [(label, seed) for label, _, _ in configurations() for seed in args.seeds
            if not args.only or re.search(args.only, label)]


def _arguments(parser):
    parser.add_argument("--only", help="a regular expression: run only the rows whose label it matches")


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown,
              lambda args: "lite_branch_probe" if args.domain == "mnist_m" else "lite_branch_probe_" + args.domain,
              "lite_branch_probe.py", add_arguments=_arguments)


if __name__ == "__main__":
    main()
