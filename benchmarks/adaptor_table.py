#!/usr/bin/env python
"""Run the adaptor benchmark suite (benchmarks/test_adaptor_benchmark.py) on one
device and write its results as

    benchmarks/results/adaptor_<device-tag>.json   (trimmed pytest-benchmark results + the table rows)
    benchmarks/results/adaptor_<device-tag>.md     (a Markdown table: fused vs reference)

Usage:
    python benchmarks/adaptor_table.py                         # CUDA if the CUDA kernels are built, else CPU
    python benchmarks/adaptor_table.py --device cpu --rounds 20
    python benchmarks/adaptor_table.py --device cuda --peak-gbps 3350   # H100 SXM HBM3
    python benchmarks/adaptor_table.py -- -x                   # anything after -- goes to pytest

Python 3.6 compatible.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SUITE = os.path.join(HERE, "test_adaptor_benchmark.py")
MIB = float(1 << 20)

# The suite's pytest is run from the repository root, so import da2ext as it will.
sys.path.insert(0, REPO)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device to benchmark (default: cuda when da2ext has CUDA kernels and a GPU, else cpu)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="the device's peak DRAM bandwidth in GB/s, to put achieved GB/s in proportion (CUDA)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (DA2EXT_BENCH_ROUNDS)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="calls per round (DA2EXT_BENCH_ITERATIONS)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (DA2EXT_BENCH_WARMUP)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (DA2EXT_BENCH_THREADS; default: torch's default)")
    parser.add_argument("--tag", default=None, help="device tag in the file names (default: derived from the device)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"), help="where to write the results")
    parser.add_argument("--raw-json", default=None, help="also keep pytest-benchmark's raw JSON at this path")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (put them after --)")
    return parser.parse_args(argv)


def default_device():
    import torch
    import da2ext
    return "cuda" if torch.cuda.is_available() and da2ext.backend("cuda") == "cuda" else "cpu"


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_tag(device):
    if device == "cuda":
        import torch
        return slugify(torch.cuda.get_device_name())
    return "cpu-{}cores".format(os.cpu_count() or 1)


def load_average():
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


def _busy_cpu_seconds():
    """CPU seconds spent busy by the whole machine so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / float(os.sysconf("SC_CLK_TCK"))
    except (IOError, OSError, ValueError, IndexError, AttributeError):
        return None


def _children_cpu_seconds():
    try:
        import resource
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    except (ImportError, AttributeError):
        return None


def run_suite(args, device, json_path):
    env = dict(os.environ)
    for name, value in (("DA2EXT_BENCH_ROUNDS", args.rounds), ("DA2EXT_BENCH_ITERATIONS", args.iterations),
                        ("DA2EXT_BENCH_WARMUP", args.warmup), ("DA2EXT_BENCH_THREADS", args.threads)):
        if value is not None:
            env[name] = str(value)
    command = [sys.executable, "-m", "pytest", os.path.relpath(SUITE, REPO), "--benchmark-only",
               "--benchmark-json", json_path, "--benchmark-columns", "min,median,max,iqr,rounds,iterations",
               "-k", device, "-p", "no:cacheprovider", "-q"] + list(args.pytest_args)
    print("+ " + " ".join(shlex.quote(c) for c in command), flush=True)
    busy_before, ours_before = _busy_cpu_seconds(), _children_cpu_seconds()
    start = time.time()
    code = subprocess.call(command, cwd=REPO, env=env)
    seconds = time.time() - start
    busy_after, ours_after = _busy_cpu_seconds(), _children_cpu_seconds()
    if code != 0:
        raise SystemExit("the benchmark suite failed (pytest exit status {}); no results written".format(code))
    # CPU time other processes took while the suite ran: a contended machine makes CPU timings
    # (multi-threaded ones above all) unreliable, so the table says how busy it was.
    others = None
    if None not in (busy_before, busy_after, ours_before, ours_after):
        others = max(0.0, (busy_after - busy_before) - (ours_after - ours_before))
    return seconds, others


