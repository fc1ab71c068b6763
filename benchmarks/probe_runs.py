"""What the single-domain probes share (training_recipe_probe.py,
shift_calibration_probe.py, da2_rates_probe.py, adaptor_generalisation_probe.py,
augmentation_probe.py, resolution_probe.py): their common arguments, one
in-process training run on the digits table's setting, bias_lean's table rates,
a progress bar over the runs, the train-against-val table rows, how they write
benchmarks/results/<stem>.{json,md} with the commit they ran at, and the "da2" they
measured (probe_method: da2 before its defaults moved to the early adaptors)."""
import argparse
import json
import os
import platform
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from da2ext.data.loaders import domain_loaders  # noqa: E402
from da2ext.domains.atomic_file import atomic_write  # noqa: E402
from da2ext.domains.multidomain import MultiDomainModel  # noqa: E402
from da2ext.methods.method import Method  # noqa: E402
from da2ext.models import backbones  # noqa: E402
from da2ext.training.loop import train_domain  # noqa: E402
from provenance import git_commit  # noqa: E402

__all__ = ["ACCURACY_COLUMNS", "BIAS_LEAN_TABLE_RATES", "DA2_BEFORE_EARLY_ADAPTORS_RATES", "PROBE_RANK",
           "accuracy_row", "accuracy_rows_with_gap", "add_only_argument", "add_probe_arguments",
           "labelled_accuracy_rows", "labelled_runs", "probe_commit", "probe_method", "progress", "provenance",
           "run_configuration", "run_probe", "train_once", "train_with_metrics", "write_results"]

# bias_lean's best rates in the digits table (its sweep's 10x), for the shifts and the head.
BIAS_LEAN_TABLE_RATES = {"shifts": 3e-2, "head": 3e-2}

# "da2" as the probes before 6809c43 measured it: rank-4 adaptors after every block (da2_all_blocks' placement)
# at 0.1, the shifts and head at 1e-2. da2's defaults moved since (adaptors after the early blocks only,
# shifts and head at 3e-2); the probes whose tables say "da2" pin this, so that a rerun measures what their
# committed results describe.
# The adaptors' rank the probes measured with: da2's default until the rank-choice run moved it to 1
# (benchmarks/results/da2_rank_choice.md); pinned so that a rerun measures what their results files say.
PROBE_RANK = 4
DA2_BEFORE_EARLY_ADAPTORS_RATES = {"adaptors": 1e-1, "shifts": 1e-2, "head": 1e-2, "default": 1e-2}

# The first columns of a probe table that sets val accuracy beside train accuracy (accuracy_row).
ACCURACY_COLUMNS = "| configuration | val per seed | val mean | train mean | train - val |"


def add_probe_arguments(parser):
    """The digits table's setting on one domain, with seeds none of the table's."""
    parser.add_argument("--data", required=True, help="the digits domains (python -m da2ext prepare-digits DIR)")
    parser.add_argument("--domain", default="mnist_m")
    parser.add_argument("--seeds", default="0,3,4", type=lambda text: [int(s) for s in text.split(",")])
    parser.add_argument("--subsample", type=int, default=720)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))


def probe_method(name):
    """The Method a probe's table calls `name`: da2ext's, except "da2", which is da2
    as those tables measured it (DA2_BEFORE_EARLY_ADAPTORS_RATES, above)."""
    from da2ext import methods
    if name != "da2":
        return methods.get(name)
    from da2ext.lean.adapt import adapt
    return Method("da2", "da2 before 6809c43: rank-4 adaptors after every block, adaptors 0.1, shifts and head 1e-2",
                  lambda backbone, num_classes: adapt(backbone, num_classes, rank=PROBE_RANK),
                  DA2_BEFORE_EARLY_ADAPTORS_RATES)


def train_once(args, method, seed, prepare_backbone=None, **train_kwargs):
    """Learn args.domain once with `method` on a fresh ImageNet EfficientNet-Lite0 (64x64,
    batch 64, args.subsample images, args.epochs epochs), in this process. prepare_backbone:
    called with (backbone, train_loader) before the method rewrites it; train_kwargs go to
    train_domain. Returns (val accuracy, seconds)."""
    metrics, seconds = train_with_metrics(args, method, seed, prepare_backbone, **train_kwargs)
    return metrics["final_val_accuracy"], seconds


def train_with_metrics(args, method, seed, prepare_backbone=None, augment=False, epochs=None, image_size=64,
                       **train_kwargs):
    """train_once, returning train_domain's whole metrics (per-epoch train and val
    accuracy, ...) and the seconds it took. method: a Method, or a name for probe_method. augment: the training images randomly
    cropped after edge padding (da2ext.data.loaders.image_transform); epochs: in place
    of args.epochs; image_size: in place of the table's 64."""
    if isinstance(method, str):
        method = probe_method(method)
    torch.manual_seed(seed)
    network = backbones.create("efficientnet_lite0", pretrained=True)
    train_loader, val_loader, classes = domain_loaders(
        os.path.join(args.data, args.domain), image_size=image_size, batch_size=64, subsample=args.subsample,
        seed=seed, augment=augment)
    if prepare_backbone is not None:
        prepare_backbone(network, train_loader)
    model = MultiDomainModel(network, method)
    model.add_domain(args.domain, len(classes), classes)
    start = time.time()
    metrics = train_domain(model, args.domain, train_loader, val_loader, epochs or args.epochs, progress=False,
                           seed=seed, **train_kwargs)
    return metrics, round(time.time() - start, 1)


