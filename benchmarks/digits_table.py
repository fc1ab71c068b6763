"""The baselines benchmark (DESIGN.md §3a, §5, §6): every method on the same loop,
backbone and data, one table and one plot of accuracy against memory.

Each method learns each domain once per seed, in a fresh process
(`python -m da2ext train`), so that its peak resident memory can be read from
outside (os.wait4's rusage); the run's own metrics give the validation accuracy,
saved_bytes (what one training step keeps for backward), the median step time,
the trainable parameter count and the domain file's size. A nano column adds
what each method keeps for backward in DESIGN.md §4's setting (ResNet-50, random
weights, batch 8, 3x224x224, float32).

    python benchmarks/digits_table.py --subsample 720 --sweep-jobs 2   # the committed table: ~1.5 h on 2 cores
    python benchmarks/digits_table.py --methods da2,bias --seeds 1 --subsample 480
    python benchmarks/digits_table.py --data DIR --backbone resnet50 --weights W.pth --tag mine

--data DIR: a directory of domains, each an ImageFolder pair DIR/<domain>/{train,val}
(default: the digits domains, written into the work directory first). Finished
runs are kept in the work directory, so an interrupted benchmark resumes.
Writes benchmarks/results/<tag>.json (one record per method, domain and seed),
<tag>.md (mean and spread over seeds) and <tag>.png (accuracy against memory
kept for backward, log scale).
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
from da2ext.atomic_file import atomic_write  # noqa: E402

MIB = float(2 ** 20)
RECORD_KEYS = ("method", "domain", "seed", "val_accuracy", "saved_bytes", "peak_rss_bytes", "step_time",
               "trainable_params", "file_bytes")
# The targets of the baselines issue: da2 against ft and bias.
FT_MARGIN, BIAS_MARGIN, MEMORY_RATIO = 2.0, 0.5, 20.0


# ----------------------------------------------------------------------------------------------
# One training run, in its own process


def _run_dir(workdir, method, domain, seed, lr_scale=1.0, stage="runs"):
    scale = "" if lr_scale == 1.0 else "-lr{:g}".format(lr_scale)
    return os.path.join(workdir, stage, "seed{}".format(seed), method + scale, domain)


def _train_command(args, method, domain, seed, lr_scale, run_dir):
    command = [sys.executable, "-m", "da2ext", "train", "--data", os.path.join(args.data, domain),
               "--domain", domain, "--workdir", run_dir, "--method", method, "--backbone", args.backbone,
               "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--lr-scale", repr(float(lr_scale)), "--no-progress"]
    if args.subsample:
        command += ["--subsample", str(args.subsample)]
    if args.weights:
        command += ["--weights", args.weights]
    if args.no_pretrained:
        command += ["--no-pretrained"]
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
                "method_learning_rates": methods.get(method).learning_rates}
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


def sweep_learning_rates(args, bar=None):
    """Each method's lr scale: the one of args.sweep_scales that gives the best val
    accuracy on args.sweep_domain with seed 0 (not one of the benchmark's seeds).
    Returns ({method: scale}, the sweep's records)."""
    runs = [(m, args.sweep_domain, 0, scale) for m in args.methods for scale in args.sweep_scales]
    threads = max(1, (os.cpu_count() or 1) // args.sweep_jobs) if args.sweep_jobs > 1 else None
    records = _run_all(args, args.sweep_jobs, bar, "sweep", runs, threads)
    chosen = {}
    for method in args.methods:
        rows = [r for r in records if r["method"] == method]
        # Best accuracy; on a tie the scale nearest the method's own rates (1).
        best = max(rows, key=lambda r: (r["val_accuracy"], -abs(math.log(r["lr_scale"]))))
        chosen[method] = best["lr_scale"]
    return chosen, records


# ----------------------------------------------------------------------------------------------
# The nano memory column


def nano_saved_bytes(method_names, batch_size=8, image_size=224):
    """{method: bytes kept for backward} on ResNet-50 (random weights), DESIGN.md §4."""
    import torchvision
    from da2ext.memory import SavedTensorCounter, model_state
    result = {}
    inputs = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    for name in method_names:
        torch.manual_seed(0)
        try:
            model = methods.get(name).build(torchvision.models.resnet50(), 100).train()
        except ImportError as error:  # an optional dependency (peft) is missing
            sys.stderr.write("nano column: {} skipped: {}\n".format(name, error))
            continue
        with SavedTensorCounter(exclude=model_state(model)) as counter:
            loss = model(inputs).logsumexp(1).sum()
        result[name] = counter.saved_bytes
        del loss, model
    return result


def nano_column(args):
    """nano_saved_bytes for args.methods, computed in a child process (the models it
    builds would otherwise stay in this process's memory) and cached in the work directory."""
    path = os.path.join(args.workdir, "nano_saved_bytes.json")
    cached = {}
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
    missing = [m for m in args.methods if m not in cached]
    if missing:
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import digits_table; "
                "print(json.dumps(digits_table.nano_saved_bytes(sys.argv[2].split(','))))")
        output = subprocess.check_output([sys.executable, "-c", code, HERE, ",".join(missing)])
        cached.update(json.loads(output.decode("utf-8").strip().splitlines()[-1]))
        if not os.path.isdir(args.workdir):
            os.makedirs(args.workdir)
        text = json.dumps(cached, indent=1, sort_keys=True) + "\n"
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
            "lr_scale": rows[0].get("lr_scale", 1.0),
            "seeds": sorted(per_seed),
        }
    return summary


def check_targets(summary):
    """The issue's three targets for da2 against ft and bias, as lines of text."""
    lines = []
    da2, ft, bias = summary.get("da2"), summary.get("ft"), summary.get("bias")
    if da2 is None:
        return lines
    if ft is not None:
        gap = da2["mean_accuracy"] - ft["mean_accuracy"]
        lines.append("da2 mean accuracy {:.2f} vs ft {:.2f}: {:+.2f} points (target >= -{:.1f}): {}".format(
            da2["mean_accuracy"], ft["mean_accuracy"], gap, FT_MARGIN, "met" if gap >= -FT_MARGIN else "MISSED"))
        ratio = ft["saved_bytes"] / float(da2["saved_bytes"])
        lines.append("da2 keeps {:.1f}x less for backward than ft (target >= {:.0f}x): {}".format(
            ratio, MEMORY_RATIO, "met" if ratio >= MEMORY_RATIO else "MISSED"))
    if bias is not None:
        gap = da2["mean_accuracy"] - bias["mean_accuracy"]
        lines.append("da2 mean accuracy {:.2f} vs bias {:.2f}: {:+.2f} points (target >= -{:.1f}): {}".format(
            da2["mean_accuracy"], bias["mean_accuracy"], gap, BIAS_MARGIN, "met" if gap >= -BIAS_MARGIN else
            "MISSED"))
    return lines


def _fmt_bytes(value, unit=MIB, digits=1):
    return "-" if value is None else "{:.{}f}".format(value / unit, digits)


def markdown(summary, domains, meta):
    lines = ["Accuracy (%, mean ± half-range over seeds {}), what one step keeps for backward, peak resident "
             "memory of the training process, median step time, trainable parameters and domain file size. "
             "{}".format(", ".join(str(s) for s in meta["seeds"]), meta["setting"]), ""]
    header = ["method", "lr scale"] + domains + ["mean", "kept (MiB)", "nano kept (MiB)", "peak RSS (MiB)", "step (s)",
                                     "trainable", "file (KiB)"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method, s in summary.items():
        cells = [method, "{:g}".format(s["lr_scale"])]
        for domain in domains:
            mean, spread = s["accuracy"].get(domain, (float("nan"), 0.0))
            cells.append("{:.1f} ± {:.1f}".format(mean, spread))
        cells += ["{:.1f} ± {:.1f}".format(s["mean_accuracy"], s["mean_accuracy_spread"]),
                  _fmt_bytes(s["saved_bytes"]), _fmt_bytes(s["nano_saved_bytes"]), _fmt_bytes(s["peak_rss_bytes"], digits=0),
                  "{:.3f}".format(s["step_time"]), "{:,}".format(s["trainable_params"]),
                  _fmt_bytes(s["file_bytes"], 1024.0)]
        lines.append("| " + " | ".join(cells) + " |")
    targets = check_targets(summary)
    if targets:
        lines += [""] + ["- " + line for line in targets]
    if meta.get("sweep_seconds"):
        jobs = meta.get("sweep_jobs", 1)
        sweep = "{:.0f} min for the sweep{}".format(meta["sweep_seconds"] / 60.0, "" if jobs == 1 else (
            " ({} runs at a time share the CPU there, so its sum exceeds its wall time)".format(jobs)))
    else:
        sweep = "no learning-rate sweep"
    lines += ["", "Measured on {} with torch {}, {}. Training and evaluation, summed over the runs (each run's "
              "process start, a few seconds, not counted): {:.0f} min for the table, {}; this invocation {:.0f} "
              "min (finished runs are reused).".format(meta["machine"], meta["torch"], meta["date"],
                                                      meta["run_seconds"] / 60.0, sweep, meta["seconds"] / 60.0)]
    return "\n".join(lines) + "\n"


def plot(summary, path, title):
    """Mean accuracy against bytes kept for backward (log scale), one point per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    figure, axes = plt.subplots(figsize=(8, 5.5))
    # Labels of points that sit close together (the plain-PyTorch methods all keep ~400 MiB)
    # go alternately left and right of their point.
    by_memory = sorted(summary, key=lambda m: (summary[m]["saved_bytes"], summary[m]["mean_accuracy"]))
    for i, method in enumerate(by_memory):
        s = summary[method]
        x = s["saved_bytes"] / MIB
        highlight = method.startswith("da2")
        axes.errorbar([x], [s["mean_accuracy"]], yerr=[s["mean_accuracy_spread"]], fmt="o" if highlight else "s",
                      color="tab:red" if highlight else "tab:blue", capsize=3)
        crowded = s["saved_bytes"] > 100 * MIB and i % 2
        axes.annotate(method, (x, s["mean_accuracy"]), textcoords="offset points", fontsize=8,
                      xytext=(-6, 3) if crowded else (6, 3), ha="right" if crowded else "left")
    axes.set_xscale("log")
    axes.set_xlabel("kept for backward per training step (MiB, log scale)")
    axes.set_ylabel("mean validation accuracy over domains (%)")
    axes.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=7)
    axes.grid(True, which="both", alpha=0.3)
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
    parser.add_argument("--methods", default=",".join(methods.METHODS), help="comma-separated (default: all)")
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
    parser.add_argument("--sweep-scales", default="0.1,0.3,1,3,10",
                        help="learning-rate scales tried per method on --sweep-domain before the benchmark; "
                             "1 alone: no sweep (default: 0.1,0.3,1,3,10)")
    parser.add_argument("--sweep-domain", help="the sweep's domain (default: mnist_m if present, else the first)")
    parser.add_argument("--sweep-jobs", type=int, default=1,
                        help="sweep runs at once, the CPU threads shared among them (default: 1)")
    parser.add_argument("--tag", default="digits", help="results file names: <tag>.json/.md/.png")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
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
        from da2ext.digits import prepare_digits
        args.data = os.path.join(args.workdir, "data")
        prepare_digits(args.data, seed=0, image_size=args.image_size, domains=args.domains,
                       progress=not args.no_progress)
    nano = {} if args.no_nano else nano_column(args)
    scales, sweep = dict((m, 1.0) for m in args.methods), []
    if args.sweep_scales != [1.0]:
        bar = _progress(len(args.methods) * len(args.sweep_scales), not args.no_progress)
        scales, sweep = sweep_learning_rates(args, bar)
        if bar is not None:
            bar.close()
    # Seeds outermost: a short run still covers every method. One run at a time, so step times compare.
    runs = [(m, d, seed, scales[m]) for seed in args.seeds for m in args.methods for d in args.domains]
    bar = _progress(len(runs), not args.no_progress)
    records = _run_all(args, 1, bar, "runs", runs)
    if bar is not None:
        bar.close()
    for record in records:
        record["nano_saved_bytes"] = nano.get(record["method"])

    summary = summarise(records, args.methods, args.domains)
    setting = ("Backbone {} ({}), {}x{} inputs, batch {}, {} epochs, {} training images per domain, Adam with "
               "each method's learning rates and one cosine decay.".format(
                   args.backbone, "weights " + args.weights if args.weights else
                   ("random weights" if args.no_pretrained else "ImageNet weights"), args.image_size,
                   args.image_size, args.batch_size, args.epochs, args.subsample or "all"))
    if sweep:
        setting += (" lr scale: the factor on the method's learning rates that gave the best val accuracy among "
                    "{} on {} with seed 0 (same epochs and images; {}_sweep.json).".format(
                        ", ".join("{:g}".format(x) for x in args.sweep_scales), args.sweep_domain, args.tag))
    meta = {"seeds": args.seeds, "setting": setting, "machine": "{} ({} CPUs)".format(platform.machine(),
                                                                                     os.cpu_count()),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "seconds": int(time.time() - start),
            "run_seconds": int(math.fsum(r["total_time"] for r in records)),
            "sweep_seconds": int(math.fsum(r["total_time"] for r in sweep)), "sweep_jobs": args.sweep_jobs}
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
