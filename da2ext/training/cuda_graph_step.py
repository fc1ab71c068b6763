"""One whole training step (forward, loss, backward, optimizer step) captured once
as a CUDA graph and replayed for every batch.

On a large GPU the lean model's step is bound by kernel launches and Python, not
by arithmetic: at batch 8 on an H100 ResNet-50's da2 step launches several hundred
small kernels (each adaptor about six of its own, plus the small branch's
PyTorch ops) and takes about twice ft's time (README, nano_h100.md). Replaying a
captured graph launches them all with one call, from no Python at all. This is
PyTorch's "whole network capture" (torch.cuda.graphs), with the chores a user
would otherwise get wrong done here: warm-up on a side stream, the model and
optimizer put back as they were before the warm-up, checks that each batch
matches the captured shapes, and an error when a float learning rate, baked into
the graph at capture, has changed since.

    step = CUDAGraphStep(model, nn.CrossEntropyLoss(), optimizer, inputs, targets)
    for inputs, targets in loader:          # every batch the shape of the first
        loss = step(inputs, targets)        # overwritten by the next step: .item() or .clone() it

What a graph needs of the step: every tensor on one CUDA device, fixed shapes,
no synchronisation with the host inside it (the da2ext kernels and the lean
backbone have none), and an optimizer that can be captured (SGD; Adam and AdamW
built with capturable=True).
"""
import torch

__all__ = ["CUDAGraphStep"]


def _optimizer_state_tensors(optimizer):
    """[(param_state dict, key)] of every tensor in the optimizer's state."""
    found = []
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                found.append((state, key))
    return found


def _float_learning_rates(optimizer):
    """The learning rates the graph bakes in as constants (floats; tensor rates are read on replay)."""
    return [None if torch.is_tensor(group.get("lr")) else group.get("lr") for group in optimizer.param_groups]


def _check_cuda_tensor(name, tensor, device=None):
    if not torch.is_tensor(tensor):
        raise TypeError("CUDAGraphStep: {} must be a tensor, got {}".format(name, type(tensor).__name__))
    if tensor.device.type != "cuda":
        raise ValueError("CUDAGraphStep: {} must be on a CUDA device (a CUDA graph replays GPU work), "
                         "got a tensor on {}".format(name, tensor.device))
    if device is not None and tensor.device != device:
        raise ValueError("CUDAGraphStep: {} is on {}, the inputs on {}: put everything on one device".format(
            name, tensor.device, device))


