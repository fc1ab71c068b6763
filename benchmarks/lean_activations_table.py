"""What backward keeps for the nonlinearities beyond ReLU, and the gradient error of each choice.

    python benchmarks/lean_activations_table.py --tag cpu-2cores

Two tables (docs/design.md §3, "Blocks beyond ReLU"):

1. Per nonlinearity (SiLU, hardswish, GELU after a frozen BN; a squeeze-excitation
   gate, sigmoid and hard sigmoid; torchvision's LayerNorm2d), at 8 x 64 x 28 x 28:
   bytes per input element that plain autograd keeps, that a RecomputedBlock keeps
   (its input: exact) and that it keeps in float16 or bfloat16; and the relative
   error of the input and shift gradients against float64 autograd (the float32
   plain row is the rounding floor every float32 choice shares).
2. Per real block at its size in a 224 x 224, batch-8 step (torchvision's
   EfficientNet-B0 MBConv, MobileNetV3-Large inverted residual with its SE,
   ConvNeXt-T CNBlock): the same bytes and errors, and the recompute's transient
   (what the block's forward, run again, keeps while the block's own backward runs:
   its nonlinearities' inputs, not its frozen convs' and BNs') and the forward +
   backward time, plain against recomputed.

Writes benchmarks/results/lean_activations_<tag>.json and .md.
"""
import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import da2ext  # noqa: E402
from da2ext.lean.kept_bytes import largest_recompute_transient  # noqa: E402
from da2ext.lean.recomputed_block import RecomputedBlock  # noqa: E402
from da2ext.profiling import SavedTensorCounter, device_description, model_state  # noqa: E402
from provenance import git_commit, rerun_command, write_table  # noqa: E402
from step_time_processes import median  # noqa: E402

# What each row keeps: plain autograd, or a RecomputedBlock keeping its input in a dtype (None: as it is).
CHOICES = [("plain autograd", "plain", None), ("recomputed", "recomputed", None),
           ("recomputed, float16 input", "recomputed", torch.float16),
           ("recomputed, bfloat16 input", "recomputed", torch.bfloat16)]


def _frozen_with_shifts(module):
    """Frozen, eval mode, the norms' shifts (bias) trainable, as adapt() leaves a block."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.bias is not None:
            m.bias.requires_grad_(True)
    return module


def _randomised(module, seed):
    """Random BN statistics and affine values (so folding and shifts matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.3)
    return module


