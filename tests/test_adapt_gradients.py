"""The lean adapted model's gradients equal plain PyTorch autograd's (docs/design.md §3, §3a).

float64 on the CPU: adapt(..., backbone_dtype=torch.float64) (folded convs, packed
masks, fused adaptors, uint8 max-pool offsets) against adapt(..., lean=False) (the
original modules, plainly frozen, eager reference adaptors), with identical random
adaptor and head parameters (gamma non-zero), in train mode."""
import copy

import pytest
import torch

from helpers import (FAMILY_NAMES, adapt_quietly, all_devices, forward_backward, make_original, named_trainable,
                     randomize_bn, randomize_common_trainable, relative_error, shift_parameters)

TOLERANCE = 1e-10


def lean_and_eager(family, **settings):
    original, shape = make_original(family, dtype=torch.float64)
    lean = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float64, **settings).double()
    eager = adapt_quietly(copy.deepcopy(original), 10, lean=False, **settings).double()
    common = randomize_common_trainable(lean, eager)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    return lean, eager, common, x


def check_gradients_agree(lean, eager, common, x, settings):
    assert lean.training and eager.training
    y_lean, gx_lean = forward_backward(lean, x)
    y_eager, gx_eager = forward_backward(eager, x)
    assert relative_error(y_lean, y_eager) < TOLERANCE
    assert gx_eager.abs().max() > 0
    assert relative_error(gx_lean, gx_eager) < TOLERANCE

    lean_params, eager_params = named_trainable(lean), named_trainable(eager)
    adaptor_names = [name for name in common if ".adaptor." in name]
    assert bool(adaptor_names) is settings.get("adaptors", True)
    assert any(name.endswith("gamma") for name in adaptor_names) is settings.get("adaptors", True)
    head_names = [name for name in common if ".adaptor." not in name]
    assert len(head_names) == 2  # the head's weight and bias
    nonzero = 0
    for name in common:
        expected = eager_params[name].grad
        assert expected is not None, name
        # (a saturated sigmoid or a dead hidden unit of a random adaptor gives an exact 0 here and there)
        nonzero += bool(expected.abs().max() > 0)
        if name.endswith("gamma") or name in head_names:
            assert expected.abs().max() > 0, name
        assert relative_error(lean_params[name].grad, expected) < TOLERANCE, name
    assert nonzero >= 0.8 * len(common)

    lean_shifts, eager_shifts = shift_parameters(lean), shift_parameters(eager)
    assert len(lean_shifts) == len(eager_shifts) > 0
    for i, (a, b) in enumerate(zip(lean_shifts, eager_shifts)):
        assert a.shape == b.shape, i
        if settings.get("shifts", True):
            assert a.requires_grad and b.requires_grad
            assert relative_error(a.grad, b.grad) < TOLERANCE, i
        else:
            assert not a.requires_grad and a.grad is None and b.grad is None
    # the lean model trains exactly what the eager one does
    trained = sum(p.numel() for p in lean_params.values())
    assert trained == sum(p.numel() for p in eager_params.values())


@pytest.mark.parametrize("cpu_channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradients_match_plain_autograd(family, cpu_channels_last):
    lean, eager, common, x = lean_and_eager(family, cpu_channels_last=cpu_channels_last)
    check_gradients_agree(lean, eager, common, x, {})


SETTINGS = [dict(shifts=False), dict(adaptors=False), dict(mode="mul"), dict(rank=4), dict(rank=3, mode="mul")]


@pytest.mark.parametrize("settings", SETTINGS, ids=["no_shifts", "no_adaptors", "mul", "rank4", "rank3_mul"])
@pytest.mark.parametrize("family", ["resnet18", "tf_efficientnet_lite0"])
def test_gradients_match_plain_autograd_ablations(family, settings):
    lean, eager, common, x = lean_and_eager(family, **settings)
    check_gradients_agree(lean, eager, common, x, settings)


@pytest.mark.parametrize("cpu_channels_last", [True, False], ids=["channels_last", "nchw"])
def test_gradients_match_for_a_bottleneck_resnet(cpu_channels_last):
    """resnet50 (Bottleneck blocks, a projection in every first block) at a tiny input."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original = randomize_bn(torchvision.models.resnet50()).double()
    lean = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float64,
                         cpu_channels_last=cpu_channels_last).double()
    eager = adapt_quietly(copy.deepcopy(original), 10, lean=False).double()
    common = randomize_common_trainable(lean, eager)
    x = torch.randn(1, 3, 35, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    check_gradients_agree(lean, eager, common, x, {})


def _without_dropout(model):
    """No dropout (its masks come from each device's own generator): nn.Dropout and
    timm's drop_rate before the classifier."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_rate"):
            module.drop_rate = 0.0
    return model


@pytest.mark.parametrize("device", [d for d in all_devices() if d != "cpu"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cuda_matches_cpu(family, device):
    """The lean model on CUDA (packed masks and fused adaptors from the CUDA kernels,
    cuDNN's convs) against the same lean model on the CPU, whose kernels the tests
    above tie to plain autograd. Both in float32: against float64, float32 rounding
    alone turns near-ties of the adaptor's channel max and of ReLU6's clamp at 6 into
    different choices (Lite0 on the CPU: one shift gradient 5% off). TF32 off: it alone
    moves float32 gradients by percents."""
    original, shape = make_original(family)
    model = _without_dropout(adapt_quietly(copy.deepcopy(original), 10))
    randomize_common_trainable(model, copy.deepcopy(model))
    reference = copy.deepcopy(model)
    model.to(device)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model.train()
        reference.train()
        y, gx = forward_backward(model, x.to(device))
        y_ref, gx_ref = forward_backward(reference, x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
    assert y.device.type == "cuda"
    assert relative_error(y, y_ref) < 1e-5
    assert relative_error(gx, gx_ref) < 1e-4
    reference_params = named_trainable(reference)
    for name, p in named_trainable(model).items():
        assert p.grad is not None and p.grad.device.type == "cuda", name
        # a one-element gradient (spatial.bias) is a sum whose terms cancel: looser than 1e-4
        assert relative_error(p.grad, reference_params[name].grad) < 1e-3, name
