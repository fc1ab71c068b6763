"""The training recipe's probe (docs/design.md §5): which warmup and which rates
the DA2 methods train with, measured on seeds that the digits table does not use.

Every configuration learns one domain (mnist_m by default, the far one) once per
seed with `python -m da2ext train`, on the digits table's setting (720 training
images, 64x64, 4 epochs, batch 64, EfficientNet-Lite0 with ImageNet weights),
two runs at a time. The configurations compare:
- the schedule: a plain cosine (warmup 0) against 10 % linear warmup, for
  bias_lean, da2 and a trainable tail;
- da2's shift and head rate: 3e-3 against 1e-2 (adaptors at 0.1 either way);
- a trainable tail's BN statistics: frozen, batch statistics in every BN, or
  in the tail's last BN only (adapt()'s tail_statistics), at three rate sets.

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/training_recipe_probe.py --data /tmp/digits   # ~10 min on 2 cores

Writes benchmarks/results/training_recipe.{md,json}; finished runs are kept in
--workdir and reused when rerun with the same command.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from da2ext.domains.atomic_file import atomic_write  # noqa: E402
from probe_runs import add_probe_arguments, provenance, write_results  # noqa: E402

OLD_DA2 = {"adaptors": 0.1, "shifts": 3e-3, "head": 3e-3}
NEW_DA2 = {"adaptors": 0.1, "shifts": 1e-2, "head": 1e-2}
OLD_TAIL = {"adaptors": 3e-2, "shifts": 1e-3, "head": 1e-3, "tail": 1e-3}
MID_TAIL = {"adaptors": 0.1, "shifts": 3e-3, "head": 3e-3, "tail": 1e-3}
NEW_TAIL = dict(NEW_DA2, tail=1e-3)
# (row name, method, warmup fraction, rates in place of the method's). "da2" rows train da2_all_blocks, da2's
# placement when this probe ran (166e4f1: rank-4 adaptors after every block), at the rates each row names.
CONFIGS = (
    ("bias_lean, cosine", "bias_lean", 0.0, {}),
    ("bias_lean, warmup", "bias_lean", 0.1, {}),
    ("bias_lean, warmup, shifts+head 1e-2", "bias_lean", 0.1, {"shifts": 1e-2, "head": 1e-2}),
    ("da2, cosine, shifts+head 3e-3", "da2_all_blocks", 0.0, OLD_DA2),
    ("da2, warmup, shifts+head 3e-3", "da2_all_blocks", 0.1, OLD_DA2),
    ("da2, cosine, shifts+head 1e-2", "da2_all_blocks", 0.0, NEW_DA2),
    ("da2, warmup, shifts+head 1e-2", "da2_all_blocks", 0.1, NEW_DA2),
    ("da2_tail5, frozen stats, cosine, tail rates A", "da2_tail5_frozen_stats", 0.0, OLD_TAIL),
    ("da2_tail5, frozen stats, warmup, tail rates A", "da2_tail5_frozen_stats", 0.1, OLD_TAIL),
    ("da2_tail5, frozen stats, warmup, tail rates B", "da2_tail5_frozen_stats", 0.1, MID_TAIL),
    ("da2_tail5, batch stats, warmup, tail rates B", "da2_tail5_batch_stats", 0.1, MID_TAIL),
    ("da2_tail5, final BN on batch stats, warmup, tail rates B", "da2_tail5", 0.1, MID_TAIL),
    ("da2_tail5, frozen stats, warmup, tail rates C", "da2_tail5_frozen_stats", 0.1, NEW_TAIL),
    ("da2_tail5, batch stats, warmup, tail rates C", "da2_tail5_batch_stats", 0.1, NEW_TAIL),
    ("da2_tail5, final BN on batch stats, warmup, tail rates C", "da2_tail5", 0.1, NEW_TAIL),
)


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in text)


def run_one(args, config, seed, threads):
    name, method, warmup, rates = config
    run_dir = os.path.join(args.workdir, _slug(name), "seed{}".format(seed))
    command = [sys.executable, "-m", "da2ext", "train", "--data", os.path.join(args.data, args.domain),
               "--domain", args.domain, "--workdir", run_dir, "--method", method, "--seed", str(seed),
               "--epochs", str(args.epochs), "--batch-size", "64", "--image-size", "64",
               "--subsample", str(args.subsample), "--warmup", repr(warmup), "--no-progress", "--overwrite"]
    for group, rate in sorted(rates.items()):
        command += ["--lr", "{}={!r}".format(group, rate)]
    record_path = os.path.join(run_dir, "record.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["command"] == command[1:]:
            return record
    if not os.path.isdir(run_dir):
        os.makedirs(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError("{} (seed {}) failed: see {}".format(name, seed, os.path.join(run_dir, "train.log")))
    with open(os.path.join(run_dir, "metrics", "{}-{}.json".format(args.domain, method))) as f:
        metrics = json.load(f)
    record = {"config": name, "method": method, "warmup": warmup, "rates": rates, "seed": seed,
              "val_accuracy": metrics["final_val_accuracy"], "learning_rates": metrics["learning_rates"],
              "command": command[1:]}
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    atomic_write(record_path, lambda f: f.write(text), mode="w")
    return record


def markdown(records, args, argv):
    lines = ["# Training recipe probe", "",
             "{} with {} training images, 64x64, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), Adam; "
             "val accuracy (%) per seed and their mean. Seeds {}: none of the digits table's (1, 2). {}".format(
                 args.domain, args.subsample, args.epochs, ", ".join(str(s) for s in args.seeds),
                 provenance("training_recipe_probe.py", argv)),
             "", "cosine: one cosine decay over the run; warmup: the rates ramp up linearly over the first 10 % of "
             "the steps, then the cosine (da2ext.training.lr_schedule). Tail rates A (the tail methods' before this "
             "probe): adaptors 0.03, the rest 1e-3; B: adaptors 0.1, shifts and head 3e-3, tail 1e-3; C (chosen): "
             "da2's (adaptors 0.1, shifts and head 1e-2) and the tail at 1e-3.", "",
             "| configuration | method | warmup | rates | {} | mean |".format(
                 " | ".join("seed {}".format(s) for s in args.seeds)),
             "| --- | --- | --- | --- | {} | --- |".format(" | ".join("---" for _ in args.seeds))]
    for name, method, warmup, rates in CONFIGS:
        accs = [r["val_accuracy"] for s in args.seeds for r in records if r["config"] == name and r["seed"] == s]
        lines.append("| {} | {} | {:g} | {} | {} | {:.1f} |".format(
            name, method, warmup, ", ".join("{} {:g}".format(g, v) for g, v in sorted(rates.items())) or "method's",
            " | ".join("{:.1f}".format(100 * a) for a in accs), 100 * sum(accs) / len(accs)))
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_probe_arguments(parser)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join("runs", "training_recipe"))
    args = parser.parse_args(argv)
    runs = [(config, seed) for config in CONFIGS for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(runs), desc="probe runs", unit="run")
    except ImportError:
        bar = None

    def one(run):
        record = run_one(args, run[0], run[1], threads)
        if bar is not None:
            bar.update(1)
        return record

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(one, runs))
    if bar is not None:
        bar.close()
    write_results(args.out_dir, "training_recipe", "training_recipe_probe.py", argv, records, markdown(records, args, argv))


if __name__ == "__main__":
    main()
