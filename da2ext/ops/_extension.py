"""Loading of the compiled kernels (da2ext._C) and the choice of backend.

The extension registers its ops with the torch dispatcher as torch.ops.da2ext.*.
Where it is missing (a source checkout that was not built) or was built without
CUDA kernels, the fused adaptor falls back to the pure-PyTorch reference: the
same maths, more memory kept for backward. backend() tells which runs.

An extension built against one torch and loaded under another either fails to
load (an undefined symbol) or loads and may misbehave; either way the import
warns, naming both versions and the rebuild command (build_mismatch).
"""
import warnings

import torch

REBUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall ."

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.da2ext.*)

    _IMPORT_ERROR = None
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    _C = None
    _IMPORT_ERROR = error

_warned = set()

# What torch.compile and torch.export need to trace the ops (fake_kernels.py).
FAKE_KERNELS = ()
if _C is not None:
    from .fake_kernels import register_fake_kernels

    FAKE_KERNELS = register_fake_kernels()


def recorded_build_info():
    """What the extension was built with: from the extension itself when it loads
    (_C.build_info()), else from the _build_info.py its build wrote beside it;
    None when neither exists (a checkout that was never built)."""
    if _C is not None and hasattr(_C, "build_info"):
        return dict(_C.build_info())
    try:
        from .._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def build_mismatch(info, running=None):
    """The warning for an extension built against another torch than `running`
    (torch.__version__ by default), or None when they agree or nothing is known."""
    running = torch.__version__ if running is None else running
    built = (info or {}).get("torch")
    if not built or built == running:
        return None
    loaded = "it loaded, but may crash or compute wrongly" if _C is not None else \
        "it cannot be loaded ({}), so the pure-PyTorch reference runs instead".format(_IMPORT_ERROR)
    return ("da2ext: the compiled extension was built against torch {} but this is torch {}; {}. Rebuild it "
            "against this torch, from da2ext's source directory: {} (add -e for a development install)".format(
                built, running, loaded, REBUILD_COMMAND))


_MISMATCH = build_mismatch(recorded_build_info())
if _MISMATCH is not None:
    warnings.warn(_MISMATCH, RuntimeWarning, stacklevel=2)


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
