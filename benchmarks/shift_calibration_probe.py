"""Probe: does re-estimating the frozen BN statistics on the new domain's training
images (AdaBN) before the backbone is frozen help, and whom? (docs/design.md §5)

Each configuration learns one domain (mnist_m by default) on the digits table's
setting (720 training images, 64x64, 4 epochs, batch 64, EfficientNet-Lite0 with
ImageNet weights, each method's default rates and warmup) once per seed:
- none: the pretrained BN statistics, as every method uses today;
- mean: `train --calibrate-shifts` (da2ext.calibrate_shifts): each frozen BN's
  shift starts where AdaBN's running mean on the domain's training images puts it
  (one pass with the BNs normalising as in train mode), its running variance kept.
  It only moves where the trainable shifts start: no memory, no new tensor;
- full: running mean and variance both re-estimated on the plain backbone before
  the method freezes it (AdaBN proper). Folding the variance into the frozen conv
  changes the frozen weights per domain: a domain would need its own backbone
  copy, so this row is a bound on what the statistics can give, not an option.

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/shift_calibration_probe.py --data /tmp/digits   # ~5 min on 2 cores

Writes benchmarks/results/shift_calibration.{md,json}. Re-centring each frozen BN on
the mean its output has in the frozen model itself, instead of AdaBN's train-mode
pass, collapsed (benchmarks/results/shift_calibration_recentred.md, commit 04ba121).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from probe_runs import provenance, run_probe, train_once  # noqa: E402

METHODS = ("bias_lean", "da2")
STATISTICS = ("none", "mean", "full")


def recalibrate_statistics(network, loader):
    """Re-estimate every BN's running statistics of `network` on the images of
    `loader` (train-mode forwards, cumulative average)."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    network.train()
    with torch.no_grad():
        for images, _ in loader:
            network(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    network.eval()


def _full_adabn(network, train_loader):
    # Its own unshuffled pass, so that the training run's shuffling is the uncalibrated run's.
    recalibrate_statistics(network, torch.utils.data.DataLoader(train_loader.dataset, batch_size=64))


def run_one(args, method, which, seed):
    accuracy, seconds = train_once(args, method, seed, prepare_backbone=_full_adabn if which == "full" else None,
                                   calibrate_shifts=which == "mean")
    return {"method": method, "statistics": which, "seed": seed, "val_accuracy": accuracy, "seconds": seconds}


def markdown(records, args, argv):
    lines = ["# Shift calibration probe", "",
             "{} with {} training images, 64x64, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), each "
             "method's default rates and warmup; val accuracy (%) per seed. Seeds {}: none of the digits table's. "
             "{}".format(args.domain, args.subsample, args.epochs, ", ".join(str(s) for s in args.seeds),
                         provenance("shift_calibration_probe.py", argv)), "",
             "statistics: none = pretrained; mean = `--calibrate-shifts`, the shifts started where AdaBN's running "
             "means on the domain's training images put them (free: no memory, no new tensor); full = means and "
             "variances re-estimated before freezing (AdaBN; would need per-domain frozen weights: a bound, not an "
             "option).", "",
             "| method | statistics | {} | mean |".format(" | ".join("seed {}".format(s) for s in args.seeds)),
             "| --- | --- | {} | --- |".format(" | ".join("---" for _ in args.seeds))]
    for method in METHODS:
        for which in STATISTICS:
            accs = [r["val_accuracy"] for s in args.seeds for r in records
                    if r["method"] == method and r["statistics"] == which and r["seed"] == s]
            lines.append("| {} | {} | {} | {:.1f} |".format(method, which, " | ".join(
                "{:.1f}".format(100 * a) for a in accs), 100 * sum(accs) / len(accs)))
    return "\n".join(lines) + "\n"


def _runs(args):
    return [(m, w, s) for m in METHODS for w in STATISTICS for s in args.seeds]


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown, "shift_calibration", "shift_calibration_probe.py")


if __name__ == "__main__":
    main()
