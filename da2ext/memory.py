"""Counting what autograd keeps for backward (DESIGN.md §4, saved_bytes)."""
import torch

__all__ = ["SavedTensorCounter", "saved_bytes"]


def _storage_key_and_bytes(t):
    # untyped_storage() is torch >= 2.0; storage() is the torch 1.10 spelling.
    if hasattr(t, "untyped_storage"):
        storage = t.untyped_storage()
        return (t.device, storage.data_ptr()), storage.nbytes()
    storage = t.storage()
    return (t.device, storage.data_ptr()), storage.size() * t.element_size()


class SavedTensorCounter(object):
    """Context manager counting the distinct storages saved for backward by the
    autograd graph built inside it (torch.autograd.graph.saved_tensors_hooks).

        with SavedTensorCounter() as counter:
            loss = model(x).sum()
        counter.saved_bytes
    """

    def __init__(self):
        self._storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        key, nbytes = _storage_key_and_bytes(t)
        self._storages[key] = nbytes
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def saved_bytes(self):
        return sum(self._storages.values())

    @property
    def saved_tensors(self):
        return len(self._storages)


def saved_bytes(fn, *args, **kwargs):
    """Bytes of the distinct storages that `fn(*args, **kwargs)` saves for backward."""
    with SavedTensorCounter() as counter:
        fn(*args, **kwargs)
    return counter.saved_bytes
