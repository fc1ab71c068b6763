"""adapt(): the adapted model computes the original function, runs the layers before
the first trainable parameter without autograd, handles what it cannot rewrite,
holds a float16 backbone, validates its arguments, reports its trainable
parameters; and profile_step's figures (docs/design.md §3, §3a, §4).

The helpers it shares with test_adapt_gradients.py, test_adapt_memory.py and
others are in helpers.py."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (FAMILY_NAMES, adapt_quietly, bn_buffers, features_module, forward_backward, head_of, import_timm,
                     kernel_devices, make_original, named_trainable, randomize_bn, randomize_common_trainable,
                     relative_error, shift_parameters)
from da2ext.lean.adapt import AdaptedBlock, Head, adapt, supported_family
from da2ext.lean.frozen_conv import FrozenConvBNAct
from da2ext.lean.recomputed_block import RecomputedBlock
from da2ext.profiling import SavedTensorCounter, model_state, profile_step
from da2ext.lean.trainable import print_trainable_parameters, trainable_parameters

torchvision = pytest.importorskip("torchvision")

# ------------------------------------------------------------------------------------------
# Helpers of this file (the shared ones are in helpers.py)


def copy_head(source, target):
    """Copy the original classifier's weights into an adapted model's 1000-class Head."""
    with torch.no_grad():
        head_of(target).weight.copy_(head_of(source).weight)
        head_of(target).bias.copy_(head_of(source).bias)


def assert_buffers_unchanged(before, model):
    after = bn_buffers(model)
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), "BN buffer {} changed".format(name)


def capture_input(module):
    """Forward pre-hook storing the module's (first) input; returns (store, handle)."""
    store = {}

    def hook(mod, inputs):
        store["x"] = inputs[0].detach().clone()

    return store, module.register_forward_pre_hook(hook)


class Wrapper(nn.Module):
    """A module adapt() does not know, wrapping a block it does."""

    def __init__(self, inner):
        super(Wrapper, self).__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


# ------------------------------------------------------------------------------------------
# 1. The adapted model computes the original function (gamma = 0, head copied)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "eager"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapted_model_computes_the_original_function(family, lean):
    original, shape = make_original(family)
    adapted = adapt_quietly(copy.deepcopy(original), num_classes=1000, lean=lean)
    copy_head(original, adapted)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))

    original_features, hook = capture_input(features_module(original))
    with torch.no_grad():
        expected = original(x)
    hook.remove()

    for train in (False, True):
        adapted.train(train)
        if train:  # the frozen backbone keeps its inference behaviour
            blocks = [b for b in adapted.modules() if isinstance(b, AdaptedBlock)]
            assert blocks and all(not m.training for b in blocks for m in b.block.modules())
        features, hook = capture_input(features_module(adapted))
        with torch.no_grad():
            output = adapted(x)
        hook.remove()
        assert relative_error(features["x"], original_features["x"]) < 1e-5, (train, "features")
        if not train or family != "mobilenet_v2":  # its classifier has Dropout in train mode
            assert relative_error(output, expected) < 1e-5, train
            assert (output - expected).abs().max().item() < 1e-5 * expected.abs().max().item() + 1e-6


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_train_mode_forward_backward_leaves_bn_statistics_alone_when_unchanged(family):
    """lean=False leaves every module unchanged (plainly frozen): its BNs must stay in eval
    mode through model.train(), a forward and a backward."""
    original, shape = make_original(family)
    eager = adapt_quietly(copy.deepcopy(original), num_classes=5, lean=False)
    before = bn_buffers(eager)
    assert before
    eager.train()
    eager(torch.randn(*shape)).sum().backward()
    assert_buffers_unchanged(before, eager)
    assert all(not m.training for m in eager.modules() if isinstance(m, nn.BatchNorm2d))


def test_state_dict_round_trip_and_deepcopy():
    """The adapted model's state (folded buffers, shifts, adaptors, head) saves and loads into
    another adaptation of the same architecture."""
    original, shape = make_original("resnet18")
    trained = adapt_quietly(copy.deepcopy(original), 7)
    randomize_common_trainable(trained, adapt_quietly(copy.deepcopy(original), 7))
    fresh = adapt_quietly(torchvision.models.resnet18(), 7)  # other (random) backbone weights
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(*shape)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
        assert torch.equal(copy.deepcopy(trained)(x), trained(x))


