"""Shift calibration: a new domain's BN shifts start from the running means the
domain's own images give its frozen BNs (AdaBN's means; docs/design.md §3a).

A frozen BN normalises with ImageNet's running mean mu. AdaBN estimates the
statistics on the new domain instead: BN in train mode over the domain's images,
each batch normalised with its own mean and variance, the running mean mu'
averaged over the batches. Its mean half costs nothing here: for
y = (r - mu) / sqrt(var + eps) * gamma + beta, using mu' in place of mu is the same
as starting the shift at

    beta' = beta + (mu - mu') * gamma / sqrt(var + eps)

which is exactly the parameter that trains and that each domain owns already: no
memory kept for backward, no new tensor in the domain file, no change to the
frozen backbone every domain shares. The running variance stays the pretrained one
(re-estimating it would rescale the frozen weights: a backbone per domain; it also
learned less, benchmarks/results/shift_calibration.md).

What must not be done instead: re-centring each BN on the mean its output has in
the frozen model itself (the variance left pretrained in the pass too). At 64 px
the last stages' activations vary far less than ImageNet's, the last conv's BN
has negative shifts, and centred on them every ReLU6 there was zero on every
image (benchmarks/results/shift_calibration_recentred.md): the pass must
normalise as BN in train mode does, as AdaBN's does.

One pass without autograd, the model in the mode it trains in. Which BNs: every
BN folded into a lean FrozenConvBNAct whose shift trains, and every
nn.BatchNorm2d that normalises with running statistics (eval mode) and has a
trainable bias (timm's BatchNormAct2d included); BNs on batch statistics, or
whose bias does not train, are left alone, and every BN's running statistics
are as they were afterwards.
"""
import contextlib

import torch
from torch import nn

from .frozen_conv import FrozenConvBNAct

__all__ = ["DomainStatistics", "calibrate_shifts", "calibrated_layers"]


def _uses_running_statistics(bn):
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


def calibrated_layers(model):
    """[(name, module)] of the BNs calibrate_shifts moves the shifts of in `model`."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, FrozenConvBNAct):
            if module.bn_train_mode is not None and module.shift.requires_grad:
                layers.append((name, module))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if _uses_running_statistics(module) and module.bias is not None and module.bias.requires_grad:
                layers.append((name, module))
    return layers


class DomainStatistics(object):
    """Per layer, the image-weighted mean of the batch means one pass records."""

    def __init__(self):
        self.sums = {}
        self.images = {}

    def record(self, module, batch_mean, images):
        batch_mean = batch_mean.detach().double()
        self.sums[module] = self.sums.get(module, 0) + batch_mean * images
        self.images[module] = self.images.get(module, 0) + images

    def mean(self, module):
        return self.sums[module] / self.images[module]


@contextlib.contextmanager
def _estimating(layers, statistics):
    """Lean layers normalise as BN in train mode would (FrozenConvBNAct.statistics);
    eager BNs run in train mode, their input's batch means recorded."""
    hooks, switched = [], []
    try:
        for _, module in layers:
            if isinstance(module, FrozenConvBNAct):
                module.statistics = statistics
            else:
                def record_input_mean(bn, inputs):
                    x = inputs[0]
                    statistics.record(bn, x.detach().double().mean(dim=(0, 2, 3)), x.shape[0])
                hooks.append(module.register_forward_pre_hook(record_input_mean))
                module.train()
                switched.append(module)
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module in switched:
            module.eval()
        for _, module in layers:
            if isinstance(module, FrozenConvBNAct):
                module.statistics = None


@contextlib.contextmanager
def _running_statistics_kept(model):
    """Put back every BN buffer (running statistics, batch counts) that a forward in
    train mode updates: calibrating changes nothing but the shifts."""
    buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in m.buffers(recurse=False)]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _shift_change(module, statistics):
    """How far the domain's mean moves `module`'s shift (beta' - beta above)."""
    if isinstance(module, FrozenConvBNAct):
        # The folded output is (r - mu) * scale: its mean on the domain is (mu' - mu) * scale.
        return -statistics.mean(module)
    scale = module.weight.detach().double() / torch.sqrt(module.running_var.detach().double() + module.eps)
    return (module.running_mean.detach().double() - statistics.mean(module)) * scale


def calibrate_shifts(model, batches):
    """Move the trainable shift of every BN calibrated_layers(model) finds to where
    the running mean AdaBN estimates on `batches` puts it (module docstring).
    batches: an iterable of input tensors, or of (inputs, targets) pairs, on the
    model's device; the mean is weighted by images. Returns the number of BNs moved.

    Call it once, before a domain's first step: a second pass estimates the means
    again from the pretrained ones, so it moves the shifts a second time."""
    layers = calibrated_layers(model)
    if not layers:
        return 0
    statistics = DomainStatistics()
    seen = 0
    with torch.no_grad(), _running_statistics_kept(model), _estimating(layers, statistics):
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            if inputs.shape[0] == 0:
                continue
            model(inputs)
            seen += inputs.shape[0]
    if not seen:
        raise ValueError("batches: calibrate_shifts needs at least one image, got none")
    missing = [name for name, module in layers if module not in statistics.sums]
    if missing:
        raise RuntimeError("calibrate_shifts: the forward did not reach {} BN layer(s) ({}{})".format(
            len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else ""))
    with torch.no_grad():
        for _, module in layers:
            shift = module.shift if isinstance(module, FrozenConvBNAct) else module.bias
            shift.add_(_shift_change(module, statistics).to(shift.dtype))
    return len(layers)
