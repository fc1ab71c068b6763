"""Whether autocast is on for a device, and with which dtype, on every torch da2ext
runs on: torch >= 2.4 asks by device type (is_autocast_enabled("cpu")); torch 1.10
to 2.3 has one function per device (is_autocast_enabled() for CUDA,
is_autocast_cpu_enabled()). A RecomputedBlock's backward runs its forward again
under the autocast state its forward ran in."""
import torch

__all__ = ["autocast_state"]


def autocast_state(device_type):
    """(enabled, dtype) of autocast for `device_type` ("cpu", "cuda"; any other: off)."""
    try:
        return bool(torch.is_autocast_enabled(device_type)), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: no device argument
        pass
    if device_type == "cuda":
        return bool(torch.is_autocast_enabled()), torch.get_autocast_gpu_dtype()
    if device_type == "cpu" and hasattr(torch, "is_autocast_cpu_enabled"):
        return bool(torch.is_autocast_cpu_enabled()), torch.get_autocast_cpu_dtype()
    return False, None
