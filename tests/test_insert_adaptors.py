"""da2ext.insert_adaptors: adaptors after the modules a user names (or a predicate
picks) in any model; the model computes what it did until they learn, and bad
choices are refused naming what was wrong."""
import re

import pytest
import torch
from torch import nn

import da2ext
from da2ext.lean.insert_adaptors import AdaptorAfter

torchvision = pytest.importorskip("torchvision")


def frozen_regnet():
    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_adaptors_go_after_the_named_modules_and_start_as_the_identity():
    model = frozen_regnet()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = model(x)
    names = da2ext.insert_adaptors(model, ["trunk_output.block2", "trunk_output.block4"], x, rank=4)
    assert names == ["trunk_output.block2", "trunk_output.block4"]
    wrapped = model.trunk_output.block2
    assert isinstance(wrapped, AdaptorAfter) and wrapped.adaptor.channels == 64
    assert model.trunk_output.block4.adaptor.channels == 400 and model.trunk_output.block4.adaptor.rank == 4
    with torch.no_grad():
        assert torch.equal(model(x), before)  # gamma 0


def test_only_the_adaptors_train_in_a_frozen_model():
    model = frozen_regnet()
    x = torch.randn(2, 3, 48, 48)
    names = da2ext.insert_adaptors(model, lambda name, module: re.fullmatch(r"trunk_output\.block\d", name), x)
    assert len(names) == 4
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adaptor." in name for name in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(std=0.5)
    model(x).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()
               if p.requires_grad and not name.endswith("fc1.bias"))


def test_the_adaptors_run_in_their_dtype_after_a_float64_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3).double(), nn.ReLU())
    da2ext.insert_adaptors(model, ["0"], torch.randn(1, 3, 9, 9, dtype=torch.float64))
    y = model(torch.randn(2, 3, 9, 9, dtype=torch.float64))
    assert y.dtype == torch.float64 and model[0].adaptor.gamma.dtype == torch.float32


@pytest.mark.parametrize("after,message", [
    (["trunk_output.nope"], "no submodule named 'trunk_output.nope'"),
    (["trunk_output", "trunk_output.block1"], "trunk_output.block1 lies inside trunk_output"),
    (["fc"], "fc gave no N x C x H x W output"),
    (lambda name, module: False, "selects no module"),
])
def test_bad_choices_are_refused_by_name(after, message):
    model = frozen_regnet()
    with pytest.raises(ValueError, match=message):
        da2ext.insert_adaptors(model, after, torch.randn(1, 3, 32, 32))
    assert not any(isinstance(m, AdaptorAfter) for m in model.modules())  # nothing changed


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank"):
        da2ext.insert_adaptors(frozen_regnet(), ["stem"], torch.randn(1, 3, 32, 32), rank=0)