# ------------------------------------------------------------------------------------------
# 5. Layers before the first trainable parameter run without autograd


def _stem(model):
    return model.conv1 if supported_family(model) == "resnet" else model.conv_stem


@pytest.mark.parametrize("family", ["resnet18", "tf_efficientnet_lite0"])
@pytest.mark.parametrize("shifts", [False, True])
def test_stem_runs_without_autograd_unless_its_shift_trains(family, shifts):
    original, shape = make_original(family)
    model = adapt_quietly(copy.deepcopy(original), 10, shifts=shifts)
    outputs = {}
    stem = _stem(model)
    assert isinstance(stem, FrozenConvBNAct)
    first = model.layer1[0] if family == "resnet18" else model.blocks[0][0]
    hooks = [stem.register_forward_hook(lambda m, i, o: outputs.__setitem__("stem", o)),
             first.block.register_forward_hook(lambda m, i, o: outputs.__setitem__("block", o)),
             first.register_forward_hook(lambda m, i, o: outputs.__setitem__("adapted", o))]
    model(torch.randn(*shape))
    for hook in hooks:
        hook.remove()
    assert outputs["stem"].requires_grad is shifts
    assert (outputs["stem"].grad_fn is not None) is shifts
    # the first block's output needs autograd only if a shift trains before it;
    # the adaptor after it is the first trainable parameter otherwise
    assert outputs["block"].requires_grad is shifts
    assert outputs["adapted"].requires_grad


def test_nothing_trains_in_the_backbone_without_adaptors_and_shifts():
    original, shape = make_original("resnet18")
    model = adapt_quietly(copy.deepcopy(original), 10, adaptors=False, shifts=False)
    features, hook = capture_input(model.fc)
    x = torch.randn(*shape)
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        model(x).sum().backward()
    hook.remove()
    assert not features["x"].requires_grad
    assert counter.saved_bytes == x.shape[0] * 512 * 4  # the head's input, nothing else
    assert model.fc.weight.grad is not None


# ------------------------------------------------------------------------------------------
# 6. Modules adapt() cannot rewrite


def _wrapped_resnet18():
    original, shape = make_original("resnet18", dtype=torch.float64)
    original.layer2[0] = Wrapper(original.layer2[0])
    return original, shape


def test_an_unknown_block_is_recomputed_from_its_input_and_keeps_working():
    """A block the lean rewrite does not know keeps its input and runs again in
    backward (RecomputedBlock): no warning, plain autograd's gradients."""
    original, shape = _wrapped_resnet18()
    lean = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float64).double()
    assert isinstance(lean.layer2[0], AdaptedBlock) and lean.layer2[0].adaptor is not None
    assert isinstance(lean.layer2[0].block, RecomputedBlock) and isinstance(lean.layer2[0].block.module, Wrapper)
    assert not isinstance(lean.layer2[1].block, RecomputedBlock)  # a known block stays bit-lean
    eager = adapt_quietly(copy.deepcopy(original), 10, lean=False).double()
    randomize_common_trainable(lean, eager)
    x = torch.randn(*shape, dtype=torch.float64)

    before = bn_buffers(lean)
    assert any(name.startswith("layer2.0.") for name in before)  # the unchanged block's BNs
    lean.train()
    y_lean, gx_lean = forward_backward(lean, x)
    assert_buffers_unchanged(before, lean)
    y_eager, gx_eager = forward_backward(eager, x)
    assert relative_error(y_lean, y_eager) < 1e-10
    assert relative_error(gx_lean, gx_eager) < 1e-10
    lean_params, eager_params = named_trainable(lean), named_trainable(eager)
    for name in set(lean_params) & set(eager_params):
        assert relative_error(lean_params[name].grad, eager_params[name].grad) < 1e-10, name
    lean_shifts, eager_shifts = shift_parameters(lean), shift_parameters(eager)
    assert len(lean_shifts) == len(eager_shifts) == 20
    for a, b in zip(lean_shifts, eager_shifts):
        assert relative_error(a.grad, b.grad) < 1e-10


