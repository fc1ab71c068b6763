"""How many ops one adaptor forward + backward dispatches, and its time where compute is nothing.

    python benchmarks/launch_count.py --tag cpu-2cores
    python benchmarks/launch_count.py --device cuda --tag h100      # kernels launched, on a GPU

Counted with torch.profiler over one forward + backward of a rank-1 and a rank-4
adaptor (the fused module as the package runs it, the fused module op by op, and
the pure-PyTorch reference; see KINDS), at 8x256x2x2 (where
each op's arithmetic is nothing and its dispatch is everything) and 8x256x56x56:

- dispatched: the aten:: and da2ext:: ops called from Python or by the autograd
  engine, not from inside another op (each one a trip through the dispatcher, and
  on CUDA at least one launch), with the output's gradient made beforehand and the
  parameters' gradients None (as after zero_grad), so nothing of the harness counts;
- all ops: the same with the ops they call inside;
- CUDA kernels (on a GPU): the kernels the profiler saw launched.

Wall time at 8x256x2x2: the median over --rounds rounds of the median of --runs
forward + backward calls, the kinds taking turns round by round in the same process
(issue 19 measures the one-op adaptor against the op-by-op one, side by side). Each
call starts, as the counts do, from None gradients with the output's gradient made
beforehand (until 2026-12-06 the timed calls accumulated into the previous call's
gradients and made the output's gradient inside: eight additions and a fill a call
that a training step after zero_grad does not run).
Writes benchmarks/results/launch_count_<tag>.json and .md.
"""
import argparse
import contextlib
import importlib
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import da2ext  # noqa: E402
from da2ext.profiling import device_description  # noqa: E402
from provenance import git_commit, rerun_command, write_table  # noqa: E402
from step_time_processes import median  # noqa: E402

residual_attention_module = importlib.import_module("da2ext.ops.residual_attention")

SHAPES = ((8, 256, 2, 2), (8, 256, 56, 56))
OP_PREFIXES = ("aten::", "da2ext::")


# "fused": the one-op adaptor (one op whose autograd node is C++, csrc/ops/residual_attention_autograd.cpp;
# the package's path on the CPU, and on CUDA where DA2EXT_CUDA_ONE_OP=1); "fused, op by op": the same
# kernels with the small branch in PyTorch ops between them, in a Python autograd Function (CUDA's
# default path, and the CPU's before the one-op adaptor); "reference": the pure-PyTorch adaptor.
KINDS = ("fused", "fused, op by op", "reference")


def _path(kind):
    """The context a kind runs in ("fused" on CUDA: the one-op adaptor's eight launches, not yet the default there)."""
    if kind == "fused, op by op":
        return residual_attention_module.op_by_op()
    return residual_attention_module.one_op_on_cuda() if kind == "fused" else contextlib.suppress()


def adaptor(kind, channels, rank, device):
    torch.manual_seed(0)
    cls = da2ext.reference.ResidualAttentionAdaptor if kind == "reference" else da2ext.ResidualAttentionAdaptor
    module = cls(channels, rank=rank).to(device)
    with torch.no_grad():
        module.gamma.normal_(std=0.5)  # gamma 0 would skip nothing, but non-zero is the trained case
    return module


def forward_backward(module, x, grad=None):
    """The adaptor's forward and backward alone (a gradient of ones, no loss ops)."""
    y = module(x)
    y.backward(torch.ones_like(y) if grad is None else grad)


def _is_op(event):
    return event.name.startswith(OP_PREFIXES)


def count_ops(module, x, device):
    """(dispatched ops, all ops, CUDA kernels or None) of one forward + backward."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    forward_backward(module, x)  # warm-up: lazy initialisation is not the steady state
    # What the adaptor does, not the harness: the gradient made beforehand, and no gradient to
    # accumulate into (as after an optimizer's zero_grad, which sets them to None).
    grad = torch.ones_like(x)
    _fresh_gradients(module, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profile:
        forward_backward(module, x, grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = list(profile.events())
    ops = [e for e in events if _is_op(e)]
    dispatched = [e for e in ops if e.cpu_parent is None or not _is_op(e.cpu_parent)]
    kernels = None
    if device.type == "cuda":
        kernels = sum(1 for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return len(dispatched), len(ops), kernels


def _fresh_gradients(module, x):
    """No gradient to accumulate into, as after an optimizer's zero_grad (which sets them to None)."""
    module.zero_grad(set_to_none=True)
    x.grad = None


