"""RecomputedBlock, the lean form of a frozen block whose nonlinearities need more
than a sign bit (SiLU, hardswish, GELU, squeeze-excitation, LayerNorm;
docs/design.md §3, "Blocks beyond ReLU"): it keeps its input alone, gives plain
autograd's gradients exactly (float64), or within the documented error when it
keeps a float16 copy; and adapt() on the models of issue 24 (EfficientNet-B0,
MobileNetV3, ConvNeXt) keeps at most 1/8 of the `bias` baseline at 224², batch 8."""
import copy
import warnings

import pytest
import torch
from torch import nn

import da2ext
from da2ext.lean.recomputed_block import RecomputedBlock
from da2ext.profiling import SavedTensorCounter, model_state

from helpers import (adapt_quietly, all_devices, bias_baseline, forward_backward, import_timm, kept_for_backward,
                     named_trainable, randomize_bn, randomize_common_trainable, relative_error, shift_parameters)

torchvision = pytest.importorskip("torchvision")


class _SqueezeExcite(nn.Module):
    """x * gate(mean of x): the gate's gradient reads the whole gated map."""

    def __init__(self, channels, gate):
        super(_SqueezeExcite, self).__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)
        self.gate = gate

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(torch.relu(self.reduce(s))))


class _ChannelsLastLayerNorm(nn.Module):
    def __init__(self, channels):
        super(_ChannelsLastLayerNorm, self).__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _block(kind, channels=8, expansion=4):
    """A frozen inverted-residual-like block around one nonlinearity of `kind`, BN shifts trainable."""
    wide = channels * expansion
    middle = {
        "silu": [nn.BatchNorm2d(wide), nn.SiLU()],
        "hardswish": [nn.BatchNorm2d(wide), nn.Hardswish()],
        "gelu": [nn.BatchNorm2d(wide), nn.GELU()],
        "se_sigmoid": [nn.BatchNorm2d(wide), nn.SiLU(), _SqueezeExcite(wide, nn.Sigmoid())],
        "se_hardsigmoid": [nn.BatchNorm2d(wide), nn.Hardswish(), _SqueezeExcite(wide, nn.Hardsigmoid())],
        "layernorm": [_ChannelsLastLayerNorm(wide), nn.GELU()],
    }[kind]
    block = nn.Sequential(nn.Conv2d(channels, wide, 1), *middle, nn.Conv2d(wide, channels, 3, padding=1),
                          nn.BatchNorm2d(channels))
    randomize_bn(block)
    for p in block.parameters():
        p.requires_grad_(False)
    for m in block.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):  # the shifts train
            m.bias.requires_grad_(True)
    return block


KINDS = ["silu", "hardswish", "gelu", "se_sigmoid", "se_hardsigmoid", "layernorm"]


