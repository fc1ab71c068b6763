"""The file one domain is kept in: its tensors and a JSON metadata record.

The format is safetensors (tensors + a string-to-string metadata map, whose
"da2ext" entry holds the JSON record). Where safetensors cannot be installed
(docs/design.md §7: Python 3.6 on a Jetson), numpy's .npz is the fallback, loaded
with allow_pickle=False, the JSON record stored as a uint8 array. Either way,
loading never runs code from the file. Writes are atomic (atomic_file.py).
Which format a file is in is read from its first bytes, not its name.
"""
import io
import json
import os
import struct

import numpy as np
import torch

from .atomic_file import atomic_write

__all__ = ["DomainFileError", "read_domain_file", "write_domain_file"]

_METADATA_KEY = "da2ext"
_NPZ_METADATA = "__da2ext_metadata__"
_ZIP_MAGIC = b"PK\x03\x04"


class DomainFileError(ValueError):
    """A domain file that is damaged, not a da2ext domain file, or made for
    another model."""


def _safetensors():
    try:
        import safetensors.torch
        return safetensors.torch
    except ImportError:
        return None


def write_domain_file(path, tensors, metadata, use_safetensors=None):
    """Atomically write `tensors` (name -> tensor) and `metadata` (JSON-able)."""
    tensors = dict((name, t.detach().cpu().contiguous()) for name, t in tensors.items())
    record = json.dumps(metadata, sort_keys=True)
    st = _safetensors() if use_safetensors in (None, True) else None
    if use_safetensors and st is None:
        raise ImportError("safetensors is not installed: pip install safetensors")
    if st is not None:
        payload = st.save(tensors, metadata={_METADATA_KEY: record})
        atomic_write(path, lambda f: f.write(payload))
        return
    arrays = dict((name, t.numpy()) for name, t in tensors.items())
    arrays[_NPZ_METADATA] = np.frombuffer(record.encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _read_safetensors(data, path):
    st = _safetensors()
    if st is None:
        raise DomainFileError("{} is a safetensors file; reading it needs safetensors: pip install safetensors"
                              .format(path))
    # The header: 8-byte little-endian length, then JSON with "__metadata__".
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise DomainFileError("{} is truncated or not a da2ext domain file (header of {} bytes, file of {})".format(path, header_length,
                                                                                        len(data)))
    header = json.loads(data[8:8 + header_length].decode("utf-8"))
    record = header.get("__metadata__", {}).get(_METADATA_KEY)
    if record is None:
        raise DomainFileError("{} is a safetensors file but not a da2ext domain file (no {!r} metadata)".format(
            path, _METADATA_KEY))
    tensors = st.load(data)
    return tensors, json.loads(record)


def _read_npz(data, path):
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if _NPZ_METADATA not in npz.files:
            raise DomainFileError("{} is an .npz file but not a da2ext domain file".format(path))
        record = json.loads(npz[_NPZ_METADATA].tobytes().decode("utf-8"))
        tensors = dict((name, torch.from_numpy(npz[name].copy())) for name in npz.files if name != _NPZ_METADATA)
    return tensors, record


def read_domain_file(path):
    """(tensors, metadata) from a domain file; DomainFileError if it is damaged or
    not a domain file."""
    if os.path.isdir(path):
        raise DomainFileError("{} is a directory, not a da2ext domain file".format(path))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except OSError as error:  # unreadable: permissions, a device, ...
        raise DomainFileError("{} cannot be read: {}".format(path, error))
    if len(data) < 8:
        raise DomainFileError("{} is not a da2ext domain file ({} bytes)".format(path, len(data)))
    try:
        tensors, record = _read_npz(data, path) if data[:4] == _ZIP_MAGIC else _read_safetensors(data, path)
        if not isinstance(record, dict):
            raise DomainFileError("{} is not a da2ext domain file: its metadata is a JSON {}, not an object".format(
                path, type(record).__name__))
        return tensors, record
    except DomainFileError:
        raise
    except Exception as error:  # safetensors, zipfile, json and numpy each raise their own
        raise DomainFileError("{} is damaged or not a da2ext domain file: {}: {}".format(
            path, type(error).__name__, error))
