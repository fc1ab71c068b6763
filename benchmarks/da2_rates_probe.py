"""Probe: DA2's group rates once the shifts start calibrated (docs/design.md §3a).

With shift calibration and the digits table's extended sweep, bias_lean's best
rate for the shifts and head rose to 3e-2 (10x its default) while da2's stayed at
1e-2 with the adaptors at 0.1, and on mnist_m the BN shifts alone caught up with
da2. Is da2 held back by its rates? This grid trains da2 on one domain (mnist_m by
default) with the adaptors at 0.01, 0.03 and 0.1 and the shifts and head at 1e-2
and 3e-2, every run with --calibrate-shifts, beside bias_lean at both shift rates,
on seeds none of the digits table's (the table's setting otherwise: 720 training
images, 64x64, 4 epochs, batch 64, EfficientNet-Lite0 with ImageNet weights).

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/da2_rates_probe.py --data /tmp/digits   # ~5 min on 2 cores

Writes benchmarks/results/da2_rates.{md,json}.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from probe_runs import provenance, run_probe, train_once  # noqa: E402

# (method, rates in place of the method's)
CONFIGS = tuple(("bias_lean", {"shifts": s, "head": s}) for s in (1e-2, 3e-2)) + tuple(
    ("da2", {"adaptors": a, "shifts": s, "head": s}) for s in (1e-2, 3e-2) for a in (0.01, 0.03, 0.1))


def _label(method, rates):
    return "{}, {}".format(method, ", ".join("{} {:g}".format(g, r) for g, r in sorted(rates.items())))


def run_one(args, method, rates, seed):
    accuracy, seconds = train_once(args, method, seed, learning_rates=rates, calibrate_shifts=True)
    return {"config": _label(method, rates), "method": method, "rates": rates, "seed": seed, "val_accuracy": accuracy,
            "seconds": seconds}


def markdown(records, args, argv):
    lines = ["# DA2's rates with calibrated shifts", "",
             "{} with {} training images, 64x64, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), "
             "warmup then cosine, every run with `--calibrate-shifts`; val accuracy (%) per seed. Seeds {}: none of "
             "the digits table's. {}".format(
                 args.domain, args.subsample, args.epochs, ", ".join(str(s) for s in args.seeds),
                 provenance("da2_rates_probe.py", argv)), "",
             "| configuration | {} | mean |".format(" | ".join("seed {}".format(s) for s in args.seeds)),
             "| --- | {} | --- |".format(" | ".join("---" for _ in args.seeds))]
    for method, rates in CONFIGS:
        label = _label(method, rates)
        accs = [r["val_accuracy"] for s in args.seeds for r in records if r["config"] == label and r["seed"] == s]
        lines.append("| {} | {} | {:.1f} |".format(label, " | ".join("{:.1f}".format(100 * a) for a in accs),
                                                   100 * sum(accs) / len(accs)))
    return "\n".join(lines) + "\n"


def _runs(args):
    return [(method, rates, seed) for method, rates in CONFIGS for seed in args.seeds]


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown, "da2_rates", "da2_rates_probe.py")


if __name__ == "__main__":
    main()
