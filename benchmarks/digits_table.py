"""The baselines benchmark (docs/design.md §3a, §5, §6): every method on the same loop,
backbone and data, one table and one plot of accuracy against training memory.

Each method learns each domain once per seed, in a fresh process
(`python -m da2ext train`), so that its peak resident memory can be read from
outside (os.wait4's rusage); the run's own metrics give the validation accuracy,
saved_bytes (what one training step keeps for backward), the median step time,
the trainable parameter count and the domain file's size. The nano columns add,
in docs/design.md §4's setting (random weights, batch 8, 3x224x224, float32), what
each method keeps for backward on ResNet-50 and its training memory (kept for
backward + gradients + Adam state) on ResNet-50 and EfficientNet-Lite0.

Before the table, each method's learning rates are scaled by the factor of
--sweep-scales that does best on --sweep-domain, on average over --sweep-seeds
(0 and 3, none of the table's seeds), every group of the method scaled alike so
that their ratios stay the method's own (but DA2's adaptors, whose rate is chosen
on its own), the range extended while the best is at an end. --calibrate-shifts
starts the BN shifts of every method that trains them where AdaBN's running means
on the domain put them (train --calibrate-shifts), and only those methods' runs.

    python benchmarks/digits_table.py --subsample 720 --sweep-jobs 2   # the committed table: ~1.5 h on 2 cores
    python benchmarks/digits_table.py --methods da2,bias --seeds 1 --subsample 480
    python benchmarks/digits_table.py --data DIR --backbone resnet50 --weights W.pth --tag mine

--data DIR: a directory of domains, each an ImageFolder pair DIR/<domain>/{train,val}
(default: the digits domains, written into the work directory first). Finished
runs are kept in the work directory, so an interrupted benchmark resumes.
Writes benchmarks/results/<tag>.json (one record per method, domain and seed),
<tag>.md (mean and spread over seeds, the commit and command) and <tag>.png
(accuracy against training memory, log scale, the DA2 family as a line).
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a checkout runs without installing

import torch  # noqa: E402

from da2ext import methods  # noqa: E402
from da2ext.domains.atomic_file import atomic_write  # noqa: E402
from da2ext.training.lr_schedule import WARMUP_FRACTION  # noqa: E402
from provenance import git_commit  # noqa: E402

MIB = float(2 ** 20)
RECORD_KEYS = ("method", "domain", "seed", "val_accuracy", "saved_bytes", "peak_rss_bytes", "step_time",
               "trainable_params", "file_bytes")
# DA2 with a trainable tail: the last block, the last two stages of EfficientNet-Lite0 (5 blocks; also with
# every BN of the tail on batch statistics and with none, ablations of the default's last BN), and the largest
# tail within a training-memory budget (at batch 8, 224 x 224).
TAIL_ROWS = ("da2_tail1", "da2_tail5", "da2_tail5_batch_stats", "da2_tail5_frozen_stats", "da2_budget64")


# ----------------------------------------------------------------------------------------------
# One training run, in its own process


def _run_dir(workdir, method, domain, seed, lr_scale=1.0, stage="runs"):
    scale = "" if lr_scale == 1.0 else "-lr{:g}".format(lr_scale)
    return os.path.join(workdir, stage, "seed{}".format(seed), method + scale, domain)


# Groups whose rate the sweep leaves as the method sets it: DA2's adaptors, whose rate is chosen on its
# own (benchmarks/adaptor_design_probe.py, docs/design.md §3a); scaling them with the shifts would make
# the shifts lose to a rate chosen for the adaptors (at 3x the adaptors' 0.3 throws runs off).
FIXED_IN_SWEEP = ("adaptors",)


def _fixed_rates(method):
    rates = methods.get(method).learning_rates
    return dict((g, rates[g]) for g in FIXED_IN_SWEEP if g in rates)


_CALIBRATES = {}


def calibrates(args, method, asked=True):
    """Whether --calibrate-shifts moves anything in `method`'s model (it trains frozen BNs' shifts): built
    once on a random-weight backbone of the table's architecture. asked: and whether the table asks for it."""
    if asked and not args.calibrate_shifts:
        return False
    if method not in _CALIBRATES:
        from da2ext.lean.shift_calibration import calibrated_layers
        from da2ext.models import backbones
        model = methods.get(method).build(backbones.create(args.backbone, pretrained=False), 10)
        _CALIBRATES[method] = bool(calibrated_layers(model.train()))
    return _CALIBRATES[method]