def test_timm_efficientnet_with_se_and_silu_is_recomputed_and_keeps_working():
    timm = import_timm()
    torch.manual_seed(0)
    original = randomize_bn(timm.create_model("efficientnet_b0"))
    assert supported_family(original) == "timm_efficientnet"
    model = adapt_quietly(copy.deepcopy(original), 1000)
    assert isinstance(model.conv_stem, RecomputedBlock) and isinstance(model.conv_head, RecomputedBlock)
    assert all(isinstance(block.block, RecomputedBlock) for stage in model.blocks for block in stage)
    copy_head(original, model)
    x = torch.randn(2, 3, 64, 64)
    before = bn_buffers(model)
    model.train()
    with torch.no_grad():
        expected = original(x)
    output = model(x)
    assert relative_error(output, expected) < 1e-5
    output.sum().backward()
    assert_buffers_unchanged(before, model)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_timm_mobilenetv3_is_adapted_generically():
    timm = import_timm()
    model = timm.create_model("mobilenetv3_large_100")
    assert supported_family(model) is None  # not made lean: tests/test_generic_adapt.py
    with pytest.warns(UserWarning, match="MobileNetV3 is not a family adapt"):
        adapt(model, 10)
    assert model.da2ext_stages == ["blocks.{}".format(i) for i in range(7)]


# ------------------------------------------------------------------------------------------
# 7. A float16 backbone (the Jetson's: on the CPU where torch has float16 convs, and on CUDA)


def _cpu_half_conv_works():
    try:
        x = torch.randn(1, 2, 5, 5, dtype=torch.float16)
        w = torch.randn(3, 2, 3, 3, dtype=torch.float16)
        F.conv2d(x, w)
        F.conv_transpose2d(torch.randn(1, 3, 3, 3, dtype=torch.float16), w)
        return True
    except RuntimeError:
        return False


HALF_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_half_conv_works(),
                                                 reason="this torch has no float16 conv2d on the CPU")),
    pytest.param("cuda", marks=pytest.mark.skipif("cuda" not in kernel_devices(),
                                                  reason="needs a CUDA GPU and a CUDA build of da2ext")),
]


@pytest.mark.parametrize("device", HALF_DEVICES)
def test_float16_backbone(device):
    original, shape = make_original("resnet18")
    full = adapt_quietly(copy.deepcopy(original), 10)
    half = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float16)
    randomize_common_trainable(half, full, std=0.1)
    full.to(device)
    half.to(device)
    for module in half.modules():
        if isinstance(module, FrozenConvBNAct):
            assert module.weight.dtype == torch.float16
            assert module.shift.dtype == torch.float32 and module.frozen_bias.dtype == torch.float32
    for name, p in half.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
    assert isinstance(half.fc, Head) and half.fc.weight.dtype == torch.float32
    x = torch.randn(*shape, device=device)
    y_full, gx_full = forward_backward(full, x)
    y_half, gx_half = forward_backward(half, x)
    assert y_half.dtype == torch.float32
    assert relative_error(y_half, y_full) < 1e-2
    assert torch.isfinite(gx_half).all()
    # The gradients only roughly. At this tiny input float16 rounding in the backbone flips
    # a few ReLU masks (2 of 6,144 at the last block on the CPU), and those move a BN shift's
    # gradient (a dozen elements per channel) by a few percent and an adaptor's fc1.weight
    # gradient (a few live hidden units) by up to 21% (an H100). So: every gradient finite
    # and float32; all of them together within 10%; each tensor within 50%, which still
    # catches a zero or a missing term (100%). A one-element gradient (an adaptor's
    # spatial.bias) sums N*H*W terms that largely cancel, so it can move by more than its
    # own size (0.0048 against 0.0013 on an H100 machine's CPU): it counts only in the
    # total. The float64 gradient tests cover the maths.
    full_params = named_trainable(full)
    half_grads, full_grads = [], []
    for name, p in named_trainable(half).items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        if name in full_params:
            half_grads.append(p.grad.flatten())
            full_grads.append(full_params[name].grad.flatten())
            if p.numel() > 1:
                assert relative_error(p.grad, full_params[name].grad) < 0.5, name
    half_shifts, full_shifts = shift_parameters(half), shift_parameters(full)
    assert len(half_shifts) == len(full_shifts) == 20
    for a, b in zip(half_shifts, full_shifts):
        assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
        assert relative_error(a.grad, b.grad) < 0.5
        half_grads.append(a.grad.flatten())
        full_grads.append(b.grad.flatten())
    assert relative_error(torch.cat(half_grads), torch.cat(full_grads)) < 0.1
    assert relative_error(half.fc.weight.grad, full.fc.weight.grad) < 1e-2  # no mask between


