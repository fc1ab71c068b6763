"""RecomputedBlock: the lean form of a frozen block whose activations need more than a
sign bit for backward (SiLU, hardswish, GELU, squeeze-excitation, LayerNorm:
docs/design.md §3, "Blocks beyond ReLU").

A frozen block's weights need no gradient, so its backward needs only what the
derivatives of its nonlinearities read. For a ReLU that is a sign bit
(FrozenConvBNAct). For the others it is a full tensor at the block's widest point:
SiLU's and GELU's derivatives read the pre-activation, a squeeze-excitation's gate
gradient reads the whole gated map, a LayerNorm's input gradient reads the
normalised input. An inverted-residual block has two or three of these at six times
its input's channels; a ConvNeXt block a LayerNorm and a GELU at four times.

So this block keeps its input alone (1/6 or 1/4 of one of those tensors) and runs
its forward again under autograd in backward, in the same eval mode and with the
same forward arithmetic, so the gradients are plain autograd's (to rounding: the
convs' and BNs' input gradients are computed apart, input_grad_only.py). The price:
one more forward of the block per step, and, while a block's backward runs, what
that recompute keeps: the inputs of the block's SiLUs, GELUs, squeeze-excitations and
LayerNorms, not of its frozen convs and BNs (largest_recompute_transient measures it).
"""
import contextlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .autocast_state import autocast_state
from .input_grad_only import keep_nothing_inside

__all__ = ["KEEP_DTYPES", "RecomputedBlock"]


# The compact dtypes a RecomputedBlock may keep its input in (None: the input's own, exact).
KEEP_DTYPES = (None, torch.float16, torch.bfloat16)


def _capturing(x):
    """Whether a CUDA graph is being captured on x's device (no host sync may happen then)."""
    return x.is_cuda and hasattr(torch.cuda, "is_current_stream_capturing") and torch.cuda.is_current_stream_capturing()


def _kept_input(x, keep_dtype):
    """x as the block keeps it: in keep_dtype where that holds it (float16 overflows
    past 65504: such an input is kept as it is). The overflow test reads the maximum
    on the host; while a CUDA graph is captured it cannot, and float16 is kept."""
    if keep_dtype is None or x.dtype == keep_dtype or not x.is_floating_point():
        return x
    if keep_dtype == torch.float16 and x.numel() and not _capturing(x) and \
            bool(x.detach().abs().max() > torch.finfo(torch.float16).max):
        return x
    return x.to(keep_dtype)


def _autocast_as(device_type, enabled, dtype):
    """The autocast state a forward ran in, to run it again (a device without autocast: as it is)."""
    if device_type not in ("cpu", "cuda"):
        return contextlib.ExitStack()  # nothing to enter (Python 3.6 has no contextlib.nullcontext)
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class _RecomputeFunction(torch.autograd.Function):
    """out = module(x); backward runs module(x) again under autograd from the kept x."""

    @staticmethod
    def forward(ctx, module, keep_dtype, x, *trainable):
        ctx.module = module
        ctx.input_dtype = x.dtype
        # Backward runs the forward again as this one ran: under the same autocast, if any.
        ctx.device_type = x.device.type
        ctx.autocast = autocast_state(x.device.type)
        version = x._version
        with torch.no_grad():
            out = module(x)
        if x._version != version:  # what backward would recompute from is no longer the input
            raise RuntimeError("RecomputedBlock: {} changed its input in place, so its forward cannot be run again "
                               "from it; make the block's first in-place op out of place".format(type(module).__name__))
        if out is x:  # an identity-like block: the Function must return a tensor of its own
            out = x.clone()
        # The trainable tensors (BN shifts) are the model's own: saving them costs nothing.
        ctx.save_for_backward(_kept_input(x, keep_dtype), *trainable)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        kept, trainable = saved[0], saved[1:]
        input_needed, trainable_needed = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        x = kept.detach().to(ctx.input_dtype).requires_grad_(input_needed)
        with torch.enable_grad(), _autocast_as(ctx.device_type, *ctx.autocast):
            out = ctx.module(x)
        wanted = ([x] if input_needed else []) + [p for p, needed in zip(trainable, trainable_needed) if needed]
        grads = list(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else []
        grad_x = grads.pop(0) if input_needed else None
        grad_trainable = [grads.pop(0) if needed else None for needed in trainable_needed]
        return (None, None, grad_x) + tuple(grad_trainable)


class RecomputedBlock(nn.Module):
    """Runs the frozen `module` (eval mode whatever model.train() says) keeping only
    its input for backward, and its forward again in backward. Its trainable
    parameters (a BN shift) get their gradients as in plain autograd.

    keep_dtype: None keeps the input as it is, and the gradients are plain
        autograd's (to float rounding); torch.float16 or torch.bfloat16 keeps it in half the bytes
        (float32 input) and backward recomputes from the rounded input, so the
        gradients carry that rounding (docs/design.md §3 measures it).

    The module must compute the same thing twice from the same input (eval mode
    makes dropout and drop-path identities); its input must be one tensor. Its
    frozen convs and BNs are replaced, in place, by twins that keep nothing
    (input_grad_only.py)."""

    def __init__(self, module, keep_dtype=None):
        super(RecomputedBlock, self).__init__()
        if keep_dtype not in KEEP_DTYPES:
            raise ValueError("RecomputedBlock: keep_dtype must be one of {}, got {!r}".format(KEEP_DTYPES, keep_dtype))
        self.module = module.eval()
        self.keep_dtype = keep_dtype
        # What the recompute keeps while this block's backward runs: not the frozen convs' and BNs' inputs.
        keep_nothing_inside(self.module)

    def train(self, mode=True):
        super(RecomputedBlock, self).train(mode)
        self.module.eval()
        return self

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError("RecomputedBlock: the input must be one tensor, got {}".format(type(x).__name__))
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (x.requires_grad or trainable):
            return self.module(x)
        return _RecomputeFunction.apply(self.module, self.keep_dtype, x, *trainable)

    def extra_repr(self):
        kept = "its input" if self.keep_dtype is None else "its input in {}".format(self.keep_dtype)
        return "keeps {}, recomputes {} in backward".format(kept, type(self.module).__name__)
