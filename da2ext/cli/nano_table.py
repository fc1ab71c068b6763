"""The "nano" table of docs/design.md §4: what a training step keeps for backward and
costs, per method, on ResNet-50, MobileNetV2 and EfficientNet-Lite0.

Setting: random weights (memory and time do not depend on them), batch 8 and 32,
3x224x224, float32, SGD with momentum, a new 100-class head. Rows: ft, last,
bias (TinyTL-B in plain PyTorch), bias_lean, da2_eager, da2_adaptor_only, da2.
Figures (da2ext.profiling.profile_step): saved_bytes, param+grad+optimizer bytes,
step_time as a ratio to ft measured in the same run, peak CUDA bytes on a GPU.
The floor is every ReLU/ReLU6 output kept as packed bits (§1, §4).

    python -m da2ext nano-table                           # everything, CPU
    python -m da2ext nano-table --device cuda --tag h100
    python -m da2ext nano-table --models resnet50 --batch-sizes 8 --steps 3

(benchmarks/nano_table.py is the same with results going to benchmarks/results/.)
Writes <out-dir>/nano_<tag>.json and .md (default out-dir: ./benchmarks/results where the
current directory is a checkout, else the current directory).
"""
import argparse
import importlib.util
import json
import math
import os
import time

import torch
from torch import nn

from .. import methods
from ..lean.kept_bytes import largest_recompute_transient
from ..profiling import device_description, profile_step, synchronize

MODELS = ("resnet50", "mobilenet_v2", "efficientnet_lite0")
ROWS = ("ft", "last", "bias", "bias_lean", "da2_eager", "da2_adaptor_only", "da2")
MIB = float(2 ** 20)


def build_backbone(name):
    """A backbone with random weights (memory and time do not depend on them):
    efficientnet_lite0 (timm's tf_efficientnet_lite0), timm/<name> (any timm
    model), or a torchvision model by name."""
    import torchvision
    if name == "efficientnet_lite0" or name.startswith("timm/"):
        try:
            import timm
        except ImportError:
            return None
        return timm.create_model("tf_efficientnet_lite0" if name == "efficientnet_lite0" else name[len("timm/"):],
                                 pretrained=False)
    return getattr(torchvision.models, name)()


def methods_with_ft(methods_arg):
    """The comma-separated methods as a list, ft first if it was missing: every time
    is a ratio to ft's in the same run."""
    names = methods_arg.split(",")
    if "ft" not in names:
        names.insert(0, "ft")
    return names


def available_models(models_arg):
    """The comma-separated models that can be built here, saying which are skipped
    (efficientnet_lite0 needs timm)."""
    names = []
    for name in models_arg.split(","):
        if (name == "efficientnet_lite0" or name.startswith("timm/")) and importlib.util.find_spec("timm") is None:
            print("skipping {}: timm is not installed (pip install timm)".format(name))
            continue
        names.append(name)
    return names


