"""Shift calibration (da2ext.lean.shift_calibration): the running means AdaBN
estimates on a domain, folded into the trainable BN shifts. What it must do: move
every shift by (mu - mu') * gamma / sqrt(var + eps), with mu' the running mean BN
in train mode reaches over the batches (the reference: the original model's BNs in
train mode, momentum None); the lean backbone and its plainly frozen twin alike;
nothing but the shifts changes."""
import copy

import pytest
import torch
from torch import nn

import da2ext
from da2ext.lean.shift_calibration import calibrate_shifts, calibrated_layers
from helpers import FAMILY_NAMES, adapt_quietly, import_timm, make_original, randomize_bn, shift_parameters


def _adabn_shifts(original, batches):
    """The shifts AdaBN's running means give: every BN of a copy of `original` in
    train mode with a cumulative average (momentum None) over `batches` (of equal
    sizes, where a per-batch average is a per-image one)."""
    model = copy.deepcopy(original)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    pretrained = [(m.running_mean.clone().double(), m.running_var.clone().double()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return [m.bias.detach().double() + (mu - m.running_mean.double()) * m.weight.detach().double() /
            torch.sqrt(var + m.eps) for m, (mu, var) in zip(norms, pretrained)]


def test_a_plainly_frozen_model_gets_the_shifts_of_adabn_running_means():
    original, shape = make_original("resnet18", dtype=torch.float64)
    eager = adapt_quietly(copy.deepcopy(original), 5, lean=False).double().train()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    expected = _adabn_shifts(original, batches)
    assert calibrate_shifts(eager, batches) == len(expected)
    actual = [m.bias.detach() for m in eager.modules() if isinstance(m, nn.BatchNorm2d)]
    for a, e in zip(actual, expected):
        assert torch.allclose(a, e, rtol=1e-9, atol=1e-9)


def test_over_batches_of_different_sizes_the_mean_is_weighted_by_images():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn).double().eval()
    for p in (conv.weight, conv.bias, bn.weight):
        p.requires_grad_(False)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    batches = [torch.randn(3, 3, 8, 8, dtype=torch.float64) + 1, torch.randn(5, 3, 8, 8, dtype=torch.float64) - 2]
    with torch.no_grad():
        domain_mean = torch.cat([conv(b) for b in batches]).mean(dim=(0, 2, 3))  # the first BN's input: exact
    expected = bn.bias.detach() + (bn.running_mean - domain_mean) * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert calibrate_shifts(model, [(b, None) for b in batches]) == 1
    assert torch.allclose(bn.bias, expected, rtol=1e-12, atol=1e-12)
    assert not bn.training


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lean_and_plainly_frozen_backbones_calibrate_alike(family):
    original, shape = make_original(family, dtype=torch.float64)
    lean = adapt_quietly(copy.deepcopy(original), 5, rank=4, backbone_dtype=torch.float64).double().train()
    eager = adapt_quietly(copy.deepcopy(original), 5, lean=False, rank=4).double().train()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(shape, generator=generator, dtype=torch.float64) * 1.5 + 0.5 for _ in range(2)]
    lean_shifts = [p for p in shift_parameters(lean) if p.requires_grad]
    eager_shifts = [p for p in shift_parameters(eager) if p.requires_grad]
    assert len(lean_shifts) == len(eager_shifts) > 0
    starts = [p.detach().clone() for p in lean_shifts]
    assert calibrate_shifts(lean, batches) == calibrate_shifts(eager, batches) == len(lean_shifts)
    for a, b, start in zip(lean_shifts, eager_shifts, starts):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    assert any(not torch.equal(a, s) for a, s in zip(lean_shifts, starts))


