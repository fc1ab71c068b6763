"""Shift calibration: start a new domain's BN shifts where its own data puts the
frozen BNs' means (docs/design.md §5).

A frozen BN normalises with the pretrained running mean. On a domain far from
ImageNet (mnist_m's coloured backgrounds) every channel's output is off-centre,
and a few dozen Adam steps on the shift cannot undo it. AdaBN re-estimates the
statistics on the new domain; its mean half costs nothing here. For a BN
y = (x - mu) / sigma * w + b, using the domain's mean mu' in place of mu is the
same as starting the shift at

    b' = b - (mean over the domain of y - b)

which is exactly the parameter that trains and that each domain owns already: no
memory kept for backward, no new tensor in the domain file, no change to the
frozen backbone shared by every domain. The variance half would rescale the
frozen weights per domain (each domain its own copy of the backbone), so it is
left out (benchmarks/results/shift_calibration.md measures both).

One pass over the training images, without autograd: every calibrated BN
re-centres each batch on its own mean as it goes (as BN in train mode does), so
the layers after it see what they will see once calibrated, and the shift moves
by the mean of those batch means, weighted by batch size. Which BNs: every BN
folded into a lean FrozenConvBNAct, and every nn.BatchNorm2d that normalises with
running statistics (eval mode) and has a trainable bias; those on batch
statistics, or whose bias does not train, are left alone.
"""
import contextlib

import torch
from torch import nn

from .frozen_conv import FrozenConvBNAct

__all__ = ["ShiftCalibration", "calibrate_shifts", "calibrated_layers"]


def _uses_running_statistics(bn):
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


def calibrated_layers(model):
    """[(name, module)] of the BNs calibrate_shifts re-centres in `model`."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, FrozenConvBNAct):
            if module.bn_folded and module.shift.requires_grad:
                layers.append((name, module))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if _uses_running_statistics(module) and module.bias is not None and module.bias.requires_grad:
                layers.append((name, module))
    return layers


class ShiftCalibration(object):
    """The running per-channel means of one calibration pass, per layer."""

    def __init__(self):
        self.sums = {}   # module -> float64 sum over images of the batch means
        self.images = {}

    def record(self, module, output):
        """Record `output`'s per-channel mean less the module's shift (what the
        shift would have to absorb); returns that mean (float64, per channel)."""
        batch_mean = output.detach().double().mean(dim=(0, 2, 3))
        count = output.shape[0]
        self.sums[module] = self.sums.get(module, 0) + batch_mean * count
        self.images[module] = self.images.get(module, 0) + count
        return batch_mean

    def mean(self, module):
        return self.sums[module] / self.images[module]


def _shift_of(module):
    return module.shift if isinstance(module, FrozenConvBNAct) else module.bias


def _recentre_output(bn, calibration):
    """A hook that re-centres what `bn` normalised (its output less its bias is
    what a domain mean moves); returns its handle. timm's BatchNormAct2d applies
    its activation inside its forward: there the hook goes before the activation."""
    def recentre(normalised):
        batch_mean = calibration.record(bn, normalised - bn.bias.detach().view(1, -1, 1, 1))
        return normalised - batch_mean.to(normalised.dtype).view(1, -1, 1, 1)

    activation = getattr(bn, "act", None)
    if isinstance(activation, nn.Module):
        return activation.register_forward_pre_hook(lambda _, inputs: (recentre(inputs[0]),) + tuple(inputs[1:]))
    return bn.register_forward_hook(lambda _, inputs, output: recentre(output))


@contextlib.contextmanager
def _calibrating(layers, calibration):
    hooks = []
    try:
        for _, module in layers:
            if isinstance(module, FrozenConvBNAct):
                module.calibration = calibration
            else:
                hooks.append(_recentre_output(module, calibration))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for _, module in layers:
            if isinstance(module, FrozenConvBNAct):
                module.calibration = None


@contextlib.contextmanager
def _running_statistics_kept(model):
    """Put back every BN buffer (running statistics, batch counts) a forward in
    train mode would update: calibrating must change nothing but the shifts."""
    buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in m.buffers(recurse=False)]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def calibrate_shifts(model, batches):
    """Move the trainable shift of every BN calibrated_layers(model) finds by
    minus the mean its output has over `batches` (an iterable of input tensors,
    or of (inputs, targets) pairs; the model's own device): the mean half of
    AdaBN, folded into the shifts. Returns the number of layers moved.

    The model runs in the mode it is in (as its training will), without
    autograd; BN running statistics and everything but the shifts stay as they
    were. Call it once, before a domain's first step: a second pass would find
    the means near zero and move little, but it is not a no-op."""
    layers = calibrated_layers(model)
    if not layers:
        return 0
    calibration = ShiftCalibration()
    seen = 0
    with torch.no_grad(), _running_statistics_kept(model), _calibrating(layers, calibration):
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if inputs.shape[0] == 0:
                continue
            model(inputs)
            seen += inputs.shape[0]
    if not seen:
        raise ValueError("batches: calibrate_shifts needs at least one image, got none")
    missing = [name for name, module in layers if module not in calibration.sums]
    if missing:
        raise RuntimeError("calibrate_shifts: the forward did not reach {} calibrated layer(s) ({}{})".format(
            len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else ""))
    with torch.no_grad():
        for _, module in layers:
            shift = _shift_of(module)
            shift.sub_(calibration.mean(module).to(shift.dtype))
    return len(layers)
