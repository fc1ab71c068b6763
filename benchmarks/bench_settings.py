"""What the pytest-benchmark suites share: the devices and dtypes they run, their
rounds (from the environment), and how they name devices and shapes.

Environment variables:
    DA2EXT_BENCH_ROUNDS      timed rounds (default 10 on CPU, 50 on CUDA)
    DA2EXT_BENCH_ITERATIONS  calls per round (default 1 on CPU, 5 on CUDA)
    DA2EXT_BENCH_WARMUP      untimed warm-up rounds (default 2 on CPU, 5 on CUDA)
    DA2EXT_BENCH_THREADS     torch.set_num_threads for the CPU runs (default: torch's default)
"""
import os
import platform

import pytest
import torch

import da2ext

__all__ = ["DEVICE_DTYPES", "device_name", "pedantic_settings", "shape_id"]

if os.environ.get("DA2EXT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["DA2EXT_BENCH_THREADS"]))


def _cuda_kernels_available():
    return torch.cuda.is_available() and da2ext.backend("cuda") == "cuda"


def _cuda_skip_reason():
    if _cuda_kernels_available():
        return "CUDA kernels available"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return "da2ext was built without CUDA kernels (da2ext.backend('cuda') == {!r})".format(da2ext.backend("cuda"))


_needs_cuda = pytest.mark.skipif(not _cuda_kernels_available(), reason=_cuda_skip_reason())

# float32 everywhere, float16 only on CUDA (the CPU kernels are not meant for half precision).
DEVICE_DTYPES = [
    pytest.param("cpu", "float32", id="cpu-float32"),
    pytest.param("cuda", "float32", id="cuda-float32", marks=_needs_cuda),
    pytest.param("cuda", "float16", id="cuda-float16", marks=_needs_cuda),
]


def _env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value else default


def pedantic_settings(device):
    """benchmark.pedantic's rounds, iterations and warm-up rounds for `device`."""
    cuda = device == "cuda"
    return dict(
        rounds=_env_int("DA2EXT_BENCH_ROUNDS", 50 if cuda else 10),
        iterations=_env_int("DA2EXT_BENCH_ITERATIONS", 5 if cuda else 1),
        warmup_rounds=_env_int("DA2EXT_BENCH_WARMUP", 5 if cuda else 2),
    )


def training_step(module, x, grad_output):
    """A closure for benchmark.pedantic: one training step of `module` on `x` (forward,
    then backward of `grad_output`) that returns the output. Gradients start fresh each
    call, so no step pays for accumulating into old ones; on CUDA it waits for the GPU."""
    cuda = x.device.type == "cuda"

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        y = module(x)
        y.backward(grad_output)
        if cuda:
            torch.cuda.synchronize()
        return y

    return step


def _cpu_name():
    name = platform.processor()
    if name:
        return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except (IOError, OSError):
        pass
    return platform.machine() or "cpu"


def device_name(device):
    """The GPU's name, or the CPU model."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_name()


def shape_id(shape):
    return "x".join(str(s) for s in shape)
