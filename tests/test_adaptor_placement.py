"""adapt(..., adaptor_max_stride=s): adaptors only after the blocks whose output
stride is at most s (da2ext/lean/adaptor_placement.py), on the known families and
generically; the strides it records; bad values refused; the removed adaptors
gone from what trains, what is kept for backward and the domain's state."""
import warnings

import pytest
import torch

import da2ext
from da2ext.lean.adapt import AdaptedBlock
from da2ext.lean.trainable import parameter_groups
from da2ext.models import backbones

from helpers import import_timm, kept_for_backward

torchvision = pytest.importorskip("torchvision")


def _adapted_blocks(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedBlock)]


@pytest.mark.parametrize("max_stride, expected", [
    (4, ["layer1.0", "layer1.1"]),
    (8, ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]),
    (32, ["layer{}.{}".format(s, b) for s in range(1, 5) for b in range(2)]),
])
def test_resnet18_adaptors_after_the_blocks_of_stride_at_most(max_stride, expected):
    model = da2ext.adapt(torchvision.models.resnet18(), 10, rank=4, adaptor_max_stride=max_stride)
    with_adaptor = [name for name, block in _adapted_blocks(model) if block.adaptor is not None]
    assert with_adaptor == expected
    strides = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    assert model.da2ext_adaptor_strides == dict((name, strides[name.split(".")[0]]) for name in expected)
    assert model.training  # the trace ran in eval mode and put the model back


def test_every_block_by_default():
    model = da2ext.adapt(torchvision.models.resnet18(), 10)
    assert all(block.adaptor is not None for _, block in _adapted_blocks(model))
    assert model.da2ext_adaptor_strides is None


def test_efficientnet_lite0_stride_8_is_its_first_five_blocks():
    model = da2ext.adapt(backbones.create("efficientnet_lite0", pretrained=False), 10, rank=4, adaptor_max_stride=8)
    assert sorted(model.da2ext_adaptor_strides) == ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0",
                                                    "blocks.2.1"]


def test_what_trains_and_what_is_kept_shrink_with_the_placement():
    torch.manual_seed(0)
    everywhere = da2ext.adapt(torchvision.models.resnet18(), 10, rank=4)
    torch.manual_seed(0)
    early = da2ext.adapt(torchvision.models.resnet18(), 10, rank=4, adaptor_max_stride=8)
    adaptors_everywhere = sum(p.numel() for p in parameter_groups(everywhere)["adaptors"])
    adaptors_early = sum(p.numel() for p in parameter_groups(early)["adaptors"])
    assert 0 < adaptors_early < adaptors_everywhere
    assert not any("layer3" in key or "layer4" in key for key in early.state_dict() if ".adaptor." in key)
    x = torch.randn(2, 3, 64, 64)
    assert kept_for_backward(early, x) < kept_for_backward(everywhere, x)
    loss = early(x).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None for p in parameter_groups(early)["adaptors"])


def test_float16_backbone_traces():
    model = da2ext.adapt(torchvision.models.resnet18(), 10, backbone_dtype=torch.float16, adaptor_max_stride=8)
    assert len(model.da2ext_adaptor_strides) == 4


def test_generic_model_keeps_its_early_stages_adaptors():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = da2ext.adapt(import_timm().create_model("convnext_atto"), 10, adaptor_max_stride=8)
    assert model.da2ext_adaptor_strides == {"stages.0": 4, "stages.1": 8}
    assert model.da2ext_stages == ["stages.0", "stages.1"]
    assert any("adaptors after 2 stage(s): stages.0, stages.1" in str(w.message) for w in caught)
    model(torch.randn(2, 3, 64, 64)).sum().backward()


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_max_stride_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="adaptor_max_stride must be None or an int >= 1"):
        da2ext.adapt(torchvision.models.resnet18(), 10, adaptor_max_stride=bad)
