"""Probe: do da2's adaptors need larger maps? (docs/design.md §3a)

At the digits table's 64x64, EfficientNet-Lite0's last stages see 4x4 and 2x2 maps,
where an adaptor's spatial attention has next to nothing to choose between, and da2
does not pass the BN shifts alone (bias_lean) on mnist_m. This probe trains both at
64x64 and at 128x128 (every map four times larger), the same images, rates and
epochs, to see whether the adaptors' margin depends on the maps' size.

Every run: mnist_m, 720 training images, 4 epochs, batch 64, EfficientNet-Lite0
(ImageNet weights), warmup then cosine, --calibrate-shifts, bias_lean at its table
rate (shifts and head 3e-2), da2 at its defaults; seeds none of the digits table's.

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/resolution_probe.py --data /tmp/digits   # ~15 min on 2 cores

Writes benchmarks/results/resolution_probe.{md,json}.
"""
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from da2ext import methods  # noqa: E402
from probe_runs import run_probe, train_with_metrics  # noqa: E402
from provenance import git_commit  # noqa: E402

# bias_lean's best rate in the digits table (its sweep's 10x), for the shifts and the head.
SHIFT_RATE = 3e-2
SIZES = (64, 128)


def configurations():
    """(label, method name, learning-rate overrides, image size)"""
    rows = []
    for size in SIZES:
        rows.append(("bias_lean, {0}x{0}".format(size), "bias_lean", {"shifts": SHIFT_RATE, "head": SHIFT_RATE}, size))
        rows.append(("da2, {0}x{0}".format(size), "da2", None, size))
    return rows


def run_one(args, label, seed):
    name, rates, size = [(n, r, z) for lab, n, r, z in configurations() if lab == label][0]
    metrics, seconds = train_with_metrics(args, methods.get(name), seed, learning_rates=rates,
                                          calibrate_shifts=True, image_size=size)
    return {"config": label, "method": name, "rates": rates, "image_size": size, "seed": seed,
            "val_accuracy": metrics["final_val_accuracy"], "train_accuracy": metrics["train_accuracy"][-1],
            "seconds": seconds}


def markdown(records, args, argv):
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = ["# Do da2's adaptors need larger maps? ({})".format(args.domain), "",
             "{} with {} training images, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup then "
             "cosine, every run with `--calibrate-shifts`. Seeds {} (none of the digits table's). train: the last "
             "epoch's accuracy on the training batches; val: the held-out images. Commit {}, {} ({} CPUs), torch {}. "
             "Rerun: `python benchmarks/resolution_probe.py {}`.".format(
                 args.domain, args.subsample, args.epochs, seeds,
                 git_commit(("da2ext", "csrc", "benchmarks/resolution_probe.py", "benchmarks/probe_runs.py")),
                 platform.machine(), os.cpu_count(), torch.__version__, " ".join(argv)), "",
             "| configuration | val per seed | val mean | train mean | train - val | da2 - bias_lean (val) |",
             "| --- | --- | --- | --- | --- | --- |"]
    means = {}
    for label, name, _, size in configurations():
        rows = [r for r in records if r["config"] == label]
        val = 100 * sum(r["val_accuracy"] for r in rows) / len(rows)
        train = 100 * sum(r["train_accuracy"] for r in rows) / len(rows)
        means[(name, size)] = val
        gap = "{:+.1f}".format(val - means[("bias_lean", size)]) if name == "da2" else ""
        lines.append("| {} | {} | {:.1f} | {:.1f} | {:+.1f} | {} |".format(
            label, " / ".join("{:.1f}".format(100 * r["val_accuracy"]) for r in rows), val, train, train - val, gap))
    return "\n".join(lines) + "\n"


def _runs(args):
    return [(label, seed) for label, _, _, _ in configurations() for seed in args.seeds]


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown, "resolution_probe", "resolution_probe.py")


if __name__ == "__main__":
    main()