def _timed_calls(module, x, device, runs):
    """The median time of `runs` forward + backward calls, each from fresh gradients with the
    output's gradient made beforehand (what a training step's adaptor does, not the harness)."""
    grad = torch.ones_like(x)
    times = []
    for _ in range(runs):
        _fresh_gradients(module, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        forward_backward(module, x, grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times)


def wall_times(cases, device, runs, rounds):
    """{kind: median over `rounds` rounds of the median of `runs` calls}, the kinds taking
    turns round by round, so that a slow spell of a shared machine falls on all of them."""
    for kind, (module, x) in cases.items():
        with _path(kind):
            _timed_calls(module, x, device, 20)  # warm-up
    per_round = {kind: [] for kind in cases}
    for _ in range(rounds):
        for kind, (module, x) in cases.items():
            with _path(kind):
                per_round[kind].append(_timed_calls(module, x, device, runs))
    return {kind: median(times) for kind, times in per_round.items()}


def measure(device, runs, rounds):
    records = []
    for shape in SHAPES:
        for rank in (1, 4):
            cases = {}
            for kind in KINDS:
                module = adaptor(kind, shape[1], rank, device)
                x = torch.randn(shape, device=device, requires_grad=True)
                cases[kind] = (module, x)
                with _path(kind):
                    dispatched, all_ops, kernels = count_ops(module, x, device)
                records.append({"shape": list(shape), "rank": rank, "adaptor": kind, "dispatched_ops": dispatched,
                                "all_ops": all_ops, "cuda_kernels": kernels})
            if shape == SHAPES[0]:
                times = wall_times(cases, device, runs, rounds)
                for record in records[-len(KINDS):]:
                    record["wall_time"] = times[record["adaptor"]]
                    record["time_vs_op_by_op"] = times[record["adaptor"]] / times["fused, op by op"]
            for record in records[-len(KINDS):]:
                print("{} rank {} {:15s}: {} dispatched, {} in all{}{}".format(
                    "x".join(map(str, shape)), rank, record["adaptor"], record["dispatched_ops"], record["all_ops"],
                    "" if record["cuda_kernels"] is None else ", {} CUDA kernels".format(record["cuda_kernels"]),
                    ", {:.3f} ms ({:.2f}x op by op)".format(1e3 * record["wall_time"], record["time_vs_op_by_op"])
                    if "wall_time" in record else ""), flush=True)
    return records


def markdown(records, meta):
    lines = ["# Ops per adaptor forward + backward", "",
             "{} · torch {} · da2ext {} at {} · backend {} · wall time: median over {} rounds of the median of {} "
             "calls, the three adaptors taking turns each round".format(
                 meta["device"], meta["torch"], meta["da2ext"], meta["commit"], meta["backend"], meta["rounds"],
                 meta["runs"]),
             "", "Rerun: `{}`".format(meta["command"]), "",
             "dispatched: aten/da2ext ops called from Python or the autograd engine (not from inside another op); "
             "all ops: with those they call.", "",
             "| shape | rank | adaptor | dispatched ops | all ops | CUDA kernels | wall time ms | x op by op |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            "x".join(map(str, r["shape"])), r["rank"], r["adaptor"], r["dispatched_ops"], r["all_ops"],
            "-" if r["cuda_kernels"] is None else r["cuda_kernels"],
            "{:.3f}".format(1e3 * r["wall_time"]) if "wall_time" in r else "-",
            "{:.2f}".format(r["time_vs_op_by_op"]) if "wall_time" in r else "-"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=200, help="timed calls a round at 8x256x2x2 (median)")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of --runs calls, the adaptors taking turns")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU")
    records = measure(device, args.runs, args.rounds)
    meta = {"device": device_description(device),
            "torch": torch.__version__, "da2ext": da2ext.__version__, "commit": git_commit(),
            "backend": da2ext.backend(device), "runs": args.runs, "rounds": args.rounds,
            "command": rerun_command("benchmarks/launch_count.py", sys.argv[1:] if argv is None else argv)}
    write_table(args.out_dir, "launch_count_" + args.tag, {"meta": meta, "records": records}, markdown(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
