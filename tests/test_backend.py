"""Which implementation runs, and the reference fallback where no kernels exist."""
import importlib

import pytest
import torch

import da2ext
from da2ext.ops import _extension
from helpers import adaptor_pair

# the module of the op (da2ext.ops.residual_attention is the function)
op_module = importlib.import_module("da2ext.ops.residual_attention")


def test_cpu_kernels_are_built():
    # setup.py always builds the CPU kernels: a "reference" here means a broken build
    assert da2ext.backend("cpu") == "cpu"
    assert da2ext.backend(torch.device("cpu")) == "cpu"


def test_backend_names_a_known_implementation():
    assert da2ext.backend() in ("cpu", "cuda", "reference")
    assert da2ext.backend("meta") == "reference"


def test_fallback_runs_the_reference_with_a_warning(monkeypatch):
    fused, reference = adaptor_pair(6, mode="mul")
    monkeypatch.setattr(op_module, "kernels_available", lambda device_type: False)
    monkeypatch.setattr(_extension, "_warned", set())
    x = torch.randn(2, 6, 5, 5)
    with pytest.warns(RuntimeWarning, match="running the pure-PyTorch reference adaptor"):
        y = fused(x)
    assert torch.equal(y, reference(x))
