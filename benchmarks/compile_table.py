"""A training step eager against torch.compile, for ft and da2 in the nano setting.

    python benchmarks/compile_table.py --tag cpu-2cores
    python benchmarks/compile_table.py --device cuda --mode reduce-overhead --tag h100
    python benchmarks/compile_table.py --models resnet18 --methods da2 --steps 3

Each (model, method) is built twice from the same seed: one model runs eager,
the other through torch.compile(model, fullgraph=True, mode=--mode), the
optimizer step eager in both. The first compiled step traces and compiles
(its time, less an eager step's, is the compile cost, with the compilers'
on-disk caches empty); then the two are timed
round-robin, so a slow moment of the machine hits both. Figures per row:
the first step's loss in both (they must agree: the same weights and batch),
the median step times and their ratio, the steps after which compiling has
paid for itself, and what each keeps for backward (da2ext.SavedTensorCounter,
the model's own weights excluded): the compiler's partitioner chooses what to
save, and may keep more than the lean modules do eager.

Writes benchmarks/results/compile_<tag>.json and .md, with the commit, the
command and the machine.
"""
import argparse
import math
import os
import shutil
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import da2ext  # noqa: E402
from da2ext.profiling import device_description, model_state, synchronize  # noqa: E402
from nano_table import MethodSetup, available_models  # noqa: E402
from provenance import git_commit, rerun_command, write_table  # noqa: E402
from step_time_processes import median  # noqa: E402

MODELS = ("resnet18", "efficientnet_lite0")
METHODS = ("ft", "da2")
MIB = float(2 ** 20)


class ComparedSetups(object):
    """One method on one model, eager and compiled, from the same initial weights."""

    def __init__(self, model_name, method_name, batch_size, image_size, device, mode):
        self.eager = MethodSetup(model_name, method_name, batch_size, image_size, 100, device)
        self.compiled = MethodSetup(model_name, method_name, batch_size, image_size, 100, device)
        self.compiled.model = torch.compile(self.compiled.model, fullgraph=True, mode=mode)

    def first_steps(self):
        """Each setup's first step: (eager loss, compiled loss, eager seconds, compiled
        seconds including tracing and compiling, eager kept bytes, compiled kept bytes)."""
        figures = []
        for setup in (self.eager, self.compiled):
            state = model_state(getattr(setup.model, "_orig_mod", setup.model))
            synchronize(setup.device)
            start = time.perf_counter()
            setup.optimizer.zero_grad()
            with da2ext.SavedTensorCounter(exclude=state) as kept:
                loss = setup.loss_fn(setup.model(setup.inputs), setup.targets)
            loss.backward()
            setup.optimizer.step()
            synchronize(setup.device)
            figures.append((loss.item(), time.perf_counter() - start, kept.saved_bytes))
        (eager_loss, eager_time, eager_kept), (compiled_loss, compiled_time, compiled_kept) = figures
        return eager_loss, compiled_loss, eager_time, compiled_time, eager_kept, compiled_kept