# ------------------------------------------------------------------------------------------
# 8. Argument validation


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=-3), ValueError, "num_classes"),
    (dict(num_classes=True), ValueError, "num_classes"),
    (dict(num_classes=10.0), ValueError, "num_classes"),
    (dict(num_classes="10"), ValueError, "num_classes"),
    (dict(num_classes=10, mode="foo"), ValueError, "mode.*foo"),
    (dict(num_classes=10, reduction=0), ValueError, "reduction"),
    (dict(num_classes=10, reduction=2.5), ValueError, "reduction"),
    (dict(num_classes=10, backbone_dtype=torch.int32), ValueError, "backbone_dtype.*int32"),
    (dict(num_classes=10, backbone_dtype=torch.bfloat16), ValueError, "backbone_dtype"),
    (dict(num_classes=10, lean=False, backbone_dtype=torch.float16), ValueError, "backbone_dtype.*lean"),
])
def test_bad_arguments_are_refused_before_touching_the_model(kwargs, error, pattern):
    model = torchvision.models.resnet18()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=pattern):
        adapt(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters())  # not frozen
    assert isinstance(model.fc, nn.Linear) and not isinstance(model.fc, Head)
    assert type(model.layer1[0]).__name__ == "BasicBlock"
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("model", [nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Linear(3, 4)], ids=["Sequential", "Linear"])
def test_unsupported_model_type(model):
    with pytest.raises(TypeError, match=type(model).__name__):
        adapt(model, 10)


@pytest.mark.parametrize("kwargs, name", [
    (dict(shifts="no"), "shifts"),
    (dict(shifts=None), "shifts"),
    (dict(adaptors="no"), "adaptors"),
    (dict(lean="no"), "lean"),
    (dict(reduction=True), "reduction"),
], ids=["shifts_str", "shifts_none", "adaptors_str", "lean_str", "reduction_bool"])
def test_bad_switches_are_refused_before_touching_the_model(kwargs, name):
    model = torchvision.models.resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((TypeError, ValueError), match=name):
            adapt(model, 10, **kwargs)
    assert all(p.requires_grad for p in model.parameters())


def test_adapting_twice():
    model = adapt_quietly(torchvision.models.resnet18(), 10)
    with pytest.raises(ValueError, match="adapted already"):
        adapt(model, 10)
    with pytest.raises(ValueError, match="adapted already"):
        adapt(model, 10, lean=False)


# ------------------------------------------------------------------------------------------
# 9. trainable_parameters / print_trainable_parameters


def _expected_groups(model):
    groups = {"adaptors": 0, "shifts": 0, "head": 0}
    for module in model.modules():
        if isinstance(module, AdaptedBlock) and module.adaptor is not None:
            groups["adaptors"] += sum(p.numel() for p in module.adaptor.parameters() if p.requires_grad)
        elif isinstance(module, FrozenConvBNAct) and module.shift.requires_grad:
            groups["shifts"] += module.shift.numel()
        elif isinstance(module, Head):
            groups["head"] += sum(p.numel() for p in module.parameters())
    return groups


@pytest.mark.parametrize("settings", [dict(), dict(adaptors=False), dict(shifts=False),
                                      dict(adaptors=False, shifts=False)],
                         ids=["default", "no_adaptors", "no_shifts", "head_only"])