def _train_command(args, method, domain, seed, lr_scale, run_dir):
    command = [sys.executable, "-m", "da2ext", "train", "--data", os.path.join(args.data, domain),
               "--domain", domain, "--workdir", run_dir, "--method", method, "--backbone", args.backbone,
               "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--lr-scale", repr(float(lr_scale)), "--no-progress",
               "--overwrite"]  # a run rerun for other settings replaces its earlier domain file
    if args.subsample:
        command += ["--subsample", str(args.subsample)]
    if args.weights:
        command += ["--weights", args.weights]
    if args.no_pretrained:
        command += ["--no-pretrained"]
    if calibrates(args, method, asked=False):
        # Said either way: the command's default may change, a cached run must not.
        command += ["--calibrate-shifts" if args.calibrate_shifts else "--no-calibrate-shifts"]
    for group, rate in sorted(_fixed_rates(method).items() if float(lr_scale) != 1.0 else ()):
        # rate / lr_scale: the CLI's --lr-scale multiplies it back to the method's rate
        command += ["--lr", "{}={!r}".format(group, rate / float(lr_scale))]
    return command


# Runs a command and writes its peak resident set (KiB) to a file. A child's
# ru_maxrss starts from the high-water mark of the process it was forked from,
# so the training process is forked from this small launcher, not from the
# benchmark (which holds torch and the nano column's models).
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"""


def run_training(args, method, domain, seed, lr_scale=1.0, stage="runs", threads=None):
    """Train one domain in a child process; its record (RECORD_KEYS and more).
    A finished run with the same settings is read back instead of rerun."""
    run_dir = _run_dir(args.workdir, method, domain, seed, lr_scale, stage)
    record_path = os.path.join(run_dir, "record.json")
    settings = {"backbone": args.backbone, "weights": args.weights, "pretrained": not args.no_pretrained,
                "epochs": args.epochs, "batch_size": args.batch_size, "image_size": args.image_size,
                "subsample": args.subsample, "data": os.path.abspath(args.data), "lr_scale": float(lr_scale),
                "method_learning_rates": methods.get(method).learning_rates, "warmup_fraction": WARMUP_FRACTION}
    if calibrates(args, method):  # only then: the other runs stay those of a table without it
        settings["calibrate_shifts"] = True
    if _fixed_rates(method) and float(lr_scale) != 1.0:  # the same: at scale 1 nothing differs
        settings["fixed_rates"] = _fixed_rates(method)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("settings") == settings:
            return record
    if not os.path.isdir(run_dir):
        os.makedirs(run_dir)
    log_path = os.path.join(run_dir, "train.log")
    rss_path = os.path.join(run_dir, "peak_rss_kib")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-c", _LAUNCHER, rss_path] + _train_command(args, method, domain, seed, lr_scale,
                                                                           run_dir)
    with open(log_path, "w") as log:
        returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError("{} on {} (seed {}) failed with exit status {}:\n{}".format(
            method, domain, seed, returncode, tail))
    with open(rss_path) as f:
        peak_rss_kib = int(f.read())  # Linux reports ru_maxrss in KiB
    with open(os.path.join(run_dir, "metrics", "{}-{}.json".format(domain, method))) as f:
        metrics = json.load(f)
    record = {"method": method, "domain": domain, "seed": seed,
              "val_accuracy": metrics["final_val_accuracy"], "saved_bytes": metrics["saved_bytes"],
              "peak_rss_bytes": peak_rss_kib * 1024, "step_time": metrics["step_time"],
              "trainable_params": metrics["trainable_params"], "file_bytes": metrics["file_bytes"],
              "total_time": metrics["total_time"], "learning_rates": metrics["learning_rates"],
              "lr_scale": float(lr_scale), "settings": settings}
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    atomic_write(record_path, lambda f: f.write(text), mode="w")
    return record


def _run_all(args, jobs, bar, stage, runs, threads=None):
    """run_training over runs = [(method, domain, seed, lr_scale)], `jobs` at a time; records in order."""
    def one(run):
        record = run_training(args, *run, stage=stage, threads=threads)
        if bar is not None:
            bar.set_postfix(method=run[0], domain=run[1], acc="{:.3f}".format(record["val_accuracy"]))
            bar.update(1)
        return record
    if jobs <= 1:
        return [one(run) for run in runs]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, runs))


def _next_scale(scale, up):
    """The neighbour of `scale` on the 1-3-10 grid (..., 0.3, 1, 3, 10, 30, ...)."""
    leading = "{:.0e}".format(scale)[0]  # "1" or "3"
    if up:
        return float("{:.6g}".format(scale * (3.0 if leading == "1" else 10.0 / 3.0)))
    return float("{:.6g}".format(scale / (3.0 if leading == "3" else 10.0 / 3.0)))


def sweep_learning_rates(args, bar=None):
    """Each method's lr scale: the one that gives the best val accuracy on
    args.sweep_domain, averaged over args.sweep_seeds (none of the benchmark's
    seeds), among args.sweep_scales and, where the best is at an end of the
    range, up to args.sweep_extend further steps beyond it on the 1-3-10 grid (no
    method is left at the edge of its sweep when a step further might do better).
    More than one seed because one run's accuracy moves by a point or two from seed
    to seed: on one seed, two scales a point apart are a coin toss.
    Returns ({method: scale}, the sweep's records, {method: sorted scales tried})."""
    threads = max(1, (os.cpu_count() or 1) // args.sweep_jobs) if args.sweep_jobs > 1 else None
    tried = dict((m, sorted(args.sweep_scales)) for m in args.methods)

    def runs_at(method, scale):
        return [(method, args.sweep_domain, seed, scale) for seed in args.sweep_seeds]

    runs = [run for m in args.methods for scale in args.sweep_scales for run in runs_at(m, scale)]
    records = _run_all(args, args.sweep_jobs, bar, "sweep", runs, threads)
    chosen = {}
    for step in range(args.sweep_extend + 1):
        extra = []
        for method in args.methods:
            by_scale = {}
            for r in records:
                if r["method"] == method:
                    by_scale.setdefault(r["lr_scale"], []).append(r["val_accuracy"])
            # Best mean accuracy over the seeds; on a tie the scale nearest the method's own rates (1).
            best = max(by_scale, key=lambda scale: (_mean(by_scale[scale]), -abs(math.log(scale))))
            chosen[method] = best
            scales = tried[method]
            if step < args.sweep_extend and len(scales) > 1 and best in (scales[0], scales[-1]):
                scale = _next_scale(best, up=best == scales[-1])
                extra += runs_at(method, scale)
                tried[method] = sorted(scales + [scale])
        if not extra:
            break
        if bar is not None:
            bar.total += len(extra)
        records += _run_all(args, args.sweep_jobs, bar, "sweep", extra, threads)
    return chosen, records, tried


# ----------------------------------------------------------------------------------------------
# The nano memory column


NANO_BACKBONES = ("resnet50", "efficientnet_lite0")


def _nano_backbone(name):
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50()
    import timm
    return timm.create_model("tf_efficientnet_lite0")


def nano_bytes(method_names, batch_size=8, image_size=224):
    """{method: {"saved_bytes": kept for backward on ResNet-50, and per backbone of
    NANO_BACKBONES "<backbone>_training_bytes": kept for backward + gradients + Adam
    state}}, docs/design.md §4's nano setting (random weights, batch 8, 3x224x224,
    float32, a 100-class head), each measured by one da2ext.profile_step."""
    import torch.nn.functional as F
    from da2ext.profiling import profile_step
    result = {}
    inputs = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(batch_size) % 100
    for name in method_names:
        row = {}
        for backbone in NANO_BACKBONES:
            torch.manual_seed(0)
            try:
                model = methods.get(name).build(_nano_backbone(backbone), 100).train()
            except ImportError as error:  # an optional dependency (peft, timm) is missing
                sys.stderr.write("nano column: {} on {} skipped: {}\n".format(name, backbone, error))
                continue
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.0)
            profile = profile_step(model, inputs, targets, F.cross_entropy, optimizer, warmup=0, steps=0)
            if backbone == "resnet50":
                row["saved_bytes"] = profile["saved_bytes"]
            row[backbone + "_training_bytes"] = (profile["saved_bytes"] + profile["grad_bytes"] +
                                                 profile["optimizer_bytes"])
            del model, optimizer
        result[name] = row
    return result


def nano_column(args):
    """nano_bytes for args.methods, computed in a child process (the models it builds
    would otherwise stay in this process's memory) and cached in the work directory
    for the commit of the package they were measured with (a method's name does not
    say what it builds: a cache of another commit, or of uncommitted code, is not reused)."""
    path = os.path.join(args.workdir, "nano_bytes.json")
    commit = git_commit()
    cached = {}
    if os.path.isfile(path) and "+changes" not in commit:
        with open(path) as f:
            stored = json.load(f)
        if stored.get("commit") == commit:
            cached = stored.get("bytes", {})
    missing = [m for m in args.methods if m not in cached]
    if missing:
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import digits_table; "
                "print(json.dumps(digits_table.nano_bytes(sys.argv[2].split(','))))")
        output = subprocess.check_output([sys.executable, "-c", code, HERE, ",".join(missing)])
        cached.update(json.loads(output.decode("utf-8").strip().splitlines()[-1]))
        if not os.path.isdir(args.workdir):
            os.makedirs(args.workdir)
        text = json.dumps({"commit": commit, "bytes": cached}, indent=1, sort_keys=True) + "\n"
        atomic_write(path, lambda f: f.write(text), mode="w")
    return cached


