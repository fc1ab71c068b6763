"""Probe: does augmenting the training images let da2's adaptors generalise? (docs/design.md §3a)

benchmarks/results/adaptor_generalisation.md found da2's adaptors fitting mnist_m's
720 training images (train 90.3 %) without carrying it to unseen ones (val 70.4, the
BN shifts alone 71.8). The usual remedy for a model that fits what does not
generalise is more varied data: here every method gets the same light augmentation
(a random 64x64 crop after 4 pixels of edge padding, da2ext.data.loaders), so the
comparison stays fair, at the table's 4 epochs and at 8 (augmented images take longer
to fit).

Every run: mnist_m, 720 training images, 64x64, batch 64, EfficientNet-Lite0 (ImageNet
weights), warmup then cosine, --calibrate-shifts, bias_lean at its table rate (shifts and
head 3e-2), da2 at its defaults; seeds none of the digits table's.

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/augmentation_probe.py --data /tmp/digits   # ~12 min on 2 cores

Writes benchmarks/results/augmentation_probe.{md,json}.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from probe_runs import (ACCURACY_COLUMNS, BIAS_LEAN_TABLE_RATES, accuracy_rows_with_gap, provenance, run_probe,  # noqa: E402
                        train_with_metrics)


def configurations():
    """(label, method name, learning-rate overrides, augment, epochs)"""
    rows = []
    for augment, epochs in ((False, 4), (True, 4), (True, 8)):
        words = "{}, {} epochs".format("augmented" if augment else "as the table", epochs)
        rows.append(("bias_lean, " + words, "bias_lean", dict(BIAS_LEAN_TABLE_RATES), augment, epochs))
        rows.append(("da2, " + words, "da2", None, augment, epochs))
    return rows


def run_one(args, label, seed):
    name, rates, augment, epochs = [(n, r, a, e) for lab, n, r, a, e in configurations() if lab == label][0]
    metrics, seconds = train_with_metrics(args, name, seed, learning_rates=rates,
                                          calibrate_shifts=True, augment=augment, epochs=epochs)
    return {"config": label, "method": name, "rates": rates, "augment": augment, "epochs": epochs, "seed": seed,
            "val_accuracy": metrics["final_val_accuracy"], "train_accuracy": metrics["train_accuracy"][-1],
            "seconds": seconds}


def markdown(records, args, argv):
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = ["# Does augmentation let da2's adaptors generalise on {}?".format(args.domain), "",
             "{} with {} training images, 64x64, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup then cosine, "
             "every run with `--calibrate-shifts`; augmented: a random 64x64 crop after 4 pixels of edge padding, for "
             "every method alike. Seeds {} (none of the digits table's). train: the last epoch's accuracy on the "
             "training batches; val: the held-out images. {}".format(
                 args.domain, args.subsample, seeds, provenance("augmentation_probe.py", argv)), "",
             ACCURACY_COLUMNS + " da2 - bias_lean (val) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += accuracy_rows_with_gap([(label, name, (augment, epochs))
                                     for label, name, _, augment, epochs in configurations()], records)
    return "\n".join(lines) + "\n"


def _runs(args):
    return [(label, seed) for label, _, _, _, _ in configurations() for seed in args.seeds]


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown, "augmentation_probe",
              "augmentation_probe.py")


if __name__ == "__main__":
    main()
