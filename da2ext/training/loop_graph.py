"""The training loop's steps replayed from a CUDA graph (`train --cuda-graph`,
train_domain(cuda_graph=True)).

On a large GPU a da2 step is bound by kernel launches and Python, not by
arithmetic (docs/gpu.md); replaying one captured step launches them all
at once. What the loop needs around da2ext.CUDAGraphStep:

- learning rates the graph reads at every replay: each group's rate is a
  one-element tensor on the device, which the warmup-cosine scheduler fills in
  place (a float rate would be a constant of the graph), with Adam built
  capturable=True;
- the first step eager (it counts what the forward keeps for backward), then
  the capture on that batch's shapes;
- a batch of other shapes (the short last one) run eagerly into the same
  gradient tensors, which the graph goes on writing;
- a capture that fails said once, the model and optimizer left as they were
  (CUDAGraphStep undoes its warm-up), and the rest of the run eager.

Where a graph cannot be used at all (not CUDA, a torch.distributed group, a
torch without capturable Adam taking a tensor rate) the run is eager and says why.
"""
import time
import warnings

import torch
import torch.nn.functional as F

__all__ = ["LoopGraph", "graph_unavailable", "learning_rates_as_tensors", "match_optimizer_to_run"]

# Adam with capturable=True taking a tensor learning rate (pytorch/pytorch#106916, in torch 2.1); 2.2 is
# the oldest this loop is meant for. Schedulers that assign floats instead of filling the tensor (before
# torch's in-place update) are covered by LoopGraph.keep_rates.
MIN_TORCH = (2, 2)


def _torch_version():
    parts = []
    for part in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def graph_unavailable(device, distributed=None):
    """None when the loop can replay its steps from a CUDA graph on `device`, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return "a CUDA graph needs a CUDA device, the model is on {}".format(device)
    if distributed is not None:
        return "not in a torch.distributed group (DistributedDataParallel's gradient hooks are not captured here)"
    if not hasattr(torch.cuda, "graph") or _torch_version() < MIN_TORCH:
        return "needs torch >= {}.{} (Adam with capturable=True and a tensor learning rate), this is torch {}".format(
            MIN_TORCH[0], MIN_TORCH[1], torch.__version__)
    return None


def _rate_tensor(rate, device):
    """A learning rate as a captured optimizer step reads it: a one-element float32 tensor on the device."""
    return torch.tensor(float(rate), dtype=torch.float32, device=device)


def learning_rates_as_tensors(param_groups, device):
    """The groups with each rate a one-element float32 tensor on `device`: the scheduler
    fills it in place and a captured optimizer step reads it at every replay. The
    scheduler's base rate (initial_lr) stays a float, so that it computes each
    step's rate on the host."""
    for group in param_groups:
        rate = float(group["lr"])
        group["initial_lr"] = rate
        group["lr"] = _rate_tensor(rate, device)
    return param_groups


def match_optimizer_to_run(optimizer, graphed, device):
    """After optimizer.load_state_dict (a checkpoint of a run graphed or not): the groups'
    rates and capturable flag as this run's optimizer was built (a tensor rate on the
    device and capturable=True when graphed, a float otherwise; initial_lr a float),
    and Adam's step counts where Adam keeps them (on the device when capturable)."""
    for group in optimizer.param_groups:
        rate = float(group["lr"])
        group["lr"] = _rate_tensor(rate, device) if graphed else rate
        if "initial_lr" in group:
            group["initial_lr"] = float(group["initial_lr"])
        if "capturable" in group:
            group["capturable"] = bool(graphed)
    # Where Adam keeps its step counts: on the device when capturable, on the host otherwise.
    home = torch.device(device) if graphed else torch.device("cpu")
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step) and step.device != home:
            state["step"] = step.to(device=home, dtype=torch.float32)


class LoopGraph(object):
    """The loop's steps through one CUDAGraphStep of `forward`, cross-entropy and
    `optimizer`: captured by capture(images, labels) after an eager step, then
    step(images, labels) replays it for every batch of the captured shapes and
    returns (loss, logits); a batch of other shapes returns None (run it eagerly
    with optimizer.zero_grad(set_to_none=False): the graph keeps writing the
    same gradient tensors). `failed` holds why the capture failed, if it did."""

    def __init__(self, forward, optimizer, warmup_steps=3):
        self.forward, self.optimizer, self.warmup_steps = forward, optimizer, warmup_steps
        self.graph_step = None
        self.rates = None  # the rate tensors the captured optimizer step reads
        self.failed = None
        self.replayed_steps = 0
        self.capture_seconds = None

    @property
    def captured(self):
        return self.graph_step is not None

    def capture(self, images, labels):
        """Capture the step on this batch's shapes; False (said once, the run going on eagerly)
        when it cannot be captured. The model and optimizer are as they were either way."""
        from .cuda_graph_step import CUDAGraphStep
        start = time.perf_counter()
        self.rates = []
        for group in self.optimizer.param_groups:
            if not torch.is_tensor(group["lr"]):  # a scheduler assigned a float (see keep_rates)
                group["lr"] = _rate_tensor(group["lr"], images.device)
            self.rates.append(group["lr"])
        try:
            self.graph_step = CUDAGraphStep(self.forward, F.cross_entropy, self.optimizer, images, labels,
                                            warmup_steps=self.warmup_steps)
        except (RuntimeError, ValueError) as error:
            self.failed = str(error)
            warnings.warn("--cuda-graph: the training step could not be captured, the run goes on eagerly "
                          "({})".format(self.failed.splitlines()[0][:300]), RuntimeWarning, stacklevel=2)
            return False
        self.capture_seconds = time.perf_counter() - start
        return True

    def keep_rates(self):
        """After the scheduler's step: each group's rate in the tensor the graph reads. Newer
        torch's schedulers fill a tensor rate in place; an older one's assigns a float, which
        would leave the graph stepping with the rate it was captured with."""
        if self.rates is None:
            return
        for group, rate in zip(self.optimizer.param_groups, self.rates):
            if group["lr"] is not rate:
                rate.fill_(float(group["lr"]))
                group["lr"] = rate

    def step(self, images, labels):
        """(loss, logits) of one replayed step, or None when the batch does not fit the graph."""
        if self.graph_step is None or not self.graph_step.fits(images, labels):
            return None
        loss = self.graph_step(images, labels)
        self.replayed_steps += 1
        return loss, self.graph_step.static_outputs

    def summary(self):
        """What the metrics record of the run's graph."""
        return {"captured": self.captured, "replayed_steps": self.replayed_steps,
                "capture_seconds": self.capture_seconds, "not_used": self.failed}

    @staticmethod
    def unused(reason):
        """What the metrics record of a run that could not use a graph, and why."""
        return {"captured": False, "replayed_steps": 0, "capture_seconds": None, "not_used": reason}