# ----------------------------------------------------------------------------------------------
# Table and plot


def _mean(values):
    return math.fsum(values) / len(values)


def summarise(records, method_names, domains):
    """{method: {"accuracy": {domain: (mean, spread)}, "mean_accuracy", "saved_bytes", ...}}: means over
    the seeds; spread is half the range over seeds (0 with one seed)."""
    summary = {}
    for method in method_names:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        accuracy = {}
        for domain in domains:
            values = [100.0 * r["val_accuracy"] for r in rows if r["domain"] == domain]
            if values:
                accuracy[domain] = (_mean(values), 0.5 * (max(values) - min(values)))
        per_seed = {}
        for r in rows:
            per_seed.setdefault(r["seed"], []).append(100.0 * r["val_accuracy"])
        seed_means = [_mean(v) for v in per_seed.values()]
        summary[method] = {
            "accuracy": accuracy,
            "mean_accuracy": _mean(seed_means),
            "mean_accuracy_spread": 0.5 * (max(seed_means) - min(seed_means)),
            "saved_bytes": max(r["saved_bytes"] for r in rows),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
            "step_time": _mean([r["step_time"] for r in rows]),
            "trainable_params": max(r["trainable_params"] for r in rows),
            "file_bytes": max(r["file_bytes"] for r in rows),
            "nano_saved_bytes": rows[0].get("nano_saved_bytes"),
            "nano_training_bytes": dict((b, rows[0].get("nano_{}_training_bytes".format(b))) for b in NANO_BACKBONES),
            "lr_scale": rows[0].get("lr_scale", 1.0),
            "seeds": sorted(per_seed),
        }
    return summary


