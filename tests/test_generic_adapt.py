"""adapt() on models whose blocks it does not know (torchvision EfficientNet,
RegNet, ConvNeXt, MobileNetV3; timm MobileNetV3, ConvNeXt, RegNet): frozen as
they are with adaptors after their stages, the same function until the adaptors
learn, only the DA2 groups training, frozen statistics kept, the fused adaptors'
gradients equal to the reference's; and kept_bytes_by_part's account of a step."""
import copy
import warnings

import pytest
import torch
from torch import nn

import da2ext
from da2ext.lean.adapt import Head
from da2ext.lean.generic_adapt import classifier_name
from da2ext.lean.trainable import parameter_groups
from da2ext.ops.attention_branch import AttentionBranch
from da2ext.profiling import SavedTensorCounter

from helpers import bias_baseline, import_timm, kept_for_backward, shift_parameters

torchvision = pytest.importorskip("torchvision")


def _torchvision(name):
    return lambda: getattr(torchvision.models, name)()


def _timm(name):
    return lambda: import_timm().create_model(name)


MODELS = {
    "tv_efficientnet_b0": _torchvision("efficientnet_b0"),
    "tv_regnet_x_400mf": _torchvision("regnet_x_400mf"),
    "tv_convnext_tiny": _torchvision("convnext_tiny"),
    "tv_mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "timm_mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_regnetx_002": _timm("regnetx_002"),
}
# The stages each one gets an adaptor after (the trunk's children, or its top-level stages).
STAGES = {
    "tv_efficientnet_b0": ["features.{}".format(i) for i in range(9)],
    "tv_regnet_x_400mf": ["trunk_output.block{}".format(i) for i in range(1, 5)],
    "tv_convnext_tiny": ["features.{}".format(i) for i in range(8)],
    "tv_mobilenet_v3_small": ["features.{}".format(i) for i in range(13)],
    "timm_mobilenetv3_small_100": ["blocks.{}".format(i) for i in range(6)],
    "timm_convnext_atto": ["stages.{}".format(i) for i in range(4)],
    "timm_regnetx_002": ["stem", "s1", "s2", "s3", "s4"],
}


