"""torch.load without running code from the file: weight files and training
checkpoints are data, never code.

torch.load runs with weights_only=True where torch has it (1.13 and newer); on
older torch (the Jetson Nano's 1.10) an unpickler that resolves only what a
state_dict or a checkpoint of tensors needs (OrderedDict, the tensor rebuild
functions, the storage types) refuses everything else. Used by
models/backbones.py (weight files) and domains/checkpoint.py (checkpoints).
"""
import inspect
import pickle
import types

import torch

__all__ = ["restricted_pickle_module", "safe_torch_load", "torch_load_has_weights_only"]

# The globals a pickled state_dict refers to. Anything else in a file is refused.
_STATE_DICT_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
}
_STORAGE_TYPES = {
    "BFloat16Storage", "BoolStorage", "ByteStorage", "CharStorage", "DoubleStorage", "FloatStorage",
    "HalfStorage", "IntStorage", "LongStorage", "ShortStorage",
}


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a state_dict (the pattern of
    the pickle docs' "Restricting Globals"): a file that names anything else, e.g.
    os.system or a class with a __reduce__, fails instead of running it."""

    def find_class(self, module, name):
        if (module, name) in _STATE_DICT_GLOBALS or (module == "torch" and name in _STORAGE_TYPES):
            return super(_StateDictUnpickler, self).find_class(module, name)
        raise pickle.UnpicklingError(
            "refusing to load {}.{} from a weights file: only state_dicts (names -> tensors) "
            "are loaded".format(module, name))


def restricted_pickle_module():
    """A pickle_module for torch.load (which uses its Unpickler and load)."""
    module = types.ModuleType("da2ext_state_dict_pickle")

    def load(file, **kwargs):
        return _StateDictUnpickler(file, **kwargs).load()

    module.Unpickler = _StateDictUnpickler
    module.load = load
    return module


def torch_load_has_weights_only():
    """Whether this torch's torch.load takes weights_only (1.13 and newer)."""
    try:
        return "weights_only" in inspect.signature(torch.load).parameters
    except (TypeError, ValueError):  # pragma: no cover - a torch.load without a signature
        return False


def safe_torch_load(path):
    """torch.load(path) to the CPU without executing code from the file."""
    if torch_load_has_weights_only():
        return torch.load(path, map_location="cpu", weights_only=True)
    # torch < 1.13 (the Jetson Nano's 1.10) has no weights_only: restrict the unpickler instead.
    return torch.load(path, map_location="cpu", pickle_module=restricted_pickle_module())