def _family(method):
    """da2 and its tail/budget variants: the DA2 family the plot joins with a line (ablations left out)."""
    return method == "da2" or (method.startswith("da2_tail") and not method.endswith("_frozen_stats")) or \
        method.startswith("da2_budget")


def check_targets(summary, sweep_domain="mnist_m", table_backbone="efficientnet_lite0"):
    """The accuracy issue's targets (da2 against bias_lean; the DA2 family against
    parallel_adapter and ft at a fraction of their nano training bytes), as lines of text.

    Accuracy is measured on the table's backbone alone. A da2_budget<MiB> row picks its
    tail per backbone (on ResNet-50 a 64 MiB budget fits none, so there it is da2 itself),
    so its accuracy says nothing of the configuration it is on another backbone: it
    counts on table_backbone only."""
    lines = []
    da2, bias, pa, ft = (summary.get(m) for m in ("da2", "bias_lean", "parallel_adapter", "ft"))

    def verdict(ok):
        return "met" if ok else "MISSED"

    if da2 is not None and bias is not None:
        gap = da2["mean_accuracy"] - bias["mean_accuracy"]
        lines.append("da2 mean {:.2f} vs bias_lean {:.2f}: {:+.2f} points (target >= +2.5): {}".format(
            da2["mean_accuracy"], bias["mean_accuracy"], gap, verdict(gap >= 2.5)))
        if sweep_domain in da2["accuracy"] and sweep_domain in bias["accuracy"]:
            gap = da2["accuracy"][sweep_domain][0] - bias["accuracy"][sweep_domain][0]
            lines.append("da2 on {} {:+.2f} points over bias_lean (target >= +6): {}".format(
                sweep_domain, gap, verdict(gap >= 6.0)))
    if da2 is not None and da2.get("nano_saved_bytes"):
        kept = da2["nano_saved_bytes"] / MIB
        lines.append("da2 nano kept {:.1f} MiB on ResNet-50 (target <= 16): {}".format(kept, verdict(kept <= 16.0)))
    family = [m for m in summary if _family(m) and m != "da2"]

    def training(method, backbone):
        return (summary[method].get("nano_training_bytes") or {}).get(backbone)

    for reference, fraction, margin, label in ((pa and "parallel_adapter", 5, 0.0, "parallel_adapter's mean"),
                                               (ft and "ft", 8, 2.0, "within 2 points of ft (moonshot)")):
        if reference is None or not family:
            continue
        for backbone in NANO_BACKBONES:
            limit = training(reference, backbone)
            if limit is None:
                continue
            fits = [m for m in family if training(m, backbone) is not None and
                    training(m, backbone) <= limit / float(fraction) and
                    (backbone == table_backbone or not m.startswith("da2_budget"))]
            best = max(fits, key=lambda m: summary[m]["mean_accuracy"]) if fits else None
            target = summary[reference]["mean_accuracy"] - margin
            if best is None:
                lines.append("{}: no DA2 configuration within 1/{} of {}'s nano training bytes on {}: MISSED".format(
                    label, fraction, reference, backbone))
                continue
            lines.append("{}: best DA2 configuration within 1/{} of {}'s nano training bytes on {} ({:.0f} of "
                         "{:.0f} MiB) is {} at {:.2f} against {:.2f}: {}".format(
                             label, fraction, reference, backbone, training(best, backbone) / MIB, limit / MIB, best,
                             summary[best]["mean_accuracy"], target, verdict(summary[best]["mean_accuracy"] >= target)))
    return lines