def nonlinearities():
    """(name, module, input shape) for table 1."""
    from torchvision.models.convnext import LayerNorm2d
    from torchvision.ops import SqueezeExcitation
    channels, shape = 64, (8, 64, 28, 28)
    return [
        ("BN + SiLU", nn.Sequential(nn.BatchNorm2d(channels), nn.SiLU()), shape),
        ("BN + hardswish", nn.Sequential(nn.BatchNorm2d(channels), nn.Hardswish()), shape),
        ("BN + GELU", nn.Sequential(nn.BatchNorm2d(channels), nn.GELU()), shape),
        ("squeeze-excitation, sigmoid gate", SqueezeExcitation(channels, channels // 4), shape),
        ("squeeze-excitation, hard sigmoid gate",
         SqueezeExcitation(channels, channels // 4, scale_activation=nn.Hardsigmoid), shape),
        ("LayerNorm2d", LayerNorm2d(channels), shape),
    ]


def blocks():
    """(name, module, input shape) for table 2: real blocks at their place in a 224 x 224 batch of 8."""
    import torchvision
    efficientnet = torchvision.models.efficientnet_b0()
    mobilenet = torchvision.models.mobilenet_v3_large()
    convnext = torchvision.models.convnext_tiny()
    return [
        ("EfficientNet-B0 MBConv (SiLU, SE), features.2.0", efficientnet.features[2][0], (8, 16, 112, 112)),
        ("EfficientNet-B0 MBConv (SiLU, SE), features.4.1", efficientnet.features[4][1], (8, 80, 14, 14)),
        ("MobileNetV3-L inverted residual (hardswish, SE), features.13", mobilenet.features[13], (8, 112, 14, 14)),
        ("MobileNetV3-L inverted residual (ReLU, SE), features.4", mobilenet.features[4], (8, 24, 56, 56)),
        ("ConvNeXt-T CNBlock (LayerNorm, GELU), features.1.0", convnext.features[1][0], (8, 96, 56, 56)),
    ]


def _gradients(module, x, w):
    """Input gradient and trainable gradients of <module(x), w>, as one flat list."""
    module.zero_grad()
    xi = x.detach().clone().requires_grad_(True)
    (module(xi) * w.to(x.dtype)).sum().backward()
    return [xi.grad] + [p.grad for p in module.parameters() if p.requires_grad]


def _relative_error(got, reference):
    """The largest, over the input and every shift, of |got - ref| / |ref| (2-norms)."""
    return max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, reference) if r.norm() > 0)


def _kept_bytes(module, x):
    with SavedTensorCounter(exclude=model_state(module)) as counter:
        module(x.detach().requires_grad_(True))
    return counter.saved_bytes


def _step_time(module, x, w, runs):
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        _gradients(module, x, w)
        times.append(time.perf_counter() - start)
    return median(times[1:])


def measure(table, entries, runs, seed=0):
    records = []
    for index, (name, module, shape) in enumerate(entries):
        module = _frozen_with_shifts(_randomised(module, seed + index))
        generator = torch.Generator().manual_seed(seed + 100 + index)
        x64 = torch.randn(shape, generator=generator, dtype=torch.float64)
        reference = copy.deepcopy(module).double()
        w = torch.randn(reference(x64).shape, generator=generator, dtype=torch.float64)
        expected = _gradients(reference, x64, w)
        x = x64.float()
        plain_bytes = None
        for label, how, keep_dtype in CHOICES:
            candidate = copy.deepcopy(module)
            if how == "recomputed":
                candidate = RecomputedBlock(candidate, keep_dtype=keep_dtype)
            kept = _kept_bytes(candidate, x)
            plain_bytes = kept if how == "plain" else plain_bytes
            record = {"table": table, "what": name, "shape": list(shape), "kept": label, "kept_bytes": kept,
                      "bytes_per_input_element": kept / float(x.numel()),
                      "vs_plain": kept / float(plain_bytes),
                      "gradient_error": _relative_error(_gradients(candidate, x, w), expected)}
            if table == "blocks":
                # what the recompute keeps while the block's own backward runs
                transient = largest_recompute_transient(candidate, x) if how == "recomputed" else None
                record["recompute_transient_bytes"] = transient["transient_bytes"] if transient else 0
                if keep_dtype is None:
                    record["step_time"] = _step_time(candidate, x, w, runs)
            records.append(record)
    return records


def markdown(records, meta):
    mib = 2.0 ** 20
    lines = ["# What backward keeps beyond ReLU: plain autograd against RecomputedBlock", "",
             "{} · torch {} · da2ext {} · commit {}; rerun: `{}`.".format(
                 meta["device"], meta["torch"], meta["da2ext"], meta["commit"], meta["command"]), "",
             "kept = bytes autograd keeps for backward after the forward (the module's own weights excluded); "
             "error = max over the input gradient and each norm shift's gradient of the relative 2-norm error "
             "against float64 autograd of the same module (float32 input). A RecomputedBlock keeping its input as "
             "it is has float32 rounding alone, as plain autograd; a float16 or bfloat16 copy adds that "
             "rounding to the recomputed forward.", "",
             "## Per nonlinearity (8 x 64 x 28 x 28)", "",
             "| nonlinearity | kept | bytes per input element | vs plain | gradient error |",
             "| --- | --- | --- | --- | --- |"]
    for r in records:
        if r["table"] == "nonlinearities":
            lines.append("| {} | {} | {:.2f} | {:.2f} | {:.1e} |".format(
                r["what"], r["kept"], r["bytes_per_input_element"], r["vs_plain"], r["gradient_error"]))
    lines += ["", "## Per block, at its place in a 224 x 224 step of batch 8", "",
              "transient = what the block's recompute keeps while its own backward runs (its nonlinearities' "
              "inputs; freed before the next block's backward); time = forward + backward of the "
              "block, median of {} runs.".format(meta["runs"]), "",
              "| block | input | kept | kept MiB | vs plain | transient MiB | gradient error | time ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r["table"] == "blocks":
            lines.append("| {} | {} | {} | {:.2f} | {:.3f} | {:.2f} | {:.1e} | {} |".format(
                r["what"], "x".join(str(d) for d in r["shape"]), r["kept"], r["kept_bytes"] / mib, r["vs_plain"],
                r["recompute_transient_bytes"] / mib, r["gradient_error"],
                "{:.1f}".format(1e3 * r["step_time"]) if "step_time" in r else "-"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed forward + backward calls per block (median)")
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--blocks", default="all", choices=["all", "first"],
                        help="first: only the first real block (a short run)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    real_blocks = blocks()
    if args.blocks == "first":
        real_blocks = real_blocks[:1]
    records = measure("nonlinearities", nonlinearities(), args.runs) + measure("blocks", real_blocks, args.runs)
    meta = {"device": device_description("cpu"), "torch": torch.__version__, "da2ext": da2ext.__version__,
            "commit": git_commit(), "runs": args.runs,
            "command": rerun_command("benchmarks/lean_activations_table.py", sys.argv[1:] if argv is None else argv)}
    write_table(args.out_dir, "lean_activations_" + args.tag, {"meta": meta, "records": records},
                markdown(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