def run_configuration(args, configurations, label, seed):
    """One calibrated-shifts run of the configuration called `label` among
    `configurations` ((label, method, learning-rate overrides) triples): a record with
    its val accuracy beside the last epoch's train accuracy (accuracy_row's input)."""
    method, rates = [(m, r) for name, m, r in configurations if name == label][0]
    metrics, seconds = train_with_metrics(args, method, seed, learning_rates=rates, calibrate_shifts=True)
    return {"config": label, "rates": rates, "seed": seed, "val_accuracy": metrics["final_val_accuracy"],
            "train_accuracy": metrics["train_accuracy"][-1], "seconds": seconds}


def progress(runs):
    """`runs` with a tqdm bar when tqdm is there."""
    try:
        from tqdm import tqdm
    except ImportError:
        return runs
    return tqdm(runs, desc="probe runs", unit="run")


def write_results(out_dir, stem, script, argv, records, markdown):
    """out_dir/<stem>.json (commit, argv, records) and out_dir/<stem>.md; prints the markdown."""
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    commit = probe_commit(script)
    text = json.dumps({"commit": commit, "argv": argv, "records": records}, indent=1, sort_keys=True) + "\n"
    atomic_write(os.path.join(out_dir, stem + ".json"), lambda f: f.write(text), mode="w")
    atomic_write(os.path.join(out_dir, stem + ".md"), lambda f: f.write(markdown), mode="w")
    print(markdown)


def run_probe(argv, description, runs_of, run_one, markdown, stem, script, add_arguments=None):
    """An in-process probe's whole command: parse the common arguments (and the
    probe's own: add_arguments(parser)), run run_one(args, *run) for each run of
    runs_of(args) with a progress bar, and write results/<stem>.{json,md}
    (markdown(records, args, argv) the table; stem a string or a function of args)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=description)
    add_probe_arguments(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    records = [run_one(args, *run) for run in progress(runs_of(args))]
    write_results(args.out_dir, stem(args) if callable(stem) else stem, script, argv, records,
                  markdown(records, args, argv))


def probe_commit(script):
    """The commit a probe's code is at: the package, the extension, the script and this module."""
    return git_commit(("da2ext", "csrc", "benchmarks/" + script, "benchmarks/probe_runs.py"))


def provenance(script, argv):
    """The sentence a probe's table names its commit, machine, torch and rerun command with."""
    return "Commit {}, {} ({} CPUs), torch {}. Rerun: `python benchmarks/{} {}`.".format(
        probe_commit(script), platform.machine(), os.cpu_count(), torch.__version__, script, " ".join(argv))


def accuracy_row(label, rows):
    """The ACCURACY_COLUMNS row of `label`'s runs (records with val_accuracy and
    train_accuracy, in [0, 1]), and their mean val accuracy in %."""
    val = 100 * sum(r["val_accuracy"] for r in rows) / len(rows)
    train = 100 * sum(r["train_accuracy"] for r in rows) / len(rows)
    return "| {} | {} | {:.1f} | {:.1f} | {:+.1f} |".format(
        label, " / ".join("{:.1f}".format(100 * r["val_accuracy"]) for r in rows), val, train, train - val), val


def accuracy_rows_with_gap(rows, records):
    """The table rows of (label, method name, setting) triples: accuracy_row's
    columns, then da2's val mean less bias_lean's at the same setting (empty on
    the other methods' rows). Each setting's bias_lean row comes before its da2 row."""
    means, lines = {}, []
    for label, name, setting in rows:
        row, means[(name, setting)] = accuracy_row(label, [r for r in records if r["config"] == label])
        gap = "{:+.1f}".format(means[(name, setting)] - means[("bias_lean", setting)]) if name == "da2" else ""
        lines.append(row + " {} |".format(gap))
    return lines


def add_only_argument(parser):
    """--only REGEX: a probe runs only the rows whose label matches (labelled_runs)."""
    parser.add_argument("--only", help="a regular expression: run only the rows whose label it matches")


def labelled_runs(configurations, args):
    """(label, seed) for every row of `configurations` ((label, ...) tuples) and seed of
    args.seeds, only the rows whose label matches args.only when it is given."""
    return [(row[0], seed) for row in configurations for seed in args.seeds
            if not args.only or re.search(args.only, row[0])]


def labelled_accuracy_rows(configurations, records):
    """accuracy_row of each row of `configurations` that has records, in their order."""
    lines = []
    for row in configurations:
        runs = [r for r in records if r["config"] == row[0]]
        if runs:
            lines.append(accuracy_row(row[0], runs)[0])
    return lines
