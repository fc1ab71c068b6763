"""Training checkpoints: what a run needs to continue after an interruption as if
it had never stopped, written so that an interruption during the write loses
nothing, and read without running code from the file.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, written
with torch.save through atomic_write. It is read with torch.load(weights_only=True)
where torch has it (1.13 and newer), otherwise (the Jetson Nano's torch 1.10)
with the restricted unpickler of safe_load.py, which resolves only what tensors
need and refuses every other global.
"""
import io
import os

import torch

from .atomic_file import atomic_write
from .safe_load import safe_torch_load

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(path, state):
    """Atomically write `state` (tensors, numbers, strings, None, lists, dicts) to path."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_checkpoint(path):
    """The dict saved by save_checkpoint, on the CPU; None if path does not exist."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise ValueError("{} is not a da2ext training checkpoint".format(path))
    return state