def compile_from_scratch():
    """Send the compilers' on-disk caches to a new empty directory (returned) and
    turn off those that skip compiling altogether: a graph or kernel compiled by an
    earlier run (of this table, or of the tests) would make the compile cost look
    like nothing. Kernels compiled earlier in this process stay in memory."""
    import torch._functorch.config
    import torch._inductor.config
    directory = tempfile.mkdtemp(prefix="da2ext-compile-table-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
    torch._inductor.config.fx_graph_cache = False
    torch._inductor.config.autotune_local_cache = False
    torch._functorch.config.enable_autograd_cache = False
    return directory


def measure(model_name, method_name, batch_size, image_size, device, mode, steps):
    torch._dynamo.reset()
    cache = compile_from_scratch()
    try:
        setups = ComparedSetups(model_name, method_name, batch_size, image_size, device, mode)
        eager_loss, compiled_loss, first_eager, first_compiled, eager_kept, compiled_kept = setups.first_steps()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    setups.compiled.timed_step()  # a second compiled step: mode="reduce-overhead" records its graph here
    eager_times, compiled_times = [], []
    for _ in range(steps):
        eager_times.append(setups.eager.timed_step())
        compiled_times.append(setups.compiled.timed_step())
    eager_time, compiled_time = median(eager_times), median(compiled_times)
    compile_cost = max(first_compiled - eager_time, 0.0)
    saved_per_step = eager_time - compiled_time
    return {"model": model_name, "method": method_name, "batch_size": batch_size, "image_size": image_size,
            "eager_loss": eager_loss, "compiled_loss": compiled_loss, "first_eager_step": first_eager,
            "first_compiled_step": first_compiled, "compile_seconds": compile_cost,
            "eager_step_time": eager_time, "compiled_step_time": compiled_time,
            "eager_step_times": eager_times, "compiled_step_times": compiled_times,
            "speedup": eager_time / compiled_time,
            "break_even_steps": (int(math.ceil(compile_cost / saved_per_step)) if saved_per_step > 0 else None),
            "eager_saved_bytes": eager_kept, "compiled_saved_bytes": compiled_kept}


def markdown(records, meta):
    lines = ["# A training step eager and with torch.compile", "",
             "{} · torch {} · da2ext {} at {} · nano setting ({}x{}, 100 classes, SGD momentum, random weights) · "
             "torch.compile(model, fullgraph=True, mode={}) · median of {} steps each, round-robin, after the "
             "compiling step".format(meta["device"], meta["torch"], meta["da2ext"], meta["commit"],
                                     meta["image_size"], meta["image_size"], meta["mode"], meta["steps"]),
             "", "Rerun: `{}`".format(meta["command"]), "",
             "compile s: the first compiled step less an eager step, the compilers' on-disk caches empty; "
             "pays after: the steps whose saving covers it; kept: what the step keeps for backward (weights "
             "excluded).", "",
             "| model | batch | method | first loss eager / compiled | eager s | compiled s | speed-up | compile s "
             "| pays after | kept eager MiB | kept compiled MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        pays = "never" if r["break_even_steps"] is None else "{:,} steps".format(r["break_even_steps"])
        lines.append("| {} | {} | {} | {:.5f} / {:.5f} | {:.3f} | {:.3f} | {:.2f}x | {:.0f} | {} | {:.2f} | {:.2f} |"
                     .format(r["model"], r["batch_size"], r["method"], r["eager_loss"], r["compiled_loss"],
                             r["eager_step_time"], r["compiled_step_time"], r["speedup"], r["compile_seconds"], pays,
                             r["eager_saved_bytes"] / MIB, r["compiled_saved_bytes"] / MIB))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps each, eager and compiled (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="default",
                        help='torch.compile\'s mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune"')
    parser.add_argument("--tag", default=None, help="results file name: compile_<tag>.json/.md (default: device)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if not hasattr(torch, "compile"):
        parser.error("needs torch.compile (torch >= 2.0); this is torch {}".format(torch.__version__))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    records = []
    for model_name in available_models(args.models):
        for method_name in args.methods.split(","):
            r = measure(model_name, method_name, args.batch_size, args.image_size, device, args.mode, args.steps)
            records.append(r)
            print("{:18s} {:4s} eager {:.3f} s  compiled {:.3f} s  ({:.2f}x; compiling {:.0f} s)  kept {:.2f} / "
                  "{:.2f} MiB".format(model_name, method_name, r["eager_step_time"], r["compiled_step_time"],
                                      r["speedup"], r["compile_seconds"], r["eager_saved_bytes"] / MIB,
                                      r["compiled_saved_bytes"] / MIB), flush=True)
    meta = {"device": device_description(device), "torch": torch.__version__, "da2ext": da2ext.__version__,
            "commit": git_commit(), "mode": args.mode, "steps": args.steps, "image_size": args.image_size,
            "command": rerun_command("benchmarks/compile_table.py", sys.argv[1:] if argv is None else argv)}
    write_table(args.out_dir, "compile_" + (args.tag or device.type), {"meta": meta, "records": records},
                markdown(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
