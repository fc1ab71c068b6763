r"""Probe: where does TinyTL's gain on mnist_m live? (docs/design.md §3a)

In the digits table tinytl (lite residual branches beside every block, plus the BN
shifts and head) reaches mnist_m 78.3 % against the shifts alone's 71.7 %: the
margin issue 17 asks of da2. This probe keeps tinytl's branches beside only some
blocks, to say whether what helps is early (the large maps, where da2's adaptors
sit) or late (the small maps, whose activations cost little at any input size),
and adds the late branches to da2 to see whether the two add up.

Every run: 720 training images, 64x64, 4 epochs, batch 64, EfficientNet-Lite0
(ImageNet weights), warmup then cosine, --calibrate-shifts, seeds none of the
digits table's, each method at its digits-table rates (bias_lean and tinytl at
their sweep's 10x: shifts and head 3e-2, tinytl's branches 9e-3).

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/lite_branch_probe.py --data /tmp/digits    # ~6 min on 2 cores

Writes benchmarks/results/lite_branch_probe.{md,json} (or lite_branch_probe_<domain>).
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from da2ext import methods  # noqa: E402
from da2ext.methods.deep_attention_adaptor import ADAPTOR_MAX_STRIDE  # noqa: E402
from da2ext.methods.lite_residual import LiteResidualBlock, add_lite_residuals  # noqa: E402
from da2ext.methods.method import Method  # noqa: E402
from da2ext.lean.adapt import adapt  # noqa: E402
from probe_runs import (ACCURACY_COLUMNS, BIAS_LEAN_TABLE_RATES, PROBE_RANK, add_only_argument,  # noqa: E402
                        labelled_accuracy_rows, labelled_runs, provenance, run_configuration, run_probe)

# EfficientNet-Lite0's 16 blocks: the first 5 end at output stride <= 8 (2, 4, 4, 8, 8), the rest at 16 and 32.
EARLY_BLOCKS = 5
TINYTL_TABLE_RATES = {"other": 9e-3, "default": 3e-2}  # tinytl's rates at its sweep's 10x (digits.md)


class _BottleneckBranch(nn.Module):
    """A low-rank lite branch: avg-pool by 2 -> 1x1 conv C_in -> width -> ReLU -> 3x3 conv
    width -> width (the block's stride) -> ReLU -> 1x1 conv width -> C_out -> BN (scale
    initialised to 0) -> bilinear upsampling; what it keeps for backward is the pooled
    input and width-channel maps, its weights O(width * (C_in + C_out + 9 * width))."""

    def __init__(self, in_channels, out_channels, stride, width):
        super(_BottleneckBranch, self).__init__()
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)  # LiteResidualBlock reads conv1
        self.conv = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.expand = nn.Conv2d(width, out_channels, 1, bias=False)
        self.final_bn = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.final_bn.weight)

    def forward(self, x, size):
        y = torch.relu(self.conv(torch.relu(self.conv1(self.pool(x)))))
        return F.interpolate(self.final_bn(self.expand(y)), size=size, mode="bilinear", align_corners=False)


class _LowRankBranch(nn.Module):
    """_BottleneckBranch without its BN: the last 1x1 conv starts at zero instead (as
    LoRA's up-projection does), so that nothing of C_out channels is kept for backward:
    the pooled input and width-channel maps only."""

    def __init__(self, in_channels, out_channels, stride, width):
        super(_LowRankBranch, self).__init__()
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)  # LiteResidualBlock reads conv1
        self.conv = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.expand = nn.Conv2d(width, out_channels, 1, bias=False)
        nn.init.zeros_(self.expand.weight)

    def forward(self, x, size):
        y = torch.relu(self.conv(torch.relu(self.conv1(self.pool(x)))))
        return F.interpolate(self.expand(y), size=size, mode="bilinear", align_corners=False)


class _NormalisedLowRankBranch(nn.Module):
    """A low-rank branch normalised inside: avg-pool by 2 -> 1x1 conv C_in -> width -> BN -> ReLU
    -> 3x3 conv (the block's stride) -> BN -> ReLU -> 1x1 conv width -> C_out whose weight is
    gamma[c] * V[c, :] (V as PyTorch initialises a conv, gamma starting at 0), so the branch starts
    at zero and grows its output by about its rate per step, as _BottleneckBranch's zero BN scale
    does, while nothing of C_out channels is kept for backward (gamma's gradient comes through
    the weight)."""

    def __init__(self, in_channels, out_channels, stride, width):
        super(_NormalisedLowRankBranch, self).__init__()
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)  # LiteResidualBlock reads conv1
        self.bn1 = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.direction = nn.Parameter(nn.Conv2d(width, out_channels, 1, bias=False).weight.detach().clone())
        self.gamma = nn.Parameter(torch.zeros(out_channels, 1, 1, 1))

    def forward(self, x, size):
        y = torch.relu(self.bn2(self.conv(torch.relu(self.bn1(self.conv1(self.pool(x)))))))
        z = F.conv2d(y, self.gamma * self.direction)
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)


def _lite_branches(keep, adaptors, width=None, branch=None):
    """A build: the lean backbone with its shifts and head, tinytl's lite branches beside
    the blocks whose index `keep` accepts (low-rank ones of `width` channels if given),
    and da2's adaptors if `adaptors`."""
    def build(backbone, num_classes):
        if adaptors:
            model = adapt(backbone, num_classes, rank=PROBE_RANK, adaptor_max_stride=ADAPTOR_MAX_STRIDE)
        else:
            model = adapt(backbone, num_classes, adaptors=False, shifts=True)
        add_lite_residuals(model)
        sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                 if isinstance(child, LiteResidualBlock)]
        for index, (parent, name, child) in enumerate(sites):
            if not keep(index):
                setattr(parent, name, child.main)
            elif width is not None:
                lite = child.lite
                child.lite = (branch or _BottleneckBranch)(lite.conv1.in_channels, lite.final_bn.num_features,
                                               lite.conv1.stride[0], width).to(lite.conv1.weight.device)
        return model.train()
    return build


def configurations():
    """(label, method, rates) in the order of the table."""
    def row(label, keep, adaptors=False, width=None, branch_rate=TINYTL_TABLE_RATES["other"], branch=None):
        rates = dict(BIAS_LEAN_TABLE_RATES, other=branch_rate)
        if adaptors:
            rates["adaptors"] = methods.get("da2").learning_rates["adaptors"]
        return label, Method("lite_branch_variant", label, _lite_branches(keep, adaptors, width, branch),
                             TINYTL_TABLE_RATES), rates
    return (
        ("bias_lean (shifts and head 3e-2)", methods.get("bias_lean"), dict(BIAS_LEAN_TABLE_RATES)),
        row("tinytl: branches beside every block", lambda i: True),
        row("branches beside the first 5 blocks (stride <= 8)", lambda i: i < EARLY_BLOCKS),
        row("branches beside the last 11 blocks (stride >= 16)", lambda i: i >= EARLY_BLOCKS),
        row("branches beside the last 5 blocks (stride 32)", lambda i: i >= 11),
        row("da2 + branches beside the last 11 blocks", lambda i: i >= EARLY_BLOCKS, adaptors=True),
        row("da2 + width-32 bottleneck branches beside the last 11 blocks", lambda i: i >= EARLY_BLOCKS,
            adaptors=True, width=32),
        row("da2 + width-64 bottleneck branches beside the last 11 blocks", lambda i: i >= EARLY_BLOCKS,
            adaptors=True, width=64),
        row("da2 + width-64 bottleneck branches beside the last 5 blocks", lambda i: i >= 11, adaptors=True,
            width=64),
        row("width-64 bottleneck branches beside the last 11 blocks", lambda i: i >= EARLY_BLOCKS, width=64),
        row("da2 + width-64 bottleneck branches beside the last 5 blocks at 3e-2", lambda i: i >= 11,
            adaptors=True, width=64, branch_rate=3e-2),
        row("da2 + width-64 bottleneck branches beside the last 5 blocks at 1e-1", lambda i: i >= 11,
            adaptors=True, width=64, branch_rate=1e-1),
        row("da2 + width-128 bottleneck branches beside the last 5 blocks at 3e-2", lambda i: i >= 11,
            adaptors=True, width=128, branch_rate=3e-2),
        row("da2 + width-64 low-rank branches (no BN) beside the last 5 blocks at 3e-2", lambda i: i >= 11,
            adaptors=True, width=64, branch_rate=3e-2, branch=_LowRankBranch),
        row("da2 + width-64 low-rank branches (no BN) beside the last 5 blocks at 1e-2", lambda i: i >= 11,
            adaptors=True, width=64, branch_rate=1e-2, branch=_LowRankBranch),
        row("da2 + width-64 low-rank branches (no BN) beside the last 4 blocks at 3e-2", lambda i: i >= 12,
            adaptors=True, width=64, branch_rate=3e-2, branch=_LowRankBranch),
        row("da2 + width-64 normalised low-rank branches beside the last 5 blocks at 3e-2", lambda i: i >= 11,
            adaptors=True, width=64, branch_rate=3e-2, branch=_NormalisedLowRankBranch),
        row("da2 + width-64 normalised low-rank branches beside the last 5 blocks at 1e-1", lambda i: i >= 11,
            adaptors=True, width=64, branch_rate=1e-1, branch=_NormalisedLowRankBranch),
        _adapt_branches_row(),
        _adapt_branches_row(rank=1),
    )


def _adapt_branches_row(rank=PROBE_RANK):
    """da2 with adapt()'s own late branches (branch_width=64 beside the blocks of stride 32: Lite0's last 5):
    _BottleneckBranch's design, pooling by twice the block's stride and keeping nothing of C_out channels
    for backward (da2ext.nn.LowRankConvBranch), all at 3e-2."""
    label = "da2 + adapt's branches (branch_width=64, stride 32) at 3e-2" + ("" if rank == PROBE_RANK else
                                                                            ", rank-{} adaptors".format(rank))

    def build(backbone, num_classes):
        return adapt(backbone, num_classes, rank=rank, adaptor_max_stride=ADAPTOR_MAX_STRIDE, branch_width=64)
    rates = dict(BIAS_LEAN_TABLE_RATES, adaptors=methods.get("da2").learning_rates["adaptors"], branches=3e-2)
    return label, Method("lite_branch_variant", label, build, dict(TINYTL_TABLE_RATES, branches=3e-2)), rates


def run_one(args, label, seed):
    return run_configuration(args, configurations(), label, seed)


def markdown(records, args, argv):
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = ["# Where tinytl's gain lives ({})".format(args.domain), "",
             "{} with {} training images, 64x64, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup "
             "then cosine, every run with `--calibrate-shifts`. Seeds {} (none of the digits table's). Lite branches "
             "(TinyTL's, da2ext/methods/lite_residual.py) at 9e-3, shifts and head at 3e-2, da2's adaptors (rank {}, "
             "after the blocks of stride <= {}) at their 0.1. train: the last epoch's accuracy on the training "
             "batches; val: the held-out images. {}".format(args.domain, args.subsample, args.epochs, seeds,
                                                             PROBE_RANK, ADAPTOR_MAX_STRIDE,
                                                             provenance("lite_branch_probe.py", argv)),
             "", ACCURACY_COLUMNS, "| --- | --- | --- | --- | --- |"]
    lines += labelled_accuracy_rows(configurations(), records)
    return "\n".join(lines) + "\n"


def _runs(args):
    return labelled_runs(configurations(), args)


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown,
              lambda args: "lite_branch_probe" if args.domain == "mnist_m" else "lite_branch_probe_" + args.domain,
              "lite_branch_probe.py", add_arguments=add_only_argument)


if __name__ == "__main__":
    main()
