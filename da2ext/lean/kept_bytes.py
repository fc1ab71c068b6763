"""kept_bytes_by_part(): where a model's training memory goes, part by part
(docs/design.md §3, "Models of unknown blocks"): what each part's forward makes
autograd keep for backward, and whether the part runs lean, in plain autograd,
or is an adaptor, a low-rank branch or the head."""
import itertools

import torch
from torch import nn

from ..nn.low_rank_branch import LowRankConvBranch
from ..ops.attention_branch import AttentionBranch
from ..profiling import SavedTensorCounter, model_state, storage_key_and_bytes
from .adapt import AdaptedBlock, Head
from .frozen_blocks import InferenceOnly
from .frozen_conv import FrozenConvBNAct
from .insert_adaptors import AdaptorAfter
from .lean_max_pool import LeanMaxPool2d
from .recomputed_block import RecomputedBlock

__all__ = ["kept_bytes_by_part", "largest_recompute_transient"]


def _default_parts(model):
    """The model's top-level modules and, inside them, each adapted block's block and adaptor."""
    parts = [name for name, _ in model.named_children()]
    for name, module in model.named_modules():
        if not isinstance(module, (AdaptedBlock, AdaptorAfter)):
            continue
        for attribute in ("block", "module", "adaptor", "branch"):  # AdaptedBlock's block, AdaptorAfter's module
            if isinstance(getattr(module, attribute, None), nn.Module):
                parts.append("{}.{}".format(name, attribute) if name else attribute)
    return parts


def _treatment(module):
    """How a part runs: "adaptor", "branch", "lean" (packed bits for backward), "recomputed"
    (keeps its input, runs again in backward), "head", "lean in part" or "plain autograd"."""
    while isinstance(module, InferenceOnly):  # a wrapper that only keeps eval mode
        module = module.module
    if isinstance(module, AttentionBranch):
        return "adaptor"
    if isinstance(module, LowRankConvBranch):
        return "branch"
    if isinstance(module, RecomputedBlock):
        return "recomputed"
    heads = [m for m in module.modules() if isinstance(m, Head)]
    head_parameters = set(id(p) for h in heads for p in h.parameters())
    if heads and all(id(p) in head_parameters for p in module.parameters()):  # a Head, maybe with pooling around it
        return "head"
    inside_recomputed = set(id(m) for r in module.modules() if isinstance(r, RecomputedBlock) for m in r.modules())
    kinds = [m for m in module.modules() if not isinstance(m, AttentionBranch) and id(m) not in inside_recomputed]
    lean = any(isinstance(m, (FrozenConvBNAct, LeanMaxPool2d)) for m in kinds)
    if not (lean or inside_recomputed):
        return "plain autograd"
    if any(isinstance(m, nn.Conv2d) for m in kinds):
        return "lean in part"
    return "lean" if lean else "recomputed"


def kept_bytes_by_part(model, inputs, parts=None):
    """What one forward of `model` on `inputs` keeps for backward, part by part:
    [{"part", "type", "treatment", "kept_bytes"}], in the order the parts first
    ran, then a row "(elsewhere)" for what no part's forward saved (the loss,
    the model's own glue). A storage is counted once, for the innermost part
    running when autograd saved it; the model's own parameters and buffers are not
    counted (profile_step's convention). parts: module names (default: the
    top-level modules, and each adapted block's block and adaptor)."""
    modules = dict(model.named_modules())
    names = list(_default_parts(model) if parts is None else parts)
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError("kept_bytes_by_part: no module named {}".format(", ".join(repr(n) for n in unknown)))
    running, owner, order, hooks = [], {}, [], []

    def enter(name):
        def hook(module, args):
            running.append(name)
            if name not in order:
                order.append(name)
        return hook

    def leave(module, args, output):
        running.pop()

    excluded = set(storage_key_and_bytes(t)[0] for t in itertools.chain(model.parameters(), model.buffers()))

    def pack(t):
        key, nbytes = storage_key_and_bytes(t)
        if key not in excluded and key not in owner:
            owner[key] = (running[-1] if running else None, nbytes)
        return t

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(enter(name)))
        hooks.append(modules[name].register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(inputs)
            del output
    finally:
        for hook in hooks:
            hook.remove()
    kept = {}
    for part, nbytes in owner.values():
        kept[part] = kept.get(part, 0) + nbytes
    rows = [{"part": name, "type": type(modules[name]).__name__, "treatment": _treatment(modules[name]),
             "kept_bytes": kept.get(name, 0)} for name in order]
    rows.append({"part": "(elsewhere)", "type": "", "treatment": "", "kept_bytes": kept.get(None, 0)})
    return rows


def largest_recompute_transient(model, inputs):
    """The most one RecomputedBlock of `model` keeps while its own backward runs (its
    forward again under plain autograd), over the model's RecomputedBlocks on
    `inputs`: {"part", "type", "transient_bytes"}, or None without any. A step's
    backward holds what the step keeps plus, for a while, this (docs/design.md §3)."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, RecomputedBlock)]
    if not blocks:
        return None
    seen, hooks = [], []

    def capture(name):
        def hook(module, args):
            seen.append((name, module, args[0].detach()))
        return hook

    for name, block in blocks:
        hooks.append(block.register_forward_pre_hook(capture(name)))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    largest = None
    for name, block, x in seen:
        with torch.enable_grad(), SavedTensorCounter(exclude=model_state(block)) as counter:
            block.module(x.requires_grad_(x.is_floating_point()))
        if largest is None or counter.saved_bytes > largest["transient_bytes"]:
            largest = {"part": name, "type": type(block.module).__name__, "transient_bytes": counter.saved_bytes}
    return largest
