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
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from probe_runs import (ACCURACY_COLUMNS, BIAS_LEAN_TABLE_RATES, accuracy_rows_with_gap, provenance, run_probe,  # noqa: E402
                        train_with_metrics)

SIZES = (64, 128)


def configurations():
    """(label, method name, learning-rate overrides, image size)"""
    rows = []
    for size in SIZES:
        rows.append(("bias_lean, {0}x{0}".format(size), "bias_lean", dict(BIAS_LEAN_TABLE_RATES), size))
        rows.append(("da2, {0}x{0}".format(size), "da2", None, size))
    return rows


def run_one(args, label, seed):
    name, rates, size = [(n, r, z) for lab, n, r, z in configurations() if lab == label][0]
    metrics, seconds = train_with_metrics(args, name, seed, learning_rates=rates,
                                          calibrate_shifts=True, image_size=size)
    return {"config": label, "method": name, "rates": rates, "image_size": size, "seed": seed,
            "val_accuracy": metrics["final_val_accuracy"], "train_accuracy": metrics["train_accuracy"][-1],
            "seconds": seconds}


def markdown(records, args, argv):
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = ["# Do da2's adaptors need larger maps? ({})".format(args.domain), "",
             "{} with {} training images, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup then "
             "cosine, every run with `--calibrate-shifts`. Seeds {} (none of the digits table's). train: the last "
             "epoch's accuracy on the training batches; val: the held-out images. {}".format(
                 args.domain, args.subsample, args.epochs, seeds, provenance("resolution_probe.py", argv)), "",
             ACCURACY_COLUMNS + " da2 - bias_lean (val) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += accuracy_rows_with_gap([(label, name, size) for label, name, _, size in configurations()], records)
    return "\n".join(lines) + "\n"


def _runs(args):
    return [(label, seed) for label, _, _, _ in configurations() for seed in args.seeds]


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown, "resolution_probe", "resolution_probe.py")


if __name__ == "__main__":
    main()