class CUDAGraphStep(object):
    """A training step of `model` captured as a CUDA graph; call it with a batch.

    model, loss_fn, optimizer: as in an ordinary step (loss_fn(model(inputs), targets),
        then backward, then optimizer.step()); the model's tensors and the
        example batch on one CUDA device.
    example_inputs, example_targets: a batch of the shapes and dtypes every later
        batch will have (copied into the graph's own input tensors).
    warmup_steps: steps run on a side stream before capture (cuDNN's algorithm
        choice, autograd's and the optimizer's lazy state). They change nothing
        the caller sees: parameters, buffers and existing optimizer state are
        copied back afterwards, and optimizer state the warm-up created is zeroed
        in place, which is what a fresh state means for SGD without dampening and
        for Adam/AdamW (capturable=True). That takes a transient copy of the
        model's parameters and buffers. A capture that fails raises
        RuntimeError and leaves the model and optimizer as they were too (the
        parameters' .grad set to None), so that the caller can go on eagerly.

    Calling it copies the batch into the graph's inputs, replays the graph and
    returns the loss tensor, which the next call overwrites, as it does the
    model's outputs in `static_outputs`; `fits(inputs, targets)` says whether a
    batch has the captured shapes and dtypes. Gradients stay in
    the parameters' .grad as after an ordinary step (replaced on every call, not
    accumulated; do not set them to None with zero_grad, the graph keeps
    writing where they were). Learning rates given as floats are constants of the graph: a
    scheduler that changes one makes the next call raise (build a new
    CUDAGraphStep, or give Adam/AdamW a tensor lr with capturable=True).
    """

    def __init__(self, model, loss_fn, optimizer, example_inputs, example_targets, warmup_steps=3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphStep needs CUDA, which this torch does not see (torch.cuda.is_available() "
                               "is False); run the step as usual on the CPU")
        if not hasattr(torch.cuda, "graph"):
            raise RuntimeError("CUDAGraphStep needs torch.cuda.graph (torch >= 1.10), this is torch {}".format(
                torch.__version__))
        _check_cuda_tensor("example_inputs", example_inputs)
        device = example_inputs.device
        _check_cuda_tensor("example_targets", example_targets, device)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            _check_cuda_tensor("model tensor {}".format(name), tensor, device)
        not_capturable = [i for i, group in enumerate(optimizer.param_groups) if group.get("capturable") is False]
        if not_capturable:
            raise ValueError("CUDAGraphStep: optimizer ({}) has capturable=False in param groups {}: build it with "
                             "capturable=True so that its step can be captured".format(
                                 type(optimizer).__name__, not_capturable))
        if int(warmup_steps) < 1:
            raise ValueError("CUDAGraphStep: warmup_steps must be >= 1 (capture needs the lazy state made), "
                             "got {}".format(warmup_steps))
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.static_inputs = example_inputs.detach().clone()
        self.static_targets = example_targets.detach().clone()

        with torch.no_grad():
            model_state = [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())]
            optimizer_state = dict(((id(state), key), state[key].clone())
                                   for state, key in _optimizer_state_tensors(optimizer))
        self.graph = None
        try:
            self._warm_up_and_capture(device, int(warmup_steps))
        finally:
            # Whether or not the capture worked, undo the warm-up in place (capturing runs nothing): the
            # caller's model and optimizer are as they were, and after a failed capture an eager step
            # goes on from there. The graph holds these tensors' addresses.
            with torch.no_grad():
                for tensor, saved in model_state:
                    tensor.copy_(saved)
                for state, key in _optimizer_state_tensors(optimizer):
                    saved = optimizer_state.get((id(state), key))
                    if saved is None:
                        state[key].zero_()
                    else:
                        state[key].copy_(saved)
            torch.cuda.synchronize(device)
        self._learning_rates = _float_learning_rates(optimizer)

    def _warm_up_and_capture(self, device, warmup_steps):
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            for _ in range(warmup_steps):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side_stream)

        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward inside the capture makes .grad in the graph's memory
        try:
            with torch.cuda.graph(graph):
                self.static_loss = self._step(zero_grad=False)
        except RuntimeError as error:
            # The gradients the failed capture left are not to be read; an eager step makes new ones.
            self.optimizer.zero_grad(set_to_none=True)
            raise RuntimeError("CUDAGraphStep: capturing the step failed. Something in the model, the loss or the "
                               "optimizer synchronises with the host (.item(), printing a tensor, a data-dependent "
                               "shape) or cannot be captured. PyTorch said: {}".format(error))
        self.graph = graph

    def _step(self, zero_grad=True):
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        self.static_outputs = self.model(self.static_inputs)
        loss = self.loss_fn(self.static_outputs, self.static_targets)
        loss.backward()
        self.optimizer.step()
        return loss

    def fits(self, inputs, targets):
        """Whether a batch has the captured shapes and dtypes (so that calling with it replays)."""
        return all(torch.is_tensor(batch) and batch.shape == static.shape and batch.dtype == static.dtype
                   for batch, static in ((inputs, self.static_inputs), (targets, self.static_targets)))

    def _copy_in(self, name, static, batch):
        if not torch.is_tensor(batch):
            raise TypeError("CUDAGraphStep: {} must be a tensor, got {}".format(name, type(batch).__name__))
        if batch.shape != static.shape or batch.dtype != static.dtype:
            raise ValueError("CUDAGraphStep: {} must be {} {} as captured, got {} {} (a graph replays fixed shapes; "
                             "drop or pad a short last batch)".format(name, static.dtype, tuple(static.shape),
                                                                      batch.dtype, tuple(batch.shape)))
        static.copy_(batch, non_blocking=True)

    def __call__(self, inputs, targets):
        learning_rates = _float_learning_rates(self.optimizer)
        if learning_rates != self._learning_rates:
            raise ValueError("CUDAGraphStep: the optimizer's learning rates changed since capture ({} -> {}); the "
                             "graph keeps the captured ones. Build a new CUDAGraphStep after changing them".format(
                                 self._learning_rates, learning_rates))
        self._copy_in("inputs", self.static_inputs, inputs)
        self._copy_in("targets", self.static_targets, targets)
        self.graph.replay()
        return self.static_loss
