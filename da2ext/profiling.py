"""Counting what autograd keeps for backward and what a training step costs
(docs/design.md §4: saved_bytes, param_bytes, grad_bytes, optimizer_bytes,
peak_cuda_bytes, step_time).

Convention for saved_bytes: every distinct storage autograd holds, except the
storages of `exclude`. profile_step excludes the model's own state (its
parameters and buffers, frozen or trainable): they are in memory whether or not
a step runs and are reported as param_bytes, so a conv that keeps its weight
for backward is not charged for it twice. What is left is what exists only
because a forward ran: activations, masks, indices, descriptors. docs/design.md §1's
rows for frozen models are measured this way (656 MiB for ResNet-50 here); its
full fine-tuning row (753 MiB) also counts the trainable weights, which this
convention reports as param_bytes instead (656 MiB of activations here).

A tool of every layer - the trainable tail's memory budget (lean/), the
MultiDomainModel (domains/), the training loop (training/), the nano table
(cli/) - so it belongs to none of them.
"""
import itertools
import platform
import time

import torch

__all__ = ["SavedTensorCounter", "device_description", "device_of", "model_state", "profile_step", "saved_bytes",
           "storage_key_and_bytes", "synchronize"]


def storage_key_and_bytes(t):
    """(device, storage address), bytes of the storage under tensor t: what identifies it once."""
    # untyped_storage() is torch >= 2.0; storage() is the torch 1.10 spelling.
    if hasattr(t, "untyped_storage"):
        storage = t.untyped_storage()
        return (t.device, storage.data_ptr()), storage.nbytes()
    storage = t.storage()
    return (t.device, storage.data_ptr()), storage.size() * t.element_size()


class SavedTensorCounter(object):
    """Context manager counting the distinct storages saved for backward by the
    autograd graph built inside it (torch.autograd.graph.saved_tensors_hooks),
    except the storages of the tensors in `exclude`.

        with SavedTensorCounter() as counter:
            loss = model(x).sum()
        counter.saved_bytes
    """

    def __init__(self, exclude=()):
        self._storages = {}
        self._excluded = set(storage_key_and_bytes(t)[0] for t in exclude)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        key, nbytes = storage_key_and_bytes(t)
        if key not in self._excluded:
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


def model_state(model):
    """The model's own tensors: parameters (frozen or not) and buffers (running
    statistics, folded weights)."""
    return list(model.parameters()) + list(model.buffers())


def _tensor_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        key, nbytes = storage_key_and_bytes(t)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def _optimizer_bytes(optimizer):
    return _tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.numel() > 0)


def synchronize(device):
    """Wait for the device's queued work (CUDA runs asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device):
    """How a results file names the machine a figure was measured on: the GPU's name,
    or the CPU's architecture and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU ({}, {} threads)".format(platform.processor() or platform.machine(), torch.get_num_threads())


def device_of(model):
    """The device of a model's tensors (buffers first: a lean backbone keeps its weights there)."""
    return next(itertools.chain(model.buffers(), model.parameters())).device


def profile_step(model, inputs, targets, loss_fn, optimizer, warmup=1, steps=3):
    """Run training steps of `model` on one batch and measure docs/design.md §4's figures.

    A step is: zero_grad, forward, loss_fn(output, targets), backward,
    optimizer.step(). `warmup` steps run first (allocator, optimizer state), then
    one step inside a SavedTensorCounter and with CUDA peak statistics reset,
    then `steps` timed steps. Returns a dict:
      saved_bytes      kept for backward after the forward (the model's own state excluded, see above)
      param_bytes      all parameters and buffers of the model (frozen included)
      grad_bytes       the .grad tensors after a step
      optimizer_bytes  the optimizer's state tensors
      peak_cuda_bytes  torch.cuda.max_memory_allocated over one whole step; None on the CPU
      step_time        median seconds per step over the timed steps
    """
    device = inputs.device

    def step(counter=None):
        optimizer.zero_grad()
        if counter is None:
            loss = loss_fn(model(inputs), targets)
        else:
            with counter:
                loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    peak = None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter = SavedTensorCounter(exclude=model_state(model))
    step(counter)
    if device.type == "cuda":
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "saved_bytes": counter.saved_bytes,
        "param_bytes": _tensor_bytes(list(model.parameters()) + list(model.buffers())),
        "grad_bytes": _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_bytes": _optimizer_bytes(optimizer),
        "peak_cuda_bytes": peak,
        "step_time": times[len(times) // 2] if times else None,
    }
