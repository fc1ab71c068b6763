r"""Probe: which part of da2's adaptor overfits mnist_m, and where it helps (docs/design.md §2, §3a)

da2's rank-4 adaptors fit mnist_m's training images better than the BN shifts alone
(bias_lean) and do worse on held-out ones (benchmarks/results/adaptor_generalisation.md).
Most of their parameters sit after the last blocks (2 x 2 maps at 64 px), where the
channel gate, an MLP on the pooled features at ten times the head's rate, can act as a
second classifier. This probe takes the adaptor apart: only its spatial factor (a
per-channel gain of k spatial maps, no MLP), only its channel factor, and the whole
adaptor only after the first blocks (where the maps are large and the domain's low-level
shift lives), with the shifts and head at da2's former 0.01 or at bias_lean's 0.03. What
it chose is da2's placement since (adapt(..., adaptor_max_stride=8): the first 5 blocks of
EfficientNet-Lite0).

The one-factor variants run the eager reference adaptor, the others the fused one
(accuracy is the question here, not memory). Every run: 720 training images, 64x64,
4 epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup then cosine,
--calibrate-shifts, seeds none of the digits table's. --domain mnist or digits (with
--only to pick rows) checks the choice on the near domains.

    python -m da2ext prepare-digits /tmp/digits
    python benchmarks/adaptor_variants_probe.py --data /tmp/digits   # ~14 min on 2 cores
    python benchmarks/adaptor_variants_probe.py --data /tmp/digits --domain mnist \
        --only '^bias_lean|^every block \(|^every block;|da2 now'

Writes benchmarks/results/adaptor_variants.{md,json} (mnist_m), or
adaptor_variants_<domain>.{md,json}.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from da2ext import methods  # noqa: E402
from da2ext.lean.adapt import AdaptedBlock, adapt  # noqa: E402
from da2ext.methods.method import Method  # noqa: E402
from da2ext.ops.reference import ResidualAttentionAdaptor, reference_attention_logits  # noqa: E402
from probe_runs import (ACCURACY_COLUMNS, BIAS_LEAN_TABLE_RATES, PROBE_RANK, add_only_argument,  # noqa: E402
                        labelled_accuracy_rows, labelled_runs, provenance, run_configuration, run_probe)


class _OneFactorAdaptor(ResidualAttentionAdaptor):
    """The additive adaptor with one of its two factors only: A = sum_j gamma_j[c] *
    sigmoid(a_s^j[n,h,w]) ("spatial") or sum_j gamma_j[c] * sigmoid(a_c^j[n,c]) ("channel")."""

    factor = None

    def forward(self, x):
        channel_logits, spatial_logits = reference_attention_logits(x, *self.branch_parameters())
        n, c = x.shape[0], x.shape[1]
        rank = spatial_logits.shape[1]
        gamma = self.gamma.reshape(1, rank, c, 1, 1)
        if self.factor == "spatial":
            gate = torch.sigmoid(spatial_logits)[:, :, None]  # N x k x 1 x H x W
        else:
            gate = torch.sigmoid(channel_logits).reshape(n, rank, c, 1, 1)
        return x + (gamma * gate).sum(1)


class _SpatialOnly(_OneFactorAdaptor):
    factor = "spatial"


class _ChannelOnly(_OneFactorAdaptor):
    factor = "channel"


def _adaptors(first=None, factor_class=None, rank=PROBE_RANK):
    """A build with rank-`rank` adaptors after the first `first` blocks only (None:
    every block), each swapped for factor_class (None: the fused adaptor)."""
    def build(backbone, num_classes):
        model = adapt(backbone, num_classes, rank=rank)
        adapted = [m for m in model.modules() if isinstance(m, AdaptedBlock) and m.adaptor is not None]
        for index, block in enumerate(adapted):
            if first is not None and index >= first:
                block.adaptor = None
            elif factor_class is not None:
                old = block.adaptor
                block.adaptor = factor_class(old.channels, reduction=old.reduction, spatial_kernel=old.spatial_kernel,
                                             mode=old.mode, rank=old.rank)
        return model
    return build


# The adaptors' rate in every row unless the row says otherwise (benchmarks/results/adaptor_design.md).
ADAPTOR_RATE = 0.1
BEFORE = 0.01  # da2's shifts and head before this probe (benchmarks/results/training_recipe.md)
WIDE = BIAS_LEAN_TABLE_RATES["shifts"]  # bias_lean's table rate for the shifts and head


def configurations():
    """(label, method, rates) in the order of the table. Every row is spelled out,
    not taken from da2's defaults, so that the table means the same after they change."""
    def rates(shifts_and_head, adaptors=ADAPTOR_RATE):
        return {"adaptors": adaptors, "shifts": shifts_and_head, "head": shifts_and_head}

    def row(label, shifts_and_head, adaptors=ADAPTOR_RATE, **build):
        method = Method("da2_variant", label, _adaptors(**build), dict(rates(shifts_and_head, adaptors), default=WIDE))
        return ("{}; shifts and head {:g}".format(label, shifts_and_head) +
                ("" if adaptors == ADAPTOR_RATE else ", adaptors {:g}".format(adaptors)),
                method, rates(shifts_and_head, adaptors))
    return (
        ("bias_lean (no adaptors); shifts and head {:g}".format(WIDE), methods.get("bias_lean"),
         dict(BIAS_LEAN_TABLE_RATES)),
        row("every block (da2 before this probe)", BEFORE),
        row("every block", WIDE),
        row("every block, spatial factor only", BEFORE, factor_class=_SpatialOnly),
        row("every block, channel factor only", BEFORE, factor_class=_ChannelOnly),
        row("every block, spatial factor only", WIDE, factor_class=_SpatialOnly),
        row("first 3 blocks (stride <= 4)", WIDE, first=3),
        row("first 5 blocks (stride <= 8)", BEFORE, first=5),
        row("first 5 blocks (stride <= 8; da2 now)", WIDE, first=5),
        row("first 5 blocks", WIDE, adaptors=0.03, first=5),
        row("first 5 blocks", WIDE, adaptors=0.3, first=5),
        row("first 5 blocks, rank 1", WIDE, first=5, rank=1),
        row("first 5 blocks, rank 8", WIDE, first=5, rank=8),
        row("first 5 blocks, spatial factor only", WIDE, first=5, factor_class=_SpatialOnly),
        row("first 8 blocks (stride <= 16, the 80-channel stage)", WIDE, first=8),
        row("first 11 blocks (stride <= 16)", WIDE, first=11),
    )


