"""insert_adaptors(): residual attention adaptors at points of any model the user picks.

adapt() knows the blocks of the models it supports and rewrites them lean. For
any other network (a RegNet, a ConvNeXt, a model of one's own), this is the
manual path: name the modules (or give a predicate) and each one's output goes
through a new ResidualAttentionAdaptor. Nothing else changes: what is frozen,
which mode the modules run in and what autograd keeps for them stay the user's
choice (freeze first, as in python/insert_adaptors.py, to train the adaptors
alone). An adaptor starts with gamma 0, so the model computes exactly what it
computed before until the adaptors learn.
"""
import torch
from torch import nn

from ..nn.adaptor import ResidualAttentionAdaptor
from ..ops.attention_branch import MAX_RANK
from .submodules import replace_submodule

__all__ = ["AdaptorAfter", "feature_map_channels", "feature_map_io_shapes", "feature_map_shapes", "insert_adaptors"]


class AdaptorAfter(nn.Module):
    """`module`, then `adaptor` on its output (in the adaptor's dtype, cast back)."""

    def __init__(self, module, adaptor):
        super(AdaptorAfter, self).__init__()
        self.module = module
        self.adaptor = adaptor

    def forward(self, *args, **kwargs):
        y = self.module(*args, **kwargs)
        if self.adaptor is None:  # removed by adapt()'s placement (adaptor_max_stride)
            return y
        if not isinstance(y, torch.Tensor) or y.dim() != 4:
            raise TypeError("AdaptorAfter: the adaptor needs the module's output as one N x C x H x W tensor, "
                            "got {}".format(tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__))
        dtype = self.adaptor.gamma.dtype
        return self.adaptor(y) if y.dtype == dtype else self.adaptor(y.to(dtype)).to(y.dtype)


def _chosen(model, after):
    """[(name, module)] that `after` selects: names, or a predicate of (name, module)."""
    modules = dict(model.named_modules())
    if callable(after):
        chosen = [(name, m) for name, m in model.named_modules() if name and after(name, m)]
    else:
        names = [after] if isinstance(after, str) else list(after)
        unknown = [n for n in names if n not in modules or not n]
        if unknown:
            raise ValueError("insert_adaptors: no submodule named {} (names as model.named_modules() gives "
                             "them, e.g. {})".format(", ".join(repr(n) for n in unknown),
                                                     ", ".join(list(n for n in modules if n)[:5])))
        chosen = [(n, modules[n]) for n in names]
    if not chosen:
        raise ValueError("insert_adaptors: `after` selects no module")
    names = [n for n, _ in chosen]
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError("insert_adaptors: {} lies inside {}: choose one of them".format(nested[0][1], nested[0][0]))
    return chosen


def feature_map_io_shapes(model, chosen, example_input):
    """{name: (input shape, output shape)} for each of the chosen (name, module) pairs
    whose output is an N x C x H x W tensor (the input shape: that of its first
    argument, None unless it is one too), from one forward of example_input without
    autograd, in eval mode (the model's mode is restored)."""
    shapes, hooks = {}, []

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                first = inputs[0] if inputs else None
                shapes[name] = (tuple(first.shape) if isinstance(first, torch.Tensor) and first.dim() == 4 else None,
                                tuple(output.shape))
        return hook

    for name, module in chosen:
        hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def feature_map_shapes(model, chosen, example_input):
    """{name: (N, C, H, W)} of each chosen module's output (feature_map_io_shapes)."""
    return dict((name, io[1]) for name, io in feature_map_io_shapes(model, chosen, example_input).items())


def feature_map_channels(model, chosen, example_input):
    """{name: C} of feature_map_shapes."""
    return dict((name, shape[1]) for name, shape in feature_map_shapes(model, chosen, example_input).items())


def _output_channels(model, chosen, example_input):
    """{name: C} of each chosen module's output; every one must be a feature map."""
    channels = feature_map_channels(model, chosen, example_input)
    missing = [name for name, _ in chosen if name not in channels]
    if missing:
        raise ValueError("insert_adaptors: {} gave no N x C x H x W output on example_input (or did not "
                         "run): an adaptor needs a feature map".format(", ".join(missing)))
    return channels


def insert_adaptors(model, after, example_input, rank=1, reduction=16, mode="add"):
    """Put a ResidualAttentionAdaptor after each module `after` selects, in place;
    returns the chosen names.

    after: a module name or a list of names (as model.named_modules() gives
        them: "trunk_output.block2"), or a predicate (name, module) -> bool. A
        chosen module may not lie inside another chosen one.
    example_input: one input batch of the model (its values do not matter); a
        forward without autograd reads each chosen module's output channels.
    rank, reduction, mode: the adaptors' (see ResidualAttentionAdaptor).

    Each chosen module is replaced by AdaptorAfter(module, adaptor); the
    adaptors are on the model's device and trainable, everything else is as
    it was."""
    if not isinstance(model, nn.Module):
        raise TypeError("insert_adaptors: model must be an nn.Module, got {}".format(type(model).__name__))
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise ValueError("insert_adaptors: rank must be an int from 1 to {}, got {!r}".format(MAX_RANK, rank))
    chosen = _chosen(model, after)
    channels = _output_channels(model, chosen, example_input)
    parameter = next(model.parameters(), None)
    for name, module in chosen:
        adaptor = ResidualAttentionAdaptor(channels[name], reduction=reduction, mode=mode, rank=rank)
        if parameter is not None:
            adaptor = adaptor.to(parameter.device)
        replace_submodule(model, name, AdaptorAfter(module, adaptor))
    return [name for name, _ in chosen]
