"""Shared helpers of the test suite: devices to test on and matched module pairs."""
import pytest
import torch
from torch import nn

import da2ext


def kernel_devices():
    """Devices whose fused kernels are built and usable here (CUDA tests skip without a GPU)."""
    devices = ["cpu"]
    if torch.cuda.is_available() and da2ext.backend("cuda") == "cuda":
        devices.append("cuda")
    return devices


def all_devices():
    """cpu always; cuda as a skipped parameter where no GPU (or no CUDA build) is present."""
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(
        "cuda" not in kernel_devices(), reason="needs a CUDA GPU and a CUDA build of da2ext"))
    return ["cpu", cuda]


def adaptor_pair(channels, mode="add", spatial_kernel=3, reduction=16, seed=0, gamma_std=0.5):
    """A fused adaptor and a reference adaptor with the same random state, gamma non-zero."""
    torch.manual_seed(seed)
    fused = da2ext.ResidualAttentionAdaptor(channels, reduction=reduction, spatial_kernel=spatial_kernel, mode=mode)
    with torch.no_grad():
        nn.init.normal_(fused.gamma, std=gamma_std)
    reference = da2ext.reference.ResidualAttentionAdaptor(channels, reduction=reduction,
                                                          spatial_kernel=spatial_kernel, mode=mode)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference
