"""Training step time on a GPU, eager against replayed as one CUDA graph
(da2ext.CUDAGraphStep), for ft, bias, bias_lean and da2 in the nano setting.

    python benchmarks/cuda_graph_table.py --tag h100
    python benchmarks/cuda_graph_table.py --models resnet50 --batch-sizes 8 --steps 10

On a large GPU the nano setting's steps are bound by kernel launches and Python
(nano_<tag>.md: da2 about twice ft's time on an H100). This table shows what a
graph takes off, for every method alike: each one is timed eager and graphed in
the same process, steps taken round-robin over the methods so that a slow
moment hits them all. Writes benchmarks/results/cuda_graph_<tag>.json and .md.

Columns: eager and graphed step (median ms), graphed speed-up, and each time
as a ratio to ft's eager and to ft's graphed step. Time only: what a step keeps
and its peak memory are in nano_<tag>.md (max_memory_allocated does not see a
graph's private pool, which holds the step's intermediates between replays).
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import da2ext  # noqa: E402
from nano_table import MODELS, MethodSetup, available_models, methods_with_ft  # noqa: E402
from provenance import rerun_command  # noqa: E402
from step_time_processes import median  # noqa: E402

METHODS = ("ft", "bias", "bias_lean", "da2")


class GraphedSetup(object):
    """One method's eager setup and its captured step."""

    def __init__(self, model_name, method_name, batch_size, device):
        self.method = method_name
        self.setup = MethodSetup(model_name, method_name, batch_size, 224, 100, device)
        self.device = device
        self.setup.timed_step()  # warm-up: cuDNN's choices, optimizer state
        s = self.setup
        self.step = da2ext.CUDAGraphStep(s.model, s.loss_fn, s.optimizer, s.inputs, s.targets)
        self.timed_graphed_step()

    def timed_eager_step(self):
        # The setup's own step sets .grad to None, which would cut the graph off from
        # its gradients: time the eager step with gradients zeroed in place instead.
        s = self.setup
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        s.optimizer.zero_grad(set_to_none=False)
        s.loss_fn(s.model(s.inputs), s.targets).backward()
        s.optimizer.step()
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def timed_graphed_step(self):
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        self.step(self.setup.inputs, self.setup.targets)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def measure_group(model_name, method_names, batch_size, device, steps):
    rows = []
    setups = []
    for name in method_names:
        try:
            setups.append(GraphedSetup(model_name, name, batch_size, device))
        except RuntimeError as error:  # a method that cannot be captured gets a row saying why
            rows.append({"method": name, "error": str(error).splitlines()[0][:300]})
    eager = dict((s.method, []) for s in setups)
    graphed = dict((s.method, []) for s in setups)
    for _ in range(steps):
        for s in setups:
            eager[s.method].append(s.timed_eager_step())
            graphed[s.method].append(s.timed_graphed_step())
    for s in setups:
        rows.append({"method": s.method, "eager_step_time": median(eager[s.method]),
                     "graphed_step_time": median(graphed[s.method]), "eager_step_times": eager[s.method],
                     "graphed_step_times": graphed[s.method]})
        del s.step  # free the graph's pool before the next group
    ft = [r for r in rows if r["method"] == "ft" and "error" not in r]
    for r in rows:
        r.update(model=model_name, batch_size=batch_size)
        if ft and "error" not in r:
            r["eager_vs_ft_eager"] = r["eager_step_time"] / ft[0]["eager_step_time"]
            r["graphed_vs_ft_eager"] = r["graphed_step_time"] / ft[0]["eager_step_time"]
            r["graphed_vs_ft_graphed"] = r["graphed_step_time"] / ft[0]["graphed_step_time"]
    return rows


def markdown(records, meta):
    lines = ["# Step time eager and as one CUDA graph (da2ext.CUDAGraphStep)", "",
             "{} · torch {} · da2ext {} · nano setting (224x224, 100 classes, SGD momentum) · median of {} steps per "
             "method and mode, round-robin, after warm-up".format(meta["device"], meta["torch"], meta["da2ext"],
                                                                   meta["steps"]),
             "", "Rerun: `{}`".format(meta["command"]), "",
             "| model | batch | method | eager ms | graphed ms | speed-up | eager vs ft eager | graphed vs ft eager "
             "| graphed vs ft graphed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "error" in r:
            lines.append("| {} | {} | {} | capture failed: {} | | | | | |".format(
                r["model"], r["batch_size"], r["method"], r["error"].replace("|", "/")))
            continue
        lines.append("| {} | {} | {} | {:.2f} | {:.2f} | {:.2f}x | {:.2f} | {:.2f} | {:.2f} |".format(
            r["model"], r["batch_size"], r["method"], 1e3 * r["eager_step_time"], 1e3 * r["graphed_step_time"],
            r["eager_step_time"] / r["graphed_step_time"], r.get("eager_vs_ft_eager", float("nan")),
            r.get("graphed_vs_ft_eager", float("nan")), r.get("graphed_vs_ft_graphed", float("nan"))))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method and mode (median)")
    parser.add_argument("--tag", default="cuda")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (torch.cuda.is_available() is False): CUDA graphs replay GPU work")
    device = torch.device("cuda")
    method_names = methods_with_ft(args.methods)
    records = []
    for model_name in available_models(args.models):
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            for r in measure_group(model_name, method_names, batch_size, device, args.steps):
                records.append(r)
                if "error" in r:
                    print("{:18s} batch {:3d} {:10s} capture failed: {}".format(model_name, batch_size, r["method"],
                                                                               r["error"]), flush=True)
                else:
                    print("{:18s} batch {:3d} {:10s} eager {:7.2f} ms  graphed {:7.2f} ms".format(
                        model_name, batch_size, r["method"], 1e3 * r["eager_step_time"],
                        1e3 * r["graphed_step_time"]), flush=True)
    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "da2ext": da2ext.__version__,
            "steps": args.steps, "command": rerun_command("benchmarks/cuda_graph_table.py",
                                                   argv if argv is not None else sys.argv[1:])}
    if not os.path.isdir(args.out_dir):
        os.makedirs(args.out_dir)
    with open(os.path.join(args.out_dir, "cuda_graph_{}.json".format(args.tag)), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    with open(os.path.join(args.out_dir, "cuda_graph_{}.md".format(args.tag)), "w") as f:
        f.write(markdown(records, meta))
    print(markdown(records, meta))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