def _adapt_quietly(model, num_classes, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        da2ext.adapt(model, num_classes, **kwargs)
    return [str(w.message) for w in caught]


def _with_original_head(original, adapted):
    """Copy the original classifier's weights into the adapted model's Head (1000 classes)."""
    linear = original.get_submodule(classifier_name(original))
    head = [m for m in adapted.modules() if isinstance(m, Head)][0]
    with torch.no_grad():
        head.weight.copy_(linear.weight)
        head.bias.copy_(linear.bias)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_adapts_with_adaptors_after_its_stages_and_computes_what_it_did(name):
    torch.manual_seed(0)
    original = MODELS[name]().eval()
    model = copy.deepcopy(original)
    messages = _adapt_quietly(model, 1000, rank=4)
    assert model.da2ext_stages == STAGES[name]
    assert any("is not a family adapt() knows" in m and type(original).__name__ in m for m in messages)
    _with_original_head(original, model)
    x = torch.randn(2, 3, 64, 64)
    model.train()  # frozen parts must keep their inference behaviour (BN statistics, dropout, drop path)
    with torch.no_grad():
        expected = original(x)
        got = model(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)  # gamma starts at 0


@pytest.mark.parametrize("name", ["tv_efficientnet_b0", "timm_mobilenetv3_small_100", "timm_convnext_atto"])
def test_only_the_da2_groups_train_and_frozen_statistics_stay(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    _adapt_quietly(model, 10, rank=4)
    groups = parameter_groups(model)
    assert "adaptors" in groups and "head" in groups and set(groups) <= {"adaptors", "shifts", "head"}
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert ("shifts" in groups) == has_bn  # a ConvNeXt's LayerNorms stay frozen
    buffers = dict((k, v.clone()) for k, v in model.named_buffers())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["tv_regnet_x_400mf", "timm_regnetx_002", "timm_convnext_atto", "tv_efficientnet_b0",
                                  "tv_mobilenet_v3_small", "timm_mobilenetv3_small_100", "tv_convnext_tiny"])
def test_lean_blocks_and_fused_adaptors_give_plain_autograds_gradients(name):
    """lean=True (RegNet-X blocks lean, the others' blocks recomputed from their
    inputs, fused adaptors) against lean=False (the model as it is in plain
    autograd, the reference adaptors), float64: the output, the adaptors', head's
    and BN shifts' gradients."""
    torch.manual_seed(0)
    original = MODELS[name]().double()
    lean, plain = copy.deepcopy(original), copy.deepcopy(original)
    _adapt_quietly(lean, 10, rank=4)
    _adapt_quietly(plain, 10, rank=4, lean=False)
    # The adaptors and the head have the same names in both; learned-looking values, copied across.
    owners = [n + "." for n, m in lean.named_modules() if isinstance(m, (AttentionBranch, Head))]
    shared = [k for k, _ in lean.named_parameters() if k.startswith(tuple(owners))]
    torch.manual_seed(1)
    with torch.no_grad():
        for key in shared:
            lean.get_parameter(key).add_(0.3 * torch.randn_like(lean.get_parameter(key)))
    plain.load_state_dict(dict((k, lean.state_dict()[k]) for k in shared), strict=False)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outputs, grads = [], []
    for model in (lean, plain):
        model.train()
        y = model(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append(dict((n, p.grad) for n, p in model.named_parameters()
                          if p.requires_grad and (n in shared)))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)
    assert grads[0].keys() == grads[1].keys() and any("adaptor" in k for k in grads[0])
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], rtol=1e-8, atol=1e-9), key  # float64, another order
    # Each lean shift's gradient is one of plain autograd's (a lean block may hold its
    # shortcut after its main path, where the original registered it first).
    unmatched = [p.grad for p in shift_parameters(plain)]
    lean_shifts = shift_parameters(lean)
    assert len(lean_shifts) == len(unmatched) and all(g is not None for g in unmatched)
    assert bool(unmatched) == any(isinstance(m, nn.BatchNorm2d) for m in original.modules())  # not in a ConvNeXt
    for i, shift in enumerate(lean_shifts):
        match = [j for j, g in enumerate(unmatched)
                 if g.shape == shift.grad.shape and torch.allclose(shift.grad, g, rtol=1e-8, atol=1e-9)]
        assert match, i
        unmatched.pop(match[0])


def test_a_multidomain_model_takes_a_generic_model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = da2ext.MultiDomainModel(torchvision.models.regnet_x_400mf(), method="da2")
    model.add_domain("a", 3, ["x", "y", "z"])
    model.add_domain("b", 5, [str(i) for i in range(5)])
    x = torch.randn(2, 3, 64, 64)
    model.set_domain("a")
    model.eval()
    with torch.no_grad():
        first = model(x)
    with torch.no_grad():
        for p in model.domain_tensors("b").values():
            if p.is_floating_point():
                p.add_(1.0)
    model.set_domain("b")
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.set_domain("a")
    with torch.no_grad():
        assert torch.equal(model(x), first)  # domain b's change left domain a as it was


def test_a_recomputed_models_inference_model_is_its_original_blocks():
    """deploy.inference_model of a domain on a MobileNetV3 (hardswish, squeeze-excitation:
    RecomputedBlocks in training) holds the original blocks and gives the same logits."""
    from da2ext.deploy import inference_model
    from da2ext.lean.input_grad_only import InputGradOnlyBatchNorm2d, InputGradOnlyConv2d
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = da2ext.MultiDomainModel(torchvision.models.mobilenet_v3_small(), method="da2")
    model.add_domain("a", 3, ["x", "y", "z"])
    assert any(isinstance(m, da2ext.RecomputedBlock) for m in model.modules())
    network = inference_model(model, "a")
    wrappers = (da2ext.RecomputedBlock, InputGradOnlyConv2d, InputGradOnlyBatchNorm2d)
    assert not any(isinstance(m, wrappers) for m in network.modules())
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad(), model.domain("a"):
        expected = model(x)
    with torch.no_grad():
        assert torch.allclose(network(x), expected, rtol=1e-5, atol=1e-6)


