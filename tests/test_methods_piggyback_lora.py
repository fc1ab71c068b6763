"""The piggyback and lora_conv methods (docs/design.md §5): right after the build the
features are the pretrained backbone's, only the masks' scores / the LoRA
matrices and the head train, the mask's gradient is the straight-through one,
a step moves what trains and nothing else, BN statistics stay the pretrained
ones in train mode, and a MultiDomainModel on either round-trips its domains."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from da2ext import MultiDomainModel
from da2ext.lean.adapt import Head
from da2ext.methods.lora_conv import LORA_CONV
from da2ext.methods.piggyback import PIGGYBACK, THRESHOLD, PiggybackConv2d, masked_weight

METHODS = {"piggyback": PIGGYBACK, "lora_conv": LORA_CONV}


def _tf_efficientnet_lite0():
    timm = pytest.importorskip("timm")
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


BACKBONES = {"tf_efficientnet_lite0": _tf_efficientnet_lite0, "resnet18": torchvision.models.resnet18,
             "mobilenet_v2": torchvision.models.mobilenet_v2}


def method(name):
    if name == "lora_conv":
        pytest.importorskip("peft")
    return METHODS[name]


def backbone(name, seed=0):
    torch.manual_seed(seed)
    model = BACKBONES[name]().eval()
    # Non-trivial BN statistics, so that "the BN runs in eval mode" is visible in the output.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def inputs(seed=1, shape=(2, 3, 33, 31)):  # odd sizes: TF "same" padding pads unevenly
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def head_of(model):
    heads = [m for m in model.modules() if isinstance(m, Head)]
    assert len(heads) == 1
    return heads[0]


def features(model, x):
    """What the head reads."""
    got = []
    hook = head_of(model).register_forward_pre_hook(lambda module, args: got.append(args[0].detach().clone()))
    try:
        model(x)
    finally:
        hook.remove()
    return got[0]


def reference_features(original, x):
    if hasattr(original, "fc"):
        original.fc = nn.Identity()
    elif isinstance(original, torchvision.models.MobileNetV2):
        original.classifier[-1] = nn.Identity()
    else:
        original.classifier = nn.Identity()
    with torch.no_grad():
        return original.eval()(x)


def train_step(model, groups, x, steps=1, seed=0):
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(groups)
    targets = torch.randint(0, head_of(model).out_features, (x.shape[0],))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), targets).backward()
        optimizer.step()


# -- the build ---------------------------------------------------------------------------


@pytest.mark.parametrize("backbone_name", sorted(BACKBONES))
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_features_equal_the_pretrained_backbone_right_after_build(method_name, backbone_name):
    m = method(method_name)
    original = backbone(backbone_name)
    reference = copy.deepcopy(original)
    model = m.build(original, 10)
    x = inputs()
    # Train mode on purpose: the BNs must still use the pretrained statistics (the
    # classifier's dropout, before the head, is not what this is about).
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        assert torch.equal(features(model, x), reference_features(reference, x))
    assert head_of(model).out_features == 10


def test_only_the_scores_and_the_head_train_under_piggyback():
    original = backbone("mobilenet_v2")
    convs = [name for name, module in original.named_modules() if isinstance(module, nn.Conv2d)]
    assert any(original.get_submodule(name).groups > 1 for name in convs)  # depthwise ones are masked too
    model = PIGGYBACK.build(original, 10)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    head = [name for name, module in model.named_modules() if isinstance(module, Head)][0]
    assert sorted(trainable) == sorted([name + ".scores" for name in convs] + [head + ".weight", head + ".bias"])
    pig = [module for module in model.modules() if isinstance(module, PiggybackConv2d)]
    assert len(pig) == len(convs)
    assert all(bool(module.mask().all()) for module in pig)  # the mask starts all ones
    assert not any(type(module) is nn.Conv2d for module in model.modules())
    assert set(group["name"] for group in PIGGYBACK.param_groups(model)) == {"head", "other"}


def test_only_the_lora_matrices_and_the_head_train_under_lora_conv():
    pytest.importorskip("peft")
    original = backbone("mobilenet_v2")
    targets = [name for name, module in original.named_modules()
               if isinstance(module, nn.Conv2d) and module.groups == 1]
    depthwise = [name for name, module in original.named_modules()
                 if isinstance(module, nn.Conv2d) and module.groups > 1]
    model = LORA_CONV.build(original, 10)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    head = [name for name, module in model.named_modules() if isinstance(module, Head)][0]
    expected = [name + ".lora_{}.default.weight".format(ab) for name in targets for ab in "AB"]
    assert sorted(trainable) == sorted(expected + [head + ".weight", head + ".bias"])
    for name in depthwise:  # left as they were (see lora_targets)
        assert type(model.get_submodule(name)) is nn.Conv2d
    lora_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)  # zero-init: the delta starts at zero
    assert set(group["name"] for group in LORA_CONV.param_groups(model)) == {"head", "other"}


def test_lora_conv_without_peft_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ImportError, match="the lora_conv method needs peft: pip install peft"):
        LORA_CONV.build(backbone("resnet18"), 10)


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="piggyback"):
        PIGGYBACK.build(nn.Sequential(nn.Conv2d(3, 4, 3)), 10)


# -- the masked conv ---------------------------------------------------------------------


def test_masked_weight_has_the_straight_through_gradient():
    torch.manual_seed(0)
    scores = (THRESHOLD + 1e-3 * torch.randn(6, 3, 3, 3, dtype=torch.float64)).requires_grad_(True)
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    mask = (scores > THRESHOLD).double()
    assert 0 < mask.sum() < mask.numel()  # some weights are masked off
    out = masked_weight(scores, weight)
    assert torch.equal(out, weight * mask)
    grad_scores, grad_weight = torch.autograd.grad(out, (scores, weight), grad)
    assert torch.equal(grad_scores, grad * weight)  # d scores = d effective weight * weight
    assert torch.equal(grad_weight, grad * mask)
    # The frozen weight alone: only the scores' gradient is computed.
    (grad_scores_only,) = torch.autograd.grad(masked_weight(scores, weight.detach()), scores, grad)
    assert torch.equal(grad_scores_only, grad * weight.detach())


def _conv2d_same(*args, **kwargs):
    timm = pytest.importorskip("timm")
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # older timm
        from timm.models.layers import Conv2dSame
    del timm
    return Conv2dSame(*args, **kwargs)


CONVS = {
    "plain": lambda: nn.Conv2d(4, 6, 3, stride=1, padding=1),
    "strided_dilated": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False),
    "depthwise": lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "tf_same": lambda: _conv2d_same(4, 4, 3, stride=2, groups=4, bias=False),
}


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_piggyback_conv_computes_the_conv_and_its_score_gradient(kind):
    torch.manual_seed(0)
    conv = CONVS[kind]().double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
    masked = PiggybackConv2d(conv)
    y = masked(x)
    assert torch.equal(y, expected)  # scores 1e-2 > 5e-3: all ones
    # Score gradient = the gradient the conv's effective weight would get, times the weight.
    with torch.no_grad():
        masked.scores.uniform_(0, 2 * THRESHOLD)
    grad = torch.randn_like(expected)
    effective = nn.Parameter(conv.weight.detach() * (masked.scores.detach() > THRESHOLD).double())
    reference_conv = copy.deepcopy(conv)  # the conv's own forward (padding included) on the effective weight
    reference_conv.weight = effective
    y_reference = reference_conv(x)
    (grad_effective,) = torch.autograd.grad(y_reference, effective, grad)
    y = masked(x)
    assert torch.allclose(y, y_reference, rtol=0, atol=1e-12)
    (grad_scores,) = torch.autograd.grad(y, masked.scores, grad)
    assert torch.allclose(grad_scores, grad_effective * conv.weight.detach(), rtol=0, atol=1e-12)


# -- training ----------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_step_moves_what_trains_and_leaves_the_backbone_and_bn_statistics(method_name):
    m = method(method_name)
    model = m.build(_tf_efficientnet_lite0().eval(), 5)
    frozen = dict((name, p.detach().clone()) for name, p in model.named_parameters() if not p.requires_grad)
    trained = dict((name, p.detach().clone()) for name, p in model.named_parameters() if p.requires_grad)
    buffers = dict((name, b.clone()) for name, b in model.named_buffers())
    model.train()
    # Two steps: LoRA's A gets no gradient while B is still zero.
    train_step(model, m.param_groups(model), inputs(shape=(2, 3, 32, 32)), steps=2)
    after = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(after[name], value), name
    buffers_after = dict(model.named_buffers())
    for name, value in buffers.items():  # running statistics, num_batches_tracked
        assert torch.equal(buffers_after[name], value), name
    assert not any(module.training for module in model.modules() if isinstance(module, nn.BatchNorm2d))
    moved = dict((name, not torch.equal(after[name], value)) for name, value in trained.items())
    kinds = (".scores",) if method_name == "piggyback" else (".lora_A.", ".lora_B.")
    for kind in kinds:
        of_kind = [changed for name, changed in moved.items() if kind in name]
        assert of_kind and sum(of_kind) > len(of_kind) // 2, kind  # most of them moved
    head = [name for name, module in model.named_modules() if isinstance(module, Head)][0]
    assert moved[head + ".weight"]


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_multidomain_model_keeps_domains_apart_and_round_trips_them(method_name, tmp_path):
    m = method(method_name)
    model = MultiDomainModel(backbone("mobilenet_v2"), method=m)
    assert model.method is m
    model.add_domain("a", 4)
    model.add_domain("b", 3)

    def snapshot(name):
        with model.domain(name):
            return dict((n, p.detach().clone()) for n, p in model.model.named_parameters() if p.requires_grad)

    b_before = snapshot("b")
    a_before = snapshot("a")
    model.set_domain("a")
    model.train()
    x = inputs(shape=(2, 3, 32, 32))
    train_step(model.model, model.param_groups(), x, steps=2)
    a_after = snapshot("a")
    assert any(not torch.equal(a_after[n], a_before[n]) for n in a_before if "scores" in n or "lora_" in n)
    b_after = snapshot("b")
    assert all(torch.equal(b_after[n], b_before[n]) for n in b_before)

    path = str(tmp_path / "a.safetensors")
    model.save_domain("a", path)
    other = MultiDomainModel(backbone("mobilenet_v2"), method=m)
    assert other.load_domain(path) == "a"
    model.eval()
    other.eval()
    with torch.no_grad(), model.domain("a"), other.domain("a"):
        assert torch.equal(model(x), other(x))
