"""The frozen conv and eval-mode BN that keep nothing for backward
(da2ext/lean/input_grad_only.py, inside every RecomputedBlock): the same forward
as the original module bit for bit, the input's and a trainable bias's or shift's
gradients equal to plain autograd's (float64), nothing kept; the modules they do
not apply to are refused by name."""
import copy

import pytest
import torch
from torch import nn

from da2ext.lean.input_grad_only import InputGradOnlyBatchNorm2d, InputGradOnlyConv2d, keep_nothing_inside
from da2ext.lean.recomputed_block import RecomputedBlock
from da2ext.profiling import SavedTensorCounter, model_state

from helpers import all_devices, import_timm, randomize_bn, relative_error

CONVS = {
    "3x3": dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    "strided": dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6),
    "dilated": dict(in_channels=6, out_channels=4, kernel_size=3, padding=2, dilation=2),
    "pointwise": dict(in_channels=6, out_channels=12, kernel_size=1),
    "pointwise_strided": dict(in_channels=6, out_channels=12, kernel_size=1, stride=2),
}


def _frozen(module, trainable_bias):
    for p in module.parameters():
        p.requires_grad_(False)
    if trainable_bias and getattr(module, "bias", None) is not None:
        module.bias.requires_grad_(True)
    return module


def _compare(original, lean, x):
    """Forward bit for bit; input and trainable gradients to float64 rounding; nothing kept."""
    with torch.no_grad():
        assert torch.equal(lean(x), original(x))
    grads = []
    for module in (original, lean):
        module.zero_grad()
        xi = x.detach().clone().requires_grad_(True)
        y = module(xi)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype).to(y.device)
        (y * w).sum().backward()
        grads.append([xi.grad] + [p.grad for p in module.parameters() if p.requires_grad])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(grads[1], grads[0]):
        assert b.abs().max() > 0 and relative_error(a, b) < 1e-13
    with SavedTensorCounter(exclude=model_state(lean)) as counter:
        lean(x.detach().clone().requires_grad_(True))
    assert counter.saved_bytes == 0


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("trainable_bias", [False, True], ids=["frozen_bias", "trainable_bias"])
@pytest.mark.parametrize("geometry", sorted(CONVS))
def test_a_frozen_conv_keeps_nothing_and_gives_plain_autograds_gradients(geometry, trainable_bias, channels_last,
                                                                         device):
    torch.manual_seed(0)
    conv = _frozen(nn.Conv2d(**CONVS[geometry]).double().to(device), trainable_bias)
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare(conv, InputGradOnlyConv2d(copy.deepcopy(conv)), x)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("trainable_shift", [False, True], ids=["frozen_shift", "trainable_shift"])
def test_an_eval_batchnorm_keeps_nothing_and_gives_plain_autograds_gradients(trainable_shift, device):
    torch.manual_seed(0)
    bn = _frozen(randomize_bn(nn.BatchNorm2d(6)).double().to(device), trainable_shift)
    _compare(bn, InputGradOnlyBatchNorm2d(copy.deepcopy(bn)), torch.randn(3, 6, 5, 4, dtype=torch.float64).to(device))


def test_timms_batchnorm_with_its_activation():
    import_timm()
    from timm.layers import BatchNormAct2d
    torch.manual_seed(0)
    bn = _frozen(randomize_bn(BatchNormAct2d(6, act_layer=nn.SiLU)).double(), True)
    assert isinstance(bn.act, nn.SiLU)
    lean = InputGradOnlyBatchNorm2d(copy.deepcopy(bn))
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(lean(x), bn(x))
    xi = x.clone().requires_grad_(True)
    lean(xi).sum().backward()
    xp = x.clone().requires_grad_(True)
    bn(xp).sum().backward()
    assert relative_error(xi.grad, xp.grad) < 1e-13


def test_what_they_do_not_apply_to_is_refused_and_left_alone():
    trainable = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="conv must be a frozen nn.Conv2d"):
        InputGradOnlyConv2d(trainable)
    same = _frozen(nn.Conv2d(2, 2, 3, padding="same"), False)
    with pytest.raises(ValueError, match="zero padding given as numbers"):
        InputGradOnlyConv2d(same)
    batch_statistics = _frozen(nn.BatchNorm2d(2, track_running_stats=False), False)
    with pytest.raises(ValueError, match="bn must be an nn.BatchNorm2d"):
        InputGradOnlyBatchNorm2d(batch_statistics)
    block = nn.Sequential(same, batch_statistics, _frozen(nn.Conv2d(2, 2, 1, padding_mode="reflect"), False),
                          _frozen(nn.Conv2d(2, 2, 1), False), _frozen(nn.BatchNorm2d(2), True))
    assert keep_nothing_inside(block) == 2
    assert [type(m).__name__ for m in block] == ["Conv2d", "BatchNorm2d", "Conv2d", "InputGradOnlyConv2d",
                                                 "InputGradOnlyBatchNorm2d"]


def test_a_recomputed_blocks_transient_is_its_nonlinearities_inputs():
    """Inside a RecomputedBlock the frozen convs and BNs keep nothing: what the
    recompute keeps is the SiLUs' inputs (2 x 4C here), not also the convs' and BNs'."""
    import da2ext
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.BatchNorm2d(32), nn.SiLU(), nn.Conv2d(32, 8, 1), nn.BatchNorm2d(8))
    block = _frozen(randomize_bn(block), False)
    x = torch.randn(2, 8, 10, 10)
    with SavedTensorCounter(exclude=model_state(block)) as counter:
        block(x.clone().requires_grad_(True))
    transient = da2ext.largest_recompute_transient(RecomputedBlock(block), x)
    silu_inputs = 2 * x.numel() * 4 * 4
    assert transient["transient_bytes"] == silu_inputs < counter.saved_bytes / 2