def _grads(module, x):
    """Output, input gradient and trainable parameters' gradients of <module(x), w>."""
    y, gx = forward_backward(module, x)
    return y, gx, [p.grad.clone() for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_plain_autograds_exactly_in_float64(kind, channels_last, device):
    torch.manual_seed(0)
    plain = _block(kind).double().to(device)
    recomputed = RecomputedBlock(copy.deepcopy(plain)).train()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_plain, gx_plain, g_plain = _grads(plain, x)
    y_re, gx_re, g_re = _grads(recomputed, x)
    assert torch.equal(y_re, y_plain)
    assert gx_plain.abs().max() > 0 and relative_error(gx_re, gx_plain) < 1e-14
    assert len(g_re) == len(g_plain) == 2  # the two norms' shifts
    for a, b in zip(g_re, g_plain):
        assert b.abs().max() > 0 and relative_error(a, b) < 1e-14


@pytest.mark.parametrize("kind", KINDS)
def test_it_keeps_its_input_alone_a_fraction_of_what_plain_autograd_keeps(kind):
    torch.manual_seed(0)
    plain = _block(kind)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    kept = {}
    for name, module in (("plain", plain), ("recomputed", RecomputedBlock(copy.deepcopy(plain))),
                         ("float16", RecomputedBlock(copy.deepcopy(plain), keep_dtype=torch.float16))):
        with SavedTensorCounter(exclude=model_state(module)) as counter:
            module(x)
        kept[name] = counter.saved_bytes
    assert kept["recomputed"] == x.numel() * 4
    assert kept["float16"] == x.numel() * 2
    assert kept["plain"] >= 4 * kept["recomputed"]  # plain keeps tensors at 4x the channels


@pytest.mark.parametrize("keep_dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kind", KINDS)
def test_a_half_precision_copy_gives_gradients_within_the_documented_error(kind, keep_dtype, tolerance):
    """docs/design.md §3's bound (benchmarks/lean_activations_table.py measures it per activation)."""
    torch.manual_seed(0)
    reference = _block(kind).double()
    compact = RecomputedBlock(copy.deepcopy(reference).float(), keep_dtype=keep_dtype)
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    _, gx_ref, g_ref = _grads(reference, x)
    _, gx, g = _grads(compact, x.float())
    assert relative_error(gx.double(), gx_ref) < tolerance
    for a, b in zip(g, g_ref):
        assert relative_error(a.double(), b) < tolerance


@pytest.mark.parametrize("kind", ["silu", "se_sigmoid", "layernorm"])
def test_under_autocast_the_recompute_runs_as_the_forward_ran(kind):
    """A forward under torch.autocast (bfloat16 on the CPU) is recomputed under the
    same autocast in backward: the gradients are plain autograd's under it."""
    torch.manual_seed(0)
    plain = _block(kind)
    recomputed = RecomputedBlock(copy.deepcopy(plain))
    x = torch.randn(2, 8, 9, 7)
    grads = []
    for module in (plain, recomputed):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xi)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in module.parameters() if p.requires_grad])
    for a, b in zip(grads[1], grads[0]):
        assert a.dtype == b.dtype and relative_error(a.float(), b.float()) < 1e-6


def test_an_input_past_float16s_range_is_kept_as_it_is():
    torch.manual_seed(0)
    block = _block("silu")
    x = torch.randn(2, 8, 6, 6) * 1e5
    compact = RecomputedBlock(copy.deepcopy(block), keep_dtype=torch.float16)
    with SavedTensorCounter(exclude=model_state(compact)) as counter:
        compact(x.requires_grad_())
    assert counter.saved_bytes == x.numel() * 4
    _, gx_exact, _ = _grads(RecomputedBlock(copy.deepcopy(block)), x)
    _, gx, _ = _grads(compact, x)
    assert torch.isfinite(gx).all() and torch.equal(gx, gx_exact)


def test_it_stays_in_eval_mode_and_keeps_nothing_without_gradients():
    block = _block("se_sigmoid")
    statistics = [b.clone() for b in block.buffers()]
    recomputed = RecomputedBlock(block).train()
    assert not recomputed.module.training and not any(m.training for m in recomputed.module.modules())
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    recomputed(x).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(statistics, block.buffers()))
    for p in block.parameters():
        p.requires_grad_(False)
    with SavedTensorCounter() as counter:
        y = recomputed(x.detach())
    assert counter.saved_bytes == 0 and not y.requires_grad


def test_a_block_that_changes_its_input_in_place_is_refused():
    block = _frozen_block_changing_its_input()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="changed its input in place"):
        RecomputedBlock(block)(x * 1.0)


def _frozen_block_changing_its_input():
    class PreActivation(nn.Module):
        def __init__(self):
            super(PreActivation, self).__init__()
            self.relu = nn.ReLU(inplace=True)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv(self.relu(x)))

    block = PreActivation().eval()
    block.conv.weight.requires_grad_(False)
    return block


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="keep_dtype must be one of"):
        RecomputedBlock(nn.Conv2d(2, 2, 1), keep_dtype=torch.int8)
    with pytest.raises(TypeError, match="input must be one tensor"):
        RecomputedBlock(nn.Conv2d(2, 2, 1))((torch.randn(1, 2, 3, 3),))
    with pytest.raises(ValueError, match="recompute_dtype must be one of"):
        da2ext.adapt(torchvision.models.resnet18(), 10, recompute_dtype="half")
    with pytest.raises(ValueError, match="recompute_dtype .* needs lean=True"):
        da2ext.adapt(torchvision.models.resnet18(), 10, lean=False, recompute_dtype=torch.float16)


def _timm_efficientnet_b0():
    return import_timm().create_model("efficientnet_b0")