def test_trainable_parameter_counts(settings):
    original = torchvision.models.resnet18()
    original_total = sum(p.numel() for p in original.parameters())
    model = adapt_quietly(copy.deepcopy(original), 10, **settings)
    counts = trainable_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable"] == trainable
    expected = _expected_groups(model)
    for group in ("adaptors", "shifts", "head"):
        assert counts[group] == expected[group], group
    assert counts["other"] == 0
    assert counts["adaptors"] + counts["shifts"] + counts["head"] == trainable
    assert counts["head"] == 512 * 10 + 10
    assert (counts["adaptors"] > 0) is settings.get("adaptors", True)
    # 9,600 = the BN channels of resnet18: the stem's 64, 4,800 in the blocks, ...
    bn_channels = sum(m.num_features for m in original.modules() if isinstance(m, nn.BatchNorm2d))
    assert counts["shifts"] == (bn_channels if settings.get("shifts", True) else 0)
    # folded conv + BN (weight, frozen_bias, shift) hold as many numbers as conv + BN (weight, gamma, beta)
    adaptors_total = sum(p.numel() for m in model.modules() if isinstance(m, AdaptedBlock) and m.adaptor is not None
                         for p in m.adaptor.parameters())
    assert counts["total"] == original_total - (512 * 1000 + 1000) + (512 * 10 + 10) + adaptors_total
    assert counts["percent"] == pytest.approx(100.0 * trainable / counts["total"])


def test_print_trainable_parameters(capsys):
    model = adapt_quietly(torchvision.models.resnet18(), 10)
    counts = trainable_parameters(model)
    print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    assert line == "trainable params: {:,} || all params: {:,} || trainable%: {:.4f} " \
                   "(adaptors {:,}, shifts {:,}, head {:,})".format(
                       counts["trainable"], counts["total"], counts["percent"], counts["adaptors"],
                       counts["shifts"], counts["head"])
    model = adapt_quietly(torchvision.models.resnet18(), 10, adaptors=False, shifts=False)
    print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    assert re.match(r"trainable params: 5,130 \|\| all params: [\d,]+ \|\| trainable%: [\d.]+ "
                    r"\(adaptors 0, shifts 0, head 5,130\)$", line), line


def test_print_trainable_parameters_reports_other_parameters(capsys):
    model = adapt_quietly(torchvision.models.resnet18(), 10, adaptors=False, shifts=False)
    model.extra = nn.Parameter(torch.zeros(7))
    assert trainable_parameters(model)["other"] == 7
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip().endswith("(adaptors 0, shifts 0, head 5,130, other 7)")


# ------------------------------------------------------------------------------------------
# 10. profile_step


def _param_bytes(params):
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_profile_step_figures(momentum):
    original, shape = make_original("resnet18")
    model = adapt_quietly(copy.deepcopy(original), 10)
    x = torch.randn(*shape)
    targets = torch.tensor([1, 7])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=momentum)
    figures = profile_step(model, x, targets, F.cross_entropy, optimizer, warmup=1, steps=2)
    assert set(figures) == {"saved_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "peak_cuda_bytes",
                            "step_time"}
    assert figures["peak_cuda_bytes"] is None
    assert figures["step_time"] > 0
    assert figures["grad_bytes"] == _param_bytes(trainable)
    assert figures["optimizer_bytes"] == (_param_bytes(trainable) if momentum else 0)
    assert figures["param_bytes"] == _param_bytes(list(model.parameters()) + list(model.buffers()))
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        F.cross_entropy(model(x), targets)
    assert figures["saved_bytes"] == counter.saved_bytes > 0
    # the same step on the plainly frozen eager model keeps far more
    eager = adapt_quietly(copy.deepcopy(original), 10, lean=False)
    eager_trainable = [p for p in eager.parameters() if p.requires_grad]
    eager_figures = profile_step(eager, x, targets, F.cross_entropy,
                                 torch.optim.SGD(eager_trainable, lr=1e-3, momentum=momentum), steps=1)
    assert eager_figures["grad_bytes"] == figures["grad_bytes"]  # same trainable set
    assert eager_figures["saved_bytes"] > 10 * figures["saved_bytes"]