def _fmt_bytes(value, unit=MIB, digits=1):
    return "-" if value is None else "{:.{}f}".format(value / unit, digits)


def markdown(summary, domains, meta):
    lines = ["Accuracy (%, mean ± half-range over seeds {}), what one step keeps for backward, peak resident "
             "memory of the training process, median step time, trainable parameters and domain file size. "
             "{}".format(", ".join(str(s) for s in meta["seeds"]), meta["setting"]), ""]
    header = ["method", "lr scale"] + domains + ["mean", "kept (MiB)", "nano kept (MiB)"] + [
        "nano training {} (MiB)".format(b) for b in NANO_BACKBONES] + [
        "peak RSS (MiB)", "step (s)", "trainable", "file (KiB)"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, s in summary.items():
        scales = (meta.get("sweep_tried") or {}).get(method) or meta.get("sweep_scales")
        edge = bool(scales) and len(scales) > 1 and s["lr_scale"] in (min(scales), max(scales))
        cells = [method, "{:g}{}".format(s["lr_scale"], " (edge)" if edge else "")]
        for domain in domains:
            mean, spread = s["accuracy"].get(domain, (float("nan"), 0.0))
            cells.append("{:.1f} ± {:.1f}".format(mean, spread))
        cells += ["{:.1f} ± {:.1f}".format(s["mean_accuracy"], s["mean_accuracy_spread"]),
                  _fmt_bytes(s["saved_bytes"]), _fmt_bytes(s["nano_saved_bytes"])] + [
                  _fmt_bytes((s.get("nano_training_bytes") or {}).get(b)) for b in NANO_BACKBONES] + [
                  _fmt_bytes(s["peak_rss_bytes"], digits=0),
                  "{:.3f}".format(s["step_time"]), "{:,}".format(s["trainable_params"]),
                  _fmt_bytes(s["file_bytes"], 1024.0)]
        lines.append("| " + " | ".join(cells) + " |")
    targets = check_targets(summary, meta.get("sweep_domain", "mnist_m"), meta.get("backbone", "efficientnet_lite0"))
    if targets:
        lines += [""] + ["- " + line for line in targets]
    if meta.get("sweep_seconds"):
        jobs = meta.get("sweep_jobs", 1)
        sweep = "{:.0f} min for the sweep{}".format(meta["sweep_seconds"] / 60.0, "" if jobs == 1 else (
            " ({} runs at a time share the CPU there, so its sum exceeds its wall time)".format(jobs)))
    else:
        sweep = "no learning-rate sweep"
    lines += ["", "Commit {}; command `{}`.".format(meta.get("commit"), meta.get("command"))]
    lines += ["", "Measured on {} with torch {}, {}. Training and evaluation, summed over the runs (each run's "
              "process start, a few seconds, not counted): {:.0f} min for the table, {}; this invocation {:.0f} "
              "min (finished runs are reused).".format(meta["machine"], meta["torch"], meta["date"],
                                                      meta["run_seconds"] / 60.0, sweep, meta["seconds"] / 60.0)]
    return "\n".join(lines) + "\n"


def plot(summary, path, title):
    """Mean accuracy against training memory on the table's backbone in the nano
    setting (kept for backward + gradients + Adam state; log scale), one point per
    method, the DA2 family (da2 and its tails) joined by a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None

    def memory(method):
        training = summary[method].get("nano_training_bytes") or {}
        value = training.get("efficientnet_lite0") or training.get("resnet50")
        return (value if value is not None else summary[method]["saved_bytes"]) / MIB

    figure, axes = plt.subplots(figsize=(8, 5.5))
    family = sorted((m for m in summary if _family(m)), key=memory)
    if len(family) > 1:
        axes.plot([memory(m) for m in family], [summary[m]["mean_accuracy"] for m in family], "-",
                  color="tab:red", alpha=0.6, label="DA2 family (da2, trainable tails)")
    by_memory = sorted(summary, key=lambda m: (memory(m), summary[m]["mean_accuracy"]))
    for i, method in enumerate(by_memory):
        s = summary[method]
        x = memory(method)
        highlight = method.startswith("da2")
        axes.errorbar([x], [s["mean_accuracy"]], yerr=[s["mean_accuracy_spread"]], fmt="o" if highlight else "s",
                      color="tab:red" if highlight else "tab:blue", capsize=3)
        axes.annotate(method, (x, s["mean_accuracy"]), textcoords="offset points", fontsize=7,
                      xytext=(-6, 3) if i % 2 else (6, -9), ha="right" if i % 2 else "left")
    axes.set_xscale("log")
    axes.set_xlabel("training memory of one step, nano setting on the table's backbone: kept for backward + "
                    "gradients + Adam state (MiB, log)", fontsize=8)
    axes.set_ylabel("mean validation accuracy over domains (%)")
    axes.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=7)
    axes.grid(True, which="both", alpha=0.3)
    if len(family) > 1:
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------


def _progress(total, enabled):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, unit="run")
        except ImportError:
            pass
    return None


def _list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(list(methods.METHODS) + list(TAIL_ROWS)),
                        help="comma-separated (default: every method and the tail rows {})".format(", ".join(TAIL_ROWS)))
    parser.add_argument("--domains", help="comma-separated (default: mnist,digits,mnist_m, or every domain "
                                          "directory in --data)")
    parser.add_argument("--seeds", default="1,2", help="training seeds (default: 1,2)")
    parser.add_argument("--data", help="directory of domains DIR/<domain>/{train,val} (default: the digits "
                                       "domains, written into the work directory)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", help="the backbone's state_dict file")
    parser.add_argument("--no-pretrained", action="store_true", help="random backbone weights")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--subsample", type=int, default=None, help="training images per domain (default: all)")
    parser.add_argument("--workdir", default=os.path.join("runs", "digits_table"))
    parser.add_argument("--no-nano", action="store_true", help="skip the ResNet-50 nano memory column")
    parser.add_argument("--sweep-scales", default="0.3,1,3",
                        help="learning-rate scales tried per method on --sweep-domain before the benchmark, each "
                             "multiplying the method's group rates (their ratios kept; DA2's adaptor rate stays "
                             "its own); 1 alone: no sweep (default: 0.3,1,3, extended where the best is at an end: "
                             "--sweep-extend)")
    parser.add_argument("--sweep-extend", type=int, default=2,
                        help="steps the sweep goes on beyond an end of --sweep-scales while the best is there "
                             "(default: 2)")
    parser.add_argument("--sweep-seeds", default="0,3",
                        help="seeds of the sweep's runs, none of --seeds; a scale's score is its mean val accuracy "
                             "over them (default: 0,3)")
    parser.add_argument("--sweep-domain", help="the sweep's domain (default: mnist_m if present, else the first)")
    parser.add_argument("--sweep-jobs", type=int, default=1,
                        help="sweep runs at once, the CPU threads shared among them (default: 1)")
    parser.add_argument("--tag", default="digits", help="results file names: <tag>.json/.md/.png")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--calibrate-shifts", action="store_true",
                        help="start the BN shifts of every method that trains them from AdaBN's running means on "
                             "the domain (train --calibrate-shifts)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.methods = _list(args.methods)
    for name in args.methods:
        methods.get(name)  # an unknown name fails here, not an hour later
    if args.domains is not None:
        args.domains = _list(args.domains)
    elif args.data is not None:
        args.domains = sorted(d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d, "train")))
        if not args.domains:
            parser.error("--data {}: no domain directories (<domain>/train, <domain>/val)".format(args.data))
    else:
        args.domains = ["mnist", "digits", "mnist_m"]
    args.seeds = [int(s) for s in _list(args.seeds)]
    args.sweep_scales = [float(s) for s in _list(args.sweep_scales)]
    args.sweep_seeds = [int(s) for s in _list(args.sweep_seeds)]
    if not args.sweep_seeds:
        parser.error("--sweep-seeds: at least one seed")
    if set(args.sweep_seeds) & set(args.seeds):
        parser.error("--sweep-seeds {} and --seeds {} share a seed: the table's rates would be chosen on the runs it "
                     "reports".format(",".join(map(str, args.sweep_seeds)), ",".join(map(str, args.seeds))))
    if not args.sweep_scales or min(args.sweep_scales) <= 0:
        parser.error("--sweep-scales must be positive numbers")
    if args.sweep_domain is None:
        args.sweep_domain = "mnist_m" if "mnist_m" in args.domains else args.domains[0]
    if args.sweep_jobs < 1:
        parser.error("--sweep-jobs must be positive")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            parser.error("--{} must be positive".format(name.replace("_", "-")))
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    if args.data is None:
        from da2ext.data.digits import prepare_digits
        args.data = os.path.join(args.workdir, "data")
        prepare_digits(args.data, seed=0, image_size=args.image_size, domains=args.domains,
                       progress=not args.no_progress)
    nano = {} if args.no_nano else nano_column(args)
    scales, sweep, tried = dict((m, 1.0) for m in args.methods), [], {}
    if args.sweep_scales != [1.0]:
        bar = _progress(len(args.methods) * len(args.sweep_scales) * len(args.sweep_seeds), not args.no_progress)
        scales, sweep, tried = sweep_learning_rates(args, bar)
        if bar is not None:
            bar.close()
    # Seeds outermost: a short run still covers every method. One run at a time, so step times compare.
    runs = [(m, d, seed, scales[m]) for seed in args.seeds for m in args.methods for d in args.domains]
    bar = _progress(len(runs), not args.no_progress)
    records = _run_all(args, 1, bar, "runs", runs)
    if bar is not None:
        bar.close()
    for record in records:
        row = nano.get(record["method"], {})
        record["nano_saved_bytes"] = row.get("saved_bytes")
        for backbone in NANO_BACKBONES:
            record["nano_{}_training_bytes".format(backbone)] = row.get(backbone + "_training_bytes")

    summary = summarise(records, args.methods, args.domains)
    setting = ("Backbone {} ({}), {}x{} inputs, batch {}, {} epochs, {} training images per domain, Adam with "
               "each method's learning rates, warmed up over the first tenth of the steps, then one cosine decay.{}".format(
                   args.backbone, "weights " + args.weights if args.weights else
                   ("random weights" if args.no_pretrained else "ImageNet weights"), args.image_size,
                   args.image_size, args.batch_size, args.epochs, args.subsample or "all",
                   " Shift calibration (--calibrate-shifts): the BN shifts of {} start where AdaBN's running means on "
                   "each domain's training images put them.".format(", ".join(
                       m for m in args.methods if calibrates(args, m)) or "no method") if args.calibrate_shifts
                   else ""))
    if sweep:
        setting += (" lr scale: the factor on the method's learning rates that gave the best val accuracy among "
                    "{} on {} (mean over seed(s) {}), extended by up to {} step(s) of the 1-3-10 grid beyond an end "
                    "while the best was there (edge: the best is still at an end of what was tried); DA2's adaptor "
                    "rate is not scaled, it is chosen on its own (same epochs and images; {}_sweep.json).".format(
                        ", ".join("{:g}".format(x) for x in args.sweep_scales), args.sweep_domain,
                        ", ".join(str(x) for x in args.sweep_seeds), args.sweep_extend,
                        args.tag))
    meta = {"seeds": args.seeds, "setting": setting, "machine": "{} ({} CPUs)".format(platform.machine(),
                                                                                     os.cpu_count()),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "seconds": int(time.time() - start),
            "run_seconds": int(math.fsum(r["total_time"] for r in records)),
            "sweep_seconds": int(math.fsum(r["total_time"] for r in sweep)), "sweep_jobs": args.sweep_jobs,
            "sweep_scales": args.sweep_scales if sweep else None, "sweep_domain": args.sweep_domain,
            "sweep_tried": tried, "backbone": args.backbone,
            "commit": git_commit(("da2ext", "csrc", "benchmarks/digits_table.py")), "command": "python benchmarks/digits_table.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    if not os.path.isdir(args.out_dir):
        os.makedirs(args.out_dir)
    stem = os.path.join(args.out_dir, args.tag)
    text = json.dumps(records, indent=1, sort_keys=True) + "\n"
    atomic_write(stem + ".json", lambda f: f.write(text), mode="w")
    if sweep:
        text = json.dumps(sweep, indent=1, sort_keys=True) + "\n"
        atomic_write(stem + "_sweep.json", lambda f: f.write(text), mode="w")
    table = markdown(summary, args.domains, meta)
    atomic_write(stem + ".md", lambda f: f.write(table), mode="w")
    plot(summary, stem + ".png", "{} on {}: {}x{}, batch {}, {} epochs, {} training images per domain, seeds {}; "
         "accuracy: mean over domains, bar: half-range over seeds".format(
             ", ".join(args.domains), args.backbone, args.image_size, args.image_size, args.batch_size, args.epochs,
             args.subsample or "all", ", ".join(str(x) for x in args.seeds)))
    print(table)
    print("wrote {0}.json, {0}.md, {0}.png".format(stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