def trimmed_benchmark(bench):
    stats = bench["stats"]
    return {
        "name": bench["name"],
        "group": bench["group"],
        "params": bench["params"],
        "stats": dict((k, stats[k]) for k in ("min", "max", "mean", "median", "stddev", "iqr", "rounds",
                                              "iterations") if k in stats),
        "extra_info": bench["extra_info"],
    }


def build_rows(benchmarks, peak_gbps):
    """One row per (device, dtype, mode, shape), the two implementations side by side."""
    cells = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        key = (info["device"], info["dtype"], info["mode"], tuple(info["shape"]))
        cells.setdefault(key, {})[info["implementation"]] = bench
    dtype_order = {"float32": 0, "float16": 1}
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], dtype_order.get(k[1], 9), k[1], k[2], k[3][1])):
        device, dtype, mode, shape = key
        fused, ref = cells[key].get("fused"), cells[key].get("reference")
        any_bench = fused or ref
        input_bytes = any_bench["extra_info"]["input_bytes"]
        row = {
            "device": device, "dtype": dtype, "mode": mode, "shape": list(shape), "input_bytes": input_bytes,
            "device_name": any_bench["extra_info"]["device_name"],
            "param_bytes": any_bench["extra_info"].get("param_bytes"),
        }
        for label, bench in (("reference", ref), ("fused", fused)):
            if bench is None:
                continue
            row[label + "_median_s"] = bench["stats"]["median"]
            row[label + "_iqr_s"] = bench["stats"].get("iqr")
            row[label + "_saved_bytes"] = bench["extra_info"]["saved_bytes"]
            row[label + "_backend"] = bench["extra_info"]["backend"]
            if bench["extra_info"].get("achieved_gbps") is not None:
                row[label + "_gbps"] = bench["extra_info"]["achieved_gbps"]
        if fused and ref and row["fused_median_s"] > 0:
            row["speedup"] = row["reference_median_s"] / row["fused_median_s"]
        if peak_gbps and row.get("fused_gbps") is not None:
            row["fused_fraction_of_peak"] = row["fused_gbps"] / peak_gbps
        rows.append(row)
    return rows


def _ms(seconds):
    return "{:.2f}".format(seconds * 1e3) if seconds is not None else "-"


def _saved(row, label):
    saved = row.get(label + "_saved_bytes")
    if saved is None:
        return "-"
    return "{:.2f} ({:.1f}%)".format(saved / MIB, 100.0 * saved / row["input_bytes"])


def _others(meta):
    others = meta.get("others_cpu_seconds")
    if others is None:
        return "CPU use of other processes unknown"
    available = meta["suite_seconds"] * (meta.get("cpu_count") or 1)
    return "other processes used {:.0f} CPU-s of the {:.0f} CPU-s available ({:.0f}%)".format(
        others, available, 100.0 * others / available if available else 0.0)