def test_a_small_sequential_gets_adaptors_after_its_modules_with_weights():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(8, 4))
    _adapt_quietly(model, 3)
    assert model.da2ext_stages == ["0.0", "0.2"]  # not after a ReLU or the pool
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_last=1), "trainable tail"),
    (dict(memory_budget_mib=64), "trainable tail"),
    (dict(backbone_dtype=torch.float16), "backbone_dtype"),
], ids=["train_last", "memory_budget", "float16"])
def test_what_a_generic_model_cannot_do_is_refused_before_touching_it(kwargs, match):
    model = torchvision.models.regnet_x_400mf()
    with pytest.raises(ValueError, match=match):
        da2ext.adapt(model, 10, **kwargs)
    assert all(p.requires_grad for p in model.parameters())


def test_kept_bytes_by_part_adds_up_to_what_the_step_keeps():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        da2ext.adapt(model, 10, rank=4)
    x = torch.randn(2, 3, 64, 64)
    rows = da2ext.kept_bytes_by_part(model, x)
    state = list(model.parameters()) + list(model.buffers())
    with SavedTensorCounter(exclude=state) as counter:
        model(x)
    assert sum(r["kept_bytes"] for r in rows) == counter.saved_bytes > 0
    by_part = dict((r["part"], r) for r in rows)
    assert by_part["layer1.0.adaptor"]["treatment"] == "adaptor"
    assert by_part["layer1.0.block"]["treatment"] == "lean"
    assert by_part["fc"]["treatment"] == "head"
    with pytest.raises(ValueError, match="no module named 'nope'"):
        da2ext.kept_bytes_by_part(model, x, parts=["nope"])


def test_kept_bytes_by_part_shows_where_a_generic_model_keeps_its_activations():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    by_lean = {}
    for lean in (True, False):
        model = MODELS["timm_convnext_atto"]()  # LayerNorm and GELU: no packed-bit form
        _adapt_quietly(model, 10, rank=4, lean=lean)
        by_lean[lean] = dict((r["part"], r) for r in da2ext.kept_bytes_by_part(model, x))
    recomputed, plain = by_lean[True]["stages.module.1.module"], by_lean[False]["stages.module.1.module"]
    adaptor = by_lean[True]["stages.module.1.adaptor"]
    assert recomputed["treatment"] == "recomputed" and plain["treatment"] == "plain autograd"
    assert adaptor["treatment"] == "adaptor"
    # Its blocks keep their inputs alone; plain autograd keeps each LayerNorm's and GELU's.
    assert plain["kept_bytes"] > 4 * recomputed["kept_bytes"] > 4 * adaptor["kept_bytes"] > 0
    assert by_lean[True]["head"]["treatment"] == "plain autograd"  # timm's ConvNeXt head: a LayerNorm before the Head


@pytest.mark.parametrize("name", ["tv_regnet_x_400mf", "timm_regnetx_002"])
def test_a_regnet_x_is_made_lean_and_keeps_under_an_eighth_of_the_bias_baseline(name):
    torch.manual_seed(0)
    original = MODELS[name]().eval()
    model = copy.deepcopy(original)
    messages = _adapt_quietly(model, 10, rank=4)
    assert any("made lean" in m for m in messages)
    x = torch.randn(4, 3, 64, 64)
    rows = da2ext.kept_bytes_by_part(model, x)
    stages = [r for r in rows if r["part"].endswith(".module") and r["type"] in ("AnyStage", "RegStage")]
    assert stages and all(r["treatment"] == "lean" for r in stages)
    head = [r for r in rows if r["part"] in ("fc", "head")]  # torchvision's Head; timm's with its pooling
    assert len(head) == 1 and head[0]["treatment"] == "head"
    kept = sum(r["kept_bytes"] for r in rows)
    assert 0 < kept <= kept_for_backward(bias_baseline(original), x) / 8