def _timm_resnet18d():
    return import_timm().create_model("resnet18d")  # a deep stem: three conv-BN-ReLUs


@pytest.mark.parametrize("build", [_timm_efficientnet_b0, _timm_resnet18d], ids=["timm_efficientnet_b0", "resnet18d"])
def test_a_known_family_with_silu_and_squeeze_excitation_gives_plain_autograds_gradients(build):
    """The family path: timm's EfficientNet-B0 (its stem, head and every block
    recomputed) and a timm ResNet's deep stem, lean against lean=False, float64."""
    torch.manual_seed(0)
    original = randomize_bn(build()).double()
    lean = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float64).double()
    eager = adapt_quietly(copy.deepcopy(original), 10, lean=False).double()
    assert any(isinstance(m, RecomputedBlock) for m in lean.modules())
    common = randomize_common_trainable(lean, eager)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y_lean, gx_lean = forward_backward(lean, x)
    y_eager, gx_eager = forward_backward(eager, x)
    assert relative_error(y_lean, y_eager) < 1e-10 and relative_error(gx_lean, gx_eager) < 1e-10
    lean_params, eager_params = named_trainable(lean), named_trainable(eager)
    assert any(".adaptor." in name for name in common)
    for name in common:
        assert relative_error(lean_params[name].grad, eager_params[name].grad) < 1e-10, name
    shifts = list(zip(shift_parameters(lean), shift_parameters(eager)))
    assert shifts and all(a.requires_grad for a, _ in shifts)
    for i, (a, b) in enumerate(shifts):
        assert relative_error(a.grad, b.grad) < 1e-10, i


# issue 24's models beyond ReLU, and the recompute_dtype each needs to keep 1/8 of `bias`
EIGHTH = [
    ("tv_efficientnet_b0", lambda: torchvision.models.efficientnet_b0(), None),
    ("timm_efficientnet_b0", _timm_efficientnet_b0, None),
    ("timm_mobilenetv3_small_100", lambda: import_timm().create_model("mobilenetv3_small_100"), None),
    ("tv_convnext_tiny", lambda: torchvision.models.convnext_tiny(), torch.float16),
]


@pytest.mark.parametrize("name, build, recompute_dtype", EIGHTH, ids=[e[0] for e in EIGHTH])
def test_models_beyond_relu_keep_at_most_an_eighth_of_the_bias_baseline_at_224(name, build, recompute_dtype):
    torch.manual_seed(0)
    original = build().eval()
    x = torch.randn(8, 3, 224, 224)
    baseline = bias_baseline(original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic path says what it did
        model = da2ext.adapt(copy.deepcopy(original), 10, recompute_dtype=recompute_dtype)
    assert any(isinstance(m, RecomputedBlock) for m in model.modules())
    with torch.no_grad():
        baseline_out = baseline(x[:2])
    kept, kept_baseline = kept_for_backward(model.train(), x), kept_for_backward(baseline.train(), x)
    assert 0 < kept <= kept_baseline / 8, (name, kept / 2.0 ** 20, kept_baseline / 2.0 ** 20)
    assert torch.isfinite(baseline_out).all()


def test_a_convnext_with_float16_inputs_trains_within_the_documented_error():
    """recompute_dtype=float16 on a ConvNeXt (LayerNorm, GELU: smooth derivatives):
    the adaptors', head's and input's gradients within 1e-3 of float64 plain autograd."""
    torch.manual_seed(0)
    original = import_timm().create_model("convnext_atto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic path says what it did
        compact = da2ext.adapt(copy.deepcopy(original), 10, rank=4, recompute_dtype=torch.float16)
        reference = da2ext.adapt(copy.deepcopy(original).double(), 10, rank=4, lean=False).double()
    assert any(isinstance(m, RecomputedBlock) and m.keep_dtype == torch.float16 for m in compact.modules())
    common = randomize_common_trainable(compact, reference)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, gx_compact = forward_backward(compact, x.float())
    _, gx_reference = forward_backward(reference, x)
    assert relative_error(gx_compact.double(), gx_reference) < 1e-3
    compact_params, reference_params = named_trainable(compact), named_trainable(reference)
    assert any(".adaptor." in name for name in common)
    for name in common:
        assert relative_error(compact_params[name].grad.double(), reference_params[name].grad) < 1e-3, name

