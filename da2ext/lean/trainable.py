"""What a model trains, in the spirit of PEFT's print_trainable_parameters, with
DA2's groups: adaptors, low-rank branches, BN shifts, head, a trainable tail, and
anything else that trains."""
from torch import nn

from ..nn.low_rank_branch import LowRankConvBranch
from ..ops.attention_branch import AttentionBranch
from .adapt import Head
from .frozen_conv import FrozenConvBNAct
from .trainable_tail import TrainableTail

__all__ = ["PARAMETER_GROUPS", "parameter_groups", "print_trainable_parameters", "trainable_parameters"]

_GROUPS = ("adaptors", "branches", "shifts", "head", "tail", "other")
PARAMETER_GROUPS = _GROUPS  # the names learning rates are given for


def _group_of_parameters(model):
    group = {}
    for module in model.modules():  # parents come before their children: a tail claims its BN shifts
        if isinstance(module, TrainableTail):
            kind = "tail"
        elif isinstance(module, AttentionBranch):
            kind = "adaptors"
        elif isinstance(module, LowRankConvBranch):
            kind = "branches"
        elif isinstance(module, FrozenConvBNAct):
            group[id(module.shift)] = "shifts"
            continue
        elif isinstance(module, nn.BatchNorm2d):
            if module.bias is not None:
                group.setdefault(id(module.bias), "shifts")
            continue
        elif isinstance(module, Head):
            kind = "head"
        else:
            continue
        for p in module.parameters():
            group.setdefault(id(p), kind)
    return group


def parameter_groups(model):
    """The trainable parameters by group: {"adaptors": [...], "branches": [...],
    "shifts": [...], "head": [...], "tail": [...], "other": [...]}, empty groups left out."""
    group = _group_of_parameters(model)
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(group.get(id(p), "other"), []).append(p)
    return groups


def trainable_parameters(model):
    """A dict: "trainable" and "total" parameter counts (total includes the lean
    backbone's folded weights, which are buffers), "percent", and the
    trainable count of each group ("adaptors", "branches", "shifts", "head", "tail", "other")."""
    group = _group_of_parameters(model)
    counts = dict((name, 0) for name in _GROUPS)
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            counts[group.get(id(p), "other")] += p.numel()
    for module in model.modules():
        if isinstance(module, FrozenConvBNAct):  # the backbone's folded weights are buffers
            total += module.weight.numel() + module.frozen_bias.numel()
    counts.update(trainable=trainable, total=total, percent=100.0 * trainable / max(total, 1))
    return counts


def print_trainable_parameters(model):
    """Print, e.g.: trainable params: 391,460 || all params: 23,919,012 || trainable%: 1.6366
    (adaptors 137,632, shifts 53,120, head 204,900)."""
    c = trainable_parameters(model)
    detail = ", ".join("{} {:,}".format(name, c[name]) for name in _GROUPS
                       if c[name] or name not in ("branches", "tail", "other"))
    print("trainable params: {:,} || all params: {:,} || trainable%: {:.4f} ({})".format(
        c["trainable"], c["total"], c["percent"], detail))