def markdown(meta, rows, peak_gbps):
    cuda = any(r["device"] == "cuda" for r in rows)
    lines = [
        "# da2ext ResidualAttentionAdaptor: fused vs reference, forward + backward",
        "",
        "- Device: {} ({})".format(meta["device_name"], meta["device_tag"]),
        "- torch {}, da2ext {} (fused backend: {}), Python {}".format(
            meta["torch_version"], meta["da2ext_version"], meta["fused_backend"], meta["python_version"]),
        "- Date: {}".format(meta["date"]),
        "- Settings: {}".format(meta["settings"]),
        "- Suite wall time: {:.0f} s; {}; load average before / after: {} / {}".format(
            meta["suite_seconds"], _others(meta), meta["load_before"], meta["load_after"]),
        "- Rerun: `{}`".format(meta["command"]),
        "",
        "One call: `y = m(x); y.backward(g)` with x (= F) and all adaptor parameters requiring grad; "
        "ResNet-50 stage shapes at batch 8, reduction 16, 7x7 spatial conv, gamma ~ N(0, 0.1). "
        "Times are medians. Saved = bytes autograd keeps for backward (`da2ext.saved_bytes`, distinct "
        "storages), in MiB and as % of F's bytes; it includes the adaptor's parameters "
        "(column params), which exist whether or not anything is saved.",
        "",
    ]
    header = ["device", "dtype", "mode", "shape (NxCxHxW)", "F (MiB)", "reference (ms)", "fused (ms)",
              "speed-up", "saved reference (MiB, % of F)", "saved fused (MiB, % of F)", "params (MiB)"]
    if cuda:
        header.append("fused GB/s" + (" (% of {:.0f} GB/s peak)".format(peak_gbps) if peak_gbps else ""))
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|")
    for r in rows:
        cells = [r["device"], r["dtype"], r["mode"], "x".join(str(s) for s in r["shape"]),
                 "{:.1f}".format(r["input_bytes"] / MIB), _ms(r.get("reference_median_s")),
                 _ms(r.get("fused_median_s")),
                 "{:.2f}x".format(r["speedup"]) if "speedup" in r else "-",
                 _saved(r, "reference"), _saved(r, "fused"),
                 "-" if r.get("param_bytes") is None else "{:.2f}".format(r["param_bytes"] / MIB)]
        if cuda:
            gbps = r.get("fused_gbps")
            cell = "-" if gbps is None else "{:.0f}".format(gbps)
            if gbps is not None and r.get("fused_fraction_of_peak") is not None:
                cell += " ({:.0f}%)".format(100.0 * r["fused_fraction_of_peak"])
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    if cuda:
        lines += [
            "",
            "GB/s = minimal DRAM traffic of the fused passes / fused median time: mode add moves 6 x F bytes "
            "(forward reads F twice - pool, apply - and writes y; backward reads g twice and writes dF), "
            "mode mul 7 x F (backward also reads F).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    import da2ext

    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    tag = args.tag or device_tag(device)
    rerun = " ".join(["python", "benchmarks/adaptor_table.py"] + [shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv)])
    if args.device is None:
        rerun += " --device " + device

    load_before = load_average()
    fd, raw_path = tempfile.mkstemp(prefix="adaptor_bench_", suffix=".json")
    os.close(fd)
    try:
        suite_seconds, others_cpu_seconds = run_suite(args, device, raw_path)
        with open(raw_path) as f:
            raw = json.load(f)
        if args.raw_json:
            with open(args.raw_json, "w") as f:
                json.dump(raw, f, indent=2)
    finally:
        os.remove(raw_path)
    load_after = load_average()

    benchmarks = [trimmed_benchmark(b) for b in raw["benchmarks"]]
    if not benchmarks:
        raise SystemExit("no benchmark ran on {} (all skipped?)".format(device))
    rows = build_rows(benchmarks, args.peak_gbps)
    first = benchmarks[0]
    settings = "rounds={}, iterations={}, warmup_rounds={}".format(
        first["stats"].get("rounds"), first["stats"].get("iterations"),
        first["extra_info"].get("warmup_rounds"))
    if device == "cpu":
        settings += ", torch threads={}".format(first["extra_info"].get("torch_threads"))
    machine = raw.get("machine_info", {})
    meta = {
        "device": device,
        "device_tag": tag,
        "device_name": first["extra_info"]["device_name"],
        "torch_version": torch.__version__,
        "da2ext_version": da2ext.__version__,
        "fused_backend": da2ext.backend(device),
        "python_version": machine.get("python_version", sys.version.split()[0]),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": rerun,
        "settings": settings,
        "suite_seconds": suite_seconds,
        "others_cpu_seconds": others_cpu_seconds,
        "load_before": load_before,
        "load_after": load_after,
        "peak_gbps": args.peak_gbps,
        "pytest_benchmark_version": raw.get("version"),
    }
    if not os.path.isdir(args.out_dir):
        os.makedirs(args.out_dir)
    json_out = os.path.join(args.out_dir, "adaptor_{}.json".format(tag))
    md_out = os.path.join(args.out_dir, "adaptor_{}.md".format(tag))
    with open(json_out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "benchmarks": benchmarks}, f, indent=2, sort_keys=True)
        f.write("\n")
    table = markdown(meta, rows, args.peak_gbps)
    with open(md_out, "w") as f:
        f.write(table)
    print()
    print(table)
    print("wrote {} and {} (suite: {:.0f} s)".format(os.path.relpath(json_out), os.path.relpath(md_out),
                                                    suite_seconds))


if __name__ == "__main__":
    main()
