"""Loading of the compiled kernels (da2ext._C) and the choice of backend.

The extension registers its ops with the torch dispatcher as torch.ops.da2ext.*.
Where it is missing (a source checkout that was not built) or was built without
CUDA kernels, the fused adaptor falls back to the pure-PyTorch reference: the
same maths, more memory kept for backward. backend() tells which runs.
"""
import warnings

import torch

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.da2ext.*)

    _IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    _C = None
    _IMPORT_ERROR = error

_warned = set()


def kernels_available(device_type):
    """Whether fused kernels exist for tensors on `device_type` ("cpu" or "cuda")."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.built_with_cuda())
    return False


def backend(device=None):
    """Which implementation runs the adaptor on `device`: "cuda", "cpu" or "reference".

    `device` defaults to the current CUDA device when one is available, else the CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return device_type if kernels_available(device_type) else "reference"


def warn_fallback(device_type):
    """Warn once per device type that the reference path runs instead of the kernels."""
    if device_type in _warned:
        return
    _warned.add(device_type)
    if _C is None:
        why = "the compiled extension da2ext._C could not be imported ({})".format(_IMPORT_ERROR)
    else:
        why = "da2ext was built without kernels for {} tensors".format(device_type)
    warnings.warn(
        "da2ext: running the pure-PyTorch reference adaptor because {}; it computes the same "
        "result but keeps full-size tensors for backward. Rebuild with "
        "`pip install --no-build-isolation .` (FORCE_CUDA=1 for the CUDA kernels).".format(why),
        RuntimeWarning,
        stacklevel=3,
    )