def packed_bit_floor(name, batch_size, image_size):
    """Bytes of every ReLU/ReLU6 output of the original model kept as packed bits,
    4 * ceil(numel / 32) per activation call (docs/design.md §1's floor)."""
    model = build_backbone(name).eval()
    words = []

    def count(module, inputs, output):
        words.append(int(math.ceil(output.numel() / 32.0)))

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    with torch.no_grad():
        model(torch.zeros(batch_size, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return 4 * sum(words)


class MethodSetup(object):
    """One method's model, optimizer and batch, ready to step."""

    def __init__(self, model_name, method_name, batch_size, image_size, num_classes, device):
        torch.manual_seed(0)
        self.device = device
        self.model = methods.get(method_name).build(build_backbone(model_name), num_classes).to(device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.trainable, lr=1e-3, momentum=0.9)
        self.inputs = torch.randn(batch_size, 3, image_size, image_size, device=device)
        self.targets = torch.randint(0, num_classes, (batch_size,), device=device)
        self.loss_fn = nn.CrossEntropyLoss()

    def memory_figures(self):
        """docs/design.md §4's figures of one step after a warm-up step (profile_step, untimed)."""
        figures = profile_step(self.model, self.inputs, self.targets, self.loss_fn, self.optimizer, warmup=1, steps=0)
        figures["trainable_params"] = sum(p.numel() for p in self.trainable)
        figures["recompute_transient"] = largest_recompute_transient(self.model, self.inputs)
        return figures

    def timed_step(self):
        synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad()
        self.loss_fn(self.model(self.inputs), self.targets).backward()
        self.optimizer.step()
        synchronize(self.device)
        return time.perf_counter() - start


def measure_group(model_name, method_names, batch_size, image_size, num_classes, device, steps):
    """Every method on one (model, batch). Steps are timed round-robin - ft, last,
    ..., da2, then again - so that a VM's slow minutes hit every method alike and
    the ratios to ft stay fair; step_time is each method's median."""
    setups = [MethodSetup(model_name, m, batch_size, image_size, num_classes, device) for m in method_names]
    rows = [s.memory_figures() for s in setups]
    times = [[] for _ in setups]
    for _ in range(steps):
        for i, setup in enumerate(setups):
            times[i].append(setup.timed_step())
    for row, method_times in zip(rows, times):
        method_times.sort()
        row["step_time"] = method_times[len(method_times) // 2]
        row["step_times"] = method_times
    return rows


def _mib(value):
    return "" if value is None else "{:.1f}".format(value / MIB)


def markdown(records, meta):
    lines = ["# Nano setting: memory and step time per method", "",
             "{} · torch {} · da2ext {} · {} timed steps per method after 1 warm-up, round-robin over the methods "
             "(median) · SGD momentum · "
             "{}x{} inputs · {} classes".format(meta["device"], meta["torch"], meta["da2ext"], meta["steps"],
                                                meta["image_size"], meta["image_size"], meta["num_classes"]),
             "", "saved = kept for backward (the model's own weights excluded, they are in params); "
             "floor = every ReLU/ReLU6 output as packed bits; time = step time / ft's step time, same run.", ""]
    if meta.get("provenance"):
        lines[-1:-1] = ["", meta["provenance"]]
    has_cuda = any(r["peak_cuda_bytes"] is not None for r in records)
    header = "| model | batch | method | saved MiB | x floor | params+grads+optimizer MiB | step s | time vs ft |"
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
    if has_cuda:
        header += " peak CUDA MiB |"
        rule += " --- |"
    lines += [header, rule]
    for r in records:
        times_floor = "{:.2f}".format(r["saved_bytes"] / r["floor_bytes"]) if r["floor_bytes"] else "-"  # no ReLU
        row = "| {} | {} | {} | {} | {} | {} | {:.3f} | {:.2f} |".format(
            r["model"], r["batch_size"], r["method"], _mib(r["saved_bytes"]), times_floor,
            _mib(r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]), r["step_time"], r["time_vs_ft"])
        if has_cuda:
            row += " {} |".format(_mib(r["peak_cuda_bytes"]))
        lines.append(row)
    floors = sorted(set((r["model"], r["batch_size"], r["floor_bytes"]) for r in records))
    lines += ["", "Packed-bit floor: " + "; ".join("{} batch {}: {} MiB".format(m, b, _mib(f)) for m, b, f in floors)]
    transients = [r for r in records if r.get("recompute_transient")]
    if transients:
        lines += ["", "Recomputed blocks (SiLU, hardswish, GELU, SE, LayerNorm: each keeps its input and runs again in "
                  "backward): while the largest one's backward runs it holds, besides the saved bytes above, " +
                  "; ".join("{} batch {} {}: {} MiB ({})".format(
                      r["model"], r["batch_size"], r["method"], _mib(r["recompute_transient"]["transient_bytes"]),
                      r["recompute_transient"]["part"]) for r in transients) + "."]
    if meta.get("updated_groups"):
        lines += ["", "Remeasured in a later run (each group's ratios are within one run): " +
                  ", ".join(meta["updated_groups"]) + "." +
                  (" " + meta["update_provenance"] if meta.get("update_provenance") else "")]
    return "\n".join(lines) + "\n"


def _version():
    from .. import __version__
    return __version__


def _default_out_dir():
    checkout_results = os.path.join("benchmarks", "results")
    return checkout_results if os.path.isdir(checkout_results) else "."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--methods", default=",".join(ROWS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default=None, help="results file name: nano_<tag>.json/.md (default: device)")
    parser.add_argument("--out-dir", default=_default_out_dir(),
                        help="where nano_<tag>.json/.md go (default: %(default)s)")
    parser.add_argument("--provenance", default=None,
                        help="a line naming the commit and the command, written into the results "
                             "(benchmarks/nano_table.py fills it in from the checkout)")
    parser.add_argument("--update", action="store_true",
                        help="replace only the (model, batch) groups measured now in an existing nano_<tag>.json "
                             "(each group's times stay ratios within one run)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    method_names = methods_with_ft(args.methods)
    records = []
    for model_name in available_models(args.models):
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            floor = packed_bit_floor(model_name, batch_size, args.image_size)
            rows = measure_group(model_name, method_names, batch_size, args.image_size, args.num_classes, device,
                                 args.steps)
            for method_name, figures in zip(method_names, rows):
                figures.update(model=model_name, batch_size=batch_size, method=method_name, floor_bytes=floor)
                print("{:18s} batch {:3d} {:17s} saved {:8.1f} MiB  step {:.3f} s".format(
                    model_name, batch_size, method_name, figures["saved_bytes"] / MIB, figures["step_time"]),
                    flush=True)
            ft_time = [r for r in rows if r["method"] == "ft"][0]["step_time"]
            for r in rows:
                r["time_vs_ft"] = r["step_time"] / ft_time
            records += rows

    meta = {"device": device_description(device), "torch": torch.__version__, "da2ext": _version(), "steps": args.steps,
            "image_size": args.image_size, "num_classes": args.num_classes}
    if args.provenance:
        meta["provenance"] = args.provenance
    tag = args.tag or device.type
    if not os.path.isdir(args.out_dir):
        os.makedirs(args.out_dir)
    json_path = os.path.join(args.out_dir, "nano_{}.json".format(tag))
    if args.update and os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        measured = set((r["model"], r["batch_size"]) for r in records)
        kept = [r for r in previous["records"] if (r["model"], r["batch_size"]) not in measured]
        order = [(m, int(b)) for m in MODELS for b in (8, 32)]
        records = sorted(kept + records, key=lambda r: (order.index((r["model"], r["batch_size"]))
                                                         if (r["model"], r["batch_size"]) in order else len(order)))
        meta["updated_groups"] = sorted("{} batch {}".format(m, b) for m, b in measured)
        # The first run's provenance names the other groups' run; this run's names the update.
        if previous["meta"].get("provenance"):
            meta["provenance"] = previous["meta"]["provenance"]
            if args.provenance:
                meta["update_provenance"] = args.provenance
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    table = markdown(records, meta)
    with open(os.path.join(args.out_dir, "nano_{}.md".format(tag)), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