@pytest.mark.parametrize("name", ["timm_efficientnet_b0", "tv_mobilenet_v3_small"])
def test_recomputed_blocks_calibrate_as_their_plainly_frozen_twins(name):
    """Blocks kept as their inputs and recomputed (SiLU, hardswish, squeeze-excitation:
    da2ext.RecomputedBlock, in the family path and the generic one) calibrate their
    BNs as the plainly frozen model does."""
    import warnings
    torch.manual_seed(0)
    if name == "timm_efficientnet_b0":
        original = import_timm().create_model("efficientnet_b0")
    else:
        original = pytest.importorskip("torchvision").models.mobilenet_v3_small()
    original = randomize_bn(original).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic path says what it did
        dtype = dict(backbone_dtype=torch.float64) if name == "timm_efficientnet_b0" else {}  # generic: its own
        lean = da2ext.adapt(copy.deepcopy(original), 5, rank=4, **dtype).double().train()
        eager = da2ext.adapt(copy.deepcopy(original), 5, lean=False, rank=4).double().train()
    assert any(isinstance(m, da2ext.RecomputedBlock) for m in lean.modules())
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 64, 64, generator=generator, dtype=torch.float64) * 1.5 + 0.5 for _ in range(2)]
    lean_shifts, eager_shifts = shift_parameters(lean), shift_parameters(eager)
    assert len(lean_shifts) == len(eager_shifts) > 0
    assert calibrate_shifts(lean, batches) == calibrate_shifts(eager, batches) == len(lean_shifts)
    for a, b in zip(lean_shifts, eager_shifts):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_only_the_shifts_change_and_batch_statistics_bns_are_left_alone():
    """The tail's last BN normalises with batch statistics: not calibrated, its running statistics kept."""
    original, shape = make_original("resnet18")
    model = adapt_quietly(original, 5, rank=4, train_last=1).train()  # the tail's last BN: batch statistics
    before = copy.deepcopy(model.state_dict())
    shifts = set(id(p) for _, m in calibrated_layers(model)
                 for p in ([m.shift] if isinstance(m, da2ext.FrozenConvBNAct) else [m.bias]))
    batch_statistics = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    assert batch_statistics and not any(m in dict(calibrated_layers(model)).values() for m in batch_statistics)
    calibrate_shifts(model, [torch.randn(shape) + 1])
    changed = [name for name, t in model.state_dict().items() if not torch.equal(t, before[name])]
    by_id = dict((id(t), name) for name, t in model.named_parameters())
    assert changed and set(changed) <= set(by_id[i] for i in shifts)
    assert model.training  # the mode it was in


def test_a_model_with_nothing_to_calibrate_and_empty_input():
    original, shape = make_original("resnet18")
    model = adapt_quietly(original, 5, shifts=False)
    assert calibrated_layers(model) == [] and calibrate_shifts(model, [torch.randn(shape)]) == 0
    model = adapt_quietly(make_original("resnet18")[0], 5)
    with pytest.raises(ValueError, match="batches: calibrate_shifts needs at least one image"):
        calibrate_shifts(model, [torch.randn((0,) + shape[1:])])


def test_a_domain_calibrates_its_own_shifts_only(tmp_path):
    original, shape = make_original("resnet18")
    model = da2ext.MultiDomainModel(original)
    model.add_domain("first", 3)
    model.add_domain("second", 3)
    first = dict((k, v.clone()) for k, v in model.domain_tensors("first").items())
    with model.domain("second"):
        assert calibrate_shifts(model, [torch.randn(shape) + 1]) > 0
    assert all(torch.equal(first[k], v) for k, v in model.domain_tensors("first").items())
    second = model.domain_tensors("second")
    assert any(not torch.equal(first[k], second[k]) for k in first if "shift" in k)


def test_train_calibrate_shifts_is_recorded_and_is_part_of_what_a_run_is(tmp_path, capsys):
    import json
    import os
    from helpers import CLI_TINY, run_cli, write_image_folder
    data = write_image_folder(str(tmp_path / "shapes"), train_per_class=4, val_per_class=2)
    runs = str(tmp_path / "runs")
    status, out, err = run_cli(["train", "--data", data, "--workdir", runs, "--epochs", "1"] + CLI_TINY, capsys)
    assert status == 0, err
    with open(os.path.join(runs, "metrics", "shapes-da2.json")) as f:
        metrics = json.load(f)
    assert metrics["settings"]["calibrate_shifts"] is True and metrics["calibrated_layers"] > 0
    # Calibration is the default; without it it is another run: refused without --overwrite, naming the change.
    status, _, err = run_cli(["train", "--data", data, "--workdir", runs, "--epochs", "1", "--no-calibrate-shifts"]
                             + CLI_TINY, capsys)
    assert status == 2 and "calibrate_shifts True -> False" in err, err