def run_one(args, label, seed):
    return run_configuration(args, configurations(), label, seed)


def markdown(records, args, argv):
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = ["# Which part of da2's adaptor overfits, and where it helps ({})".format(args.domain), "",
             "{} with {} training images, 64x64, {} epochs, batch 64, EfficientNet-Lite0 (ImageNet weights), warmup "
             "then cosine, every run with `--calibrate-shifts`. Seeds {} (none of the digits table's). Adaptors "
             "rank {} at {:g} unless the row says otherwise; 'first k blocks': adaptors after those only (Lite0's "
             "strides: 2, 4, 4, 8, 8, then 16 from the sixth block). train: the last epoch's accuracy on the "
             "training batches (dropout on, as it trained); val: the held-out images. "
             "{}".format(args.domain, args.subsample, args.epochs, seeds, PROBE_RANK, ADAPTOR_RATE,
                        provenance("adaptor_variants_probe.py", argv)),
             "", ACCURACY_COLUMNS, "| --- | --- | --- | --- | --- |"]
    lines += labelled_accuracy_rows(configurations(), records)
    return "\n".join(lines) + "\n"


def _runs(args):
    return labelled_runs(configurations(), args)


def _stem(args):
    return "adaptor_variants" if args.domain == "mnist_m" else "adaptor_variants_" + args.domain


def main(argv=None):
    run_probe(argv, __doc__.split("\n\n")[0], _runs, run_one, markdown, _stem, "adaptor_variants_probe.py",
              add_arguments=add_only_argument)


if __name__ == "__main__":
    main()
