"""The adaptor variants probe (adaptor_variants_probe.py): its one-factor adaptors
compute the formula they are named for, its rows are distinct, and the row it
names as da2's default is da2's default (placement and rates), so the committed
table says what da2 does."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adaptor_variants_probe as probe  # noqa: E402
from da2ext import methods  # noqa: E402
from da2ext.lean.adapt import AdaptedBlock  # noqa: E402
from da2ext.models import backbones  # noqa: E402


def _with_random_gamma(adaptor):
    torch.manual_seed(0)
    with torch.no_grad():
        adaptor.gamma.normal_()
    return adaptor


def test_one_factor_adaptors_keep_only_their_factor():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    spatial = _with_random_gamma(probe._SpatialOnly(8, rank=2, spatial_kernel=3)).double()
    channel = _with_random_gamma(probe._ChannelOnly(8, rank=2, spatial_kernel=3)).double()
    pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)
    spatial_gate = torch.sigmoid(spatial.spatial(pooled))  # N x k x H x W
    expected = x + (spatial.gamma[None, :, :, None, None] * spatial_gate[:, :, None]).sum(1)
    torch.testing.assert_close(spatial(x), expected)
    hidden = torch.relu(channel.fc1(x.mean((2, 3))))
    channel_gate = torch.sigmoid(channel.fc2(hidden)).reshape(2, 2, 8)
    expected = x + (channel.gamma[None] * channel_gate).sum(1)[:, :, None, None]
    torch.testing.assert_close(channel(x), expected)


def test_rows_are_distinct_and_da2_now_is_da2():
    rows = probe.configurations()
    labels = [label for label, _, _ in rows]
    assert len(set(labels)) == len(labels)
    (label, variant, rates), = [row for row in rows if "da2 now" in row[0]]
    da2 = methods.get("da2")
    assert rates == dict((group, da2.learning_rates[group]) for group in ("adaptors", "shifts", "head"))

    def adapted(method):
        model = method.build(backbones.create("efficientnet_lite0", pretrained=False), 10)
        return [name for name, m in model.named_modules() if isinstance(m, AdaptedBlock) and m.adaptor is not None]
    assert adapted(variant) == adapted(da2)
