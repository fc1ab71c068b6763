"""FrozenConvBNAct: a conv with its eval-mode BN folded in and a packed ReLU/ReLU6
computes what conv -> BN -> activation computes, gives the same input and shift
(BN beta) gradients, and keeps only the packed mask for backward."""
import copy
import math

import pytest
import torch
from torch import nn

from helpers import randomize_bn, relative_error
from da2ext.lean.frozen_conv import FrozenConvBNAct, same_padding
from da2ext.profiling import SavedTensorCounter, model_state


def _conv2d_same(*args, **kwargs):
    pytest.importorskip("timm")
    from timm.layers import Conv2dSame
    return Conv2dSame(*args, **kwargs)


# name -> (conv constructor, activation, input channels, has BN)
CASES = {
    "3x3_relu": (lambda: nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), 6, True),
    "1x1_stride2_none": (lambda: nn.Conv2d(6, 8, 1, stride=2, bias=False), None, 6, True),
    "depthwise_stride2_relu6": (lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False),
                                nn.ReLU6(), 6, True),
    "grouped_dilated_relu": (lambda: nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3, bias=False),
                             nn.ReLU(inplace=True), 6, True),
    "rectangular_relu": (lambda: nn.Conv2d(6, 8, (3, 1), stride=(2, 1), padding=(1, 0), bias=False),
                         nn.ReLU(), 6, True),
    "bias_no_bn_relu": (lambda: nn.Conv2d(6, 8, 3, padding=1, bias=True), nn.ReLU(), 6, False),
    "conv_bias_and_bn_relu6": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True), nn.ReLU6(), 6, True),
    "stride2_even_padding_relu": (lambda: nn.Conv2d(6, 8, 4, stride=2, padding=1, bias=False), nn.ReLU(), 6,
                                  True),
    "tf_same_3x3_stride2_relu6": (lambda: _conv2d_same(6, 8, 3, stride=2, bias=False), nn.ReLU6(), 6, True),
    "tf_same_5x5_stride2_dw": (lambda: _conv2d_same(6, 6, 5, stride=2, groups=6, bias=False), nn.ReLU6(), 6,
                               True),
    "tf_same_3x3_stride1": (lambda: _conv2d_same(6, 8, 3, stride=1, bias=False), None, 6, True),
    "tf_same_2x2_stride2": (lambda: _conv2d_same(6, 8, 2, stride=2, bias=False), nn.ReLU(), 6, True),
    "tf_same_3x3_dilated": (lambda: _conv2d_same(6, 8, 3, stride=1, dilation=2, bias=False), nn.ReLU(), 6, True),
    "tf_same_3x3_stride2_bias": (lambda: _conv2d_same(6, 8, 3, stride=2, bias=True), None, 6, False),
}
SIZES = [(13, 11), (12, 10)]  # odd and even: TF padding differs


def build(name, seed=0):
    constructor, activation, channels, has_bn = CASES[name]
    torch.manual_seed(seed)
    conv = constructor().double()
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.uniform_(-0.3, 0.3)
    bn = randomize_bn(nn.BatchNorm2d(conv.out_channels), seed).double() if has_bn else None
    layers = [conv] + ([bn] if bn is not None else []) + ([activation] if activation is not None else [])
    eager = nn.Sequential(*layers).eval().requires_grad_(False)
    trainable_shift = bn.bias if bn is not None else conv.bias
    trainable_shift.requires_grad_(True)
    frozen = FrozenConvBNAct.fold(copy.deepcopy(conv), copy.deepcopy(bn), activation, dtype=torch.float64)
    return eager, frozen, trainable_shift, channels


@pytest.mark.parametrize("size", SIZES, ids=["odd", "even"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_match_conv_bn_activation(name, size):
    eager, frozen, eager_shift, channels = build(name)
    x = torch.randn(2, channels, size[0], size[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outputs = []
    for module, shift in ((eager, eager_shift), (frozen, frozen.shift)):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        grad = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        y.backward(grad)
        outputs.append((y.detach(), xi.grad, shift.grad))
    (y_eager, gx_eager, gs_eager), (y_frozen, gx_frozen, gs_frozen) = outputs
    assert y_frozen.shape == y_eager.shape
    assert relative_error(y_frozen, y_eager) < 1e-12
    assert gx_eager.abs().max() > 0
    assert relative_error(gx_frozen, gx_eager) < 1e-12
    assert relative_error(gs_frozen, gs_eager) < 1e-12


@pytest.mark.parametrize("name", sorted(CASES))
def test_keeps_only_the_packed_mask(name):
    eager, frozen, _, channels = build(name)
    x = torch.randn(2, channels, 13, 11, dtype=torch.float64, requires_grad=True)
    with SavedTensorCounter(exclude=model_state(frozen)) as counter:
        y = frozen(x)
    expected = 4 * int(math.ceil(y.numel() / 32.0)) if frozen.upper is not None else 0
    assert counter.saved_bytes == expected
    # nothing at all when neither the input nor the shift needs a gradient
    frozen.shift.requires_grad_(False)
    with SavedTensorCounter(exclude=model_state(frozen)) as counter:
        y = frozen(x.detach())
    assert counter.saved_tensors == 0 and y.grad_fn is None and not y.requires_grad


def test_shift_gradient_without_input_gradient():
    """The stem: the input needs no gradient, the shift does."""
    eager, frozen, eager_shift, channels = build("3x3_relu")
    x = torch.randn(2, channels, 9, 9, dtype=torch.float64)
    grad = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    eager(x).backward(grad)
    y = frozen(x)
    assert y.requires_grad
    y.backward(grad)
    assert relative_error(frozen.shift.grad, eager_shift.grad) < 1e-12


def test_folded_parameters_and_dtypes():
    eager, frozen, _, _ = build("3x3_relu")
    conv, bn = eager[0], eager[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(frozen.weight, conv.weight * scale.view(-1, 1, 1, 1), rtol=1e-14, atol=0)
    assert torch.allclose(frozen.frozen_bias, -bn.running_mean * scale, rtol=1e-14, atol=1e-15)
    assert torch.equal(frozen.shift.detach(), bn.bias.detach())
    assert [n for n, _ in frozen.named_parameters()] == ["shift"]
    assert sorted(n for n, _ in frozen.named_buffers()) == ["bn_train_mode", "frozen_bias", "weight"]
    assert sorted(frozen.state_dict()) == ["frozen_bias", "shift", "weight"]  # bn_train_mode is not saved
    # What shift calibration needs to normalise as the BN in train mode: |gamma| and eps * scale^2.
    assert torch.allclose(frozen.bn_train_mode[0], bn.weight.abs(), rtol=1e-14, atol=0)
    assert torch.allclose(frozen.bn_train_mode[1], bn.eps * scale * scale, rtol=1e-14, atol=0)
    assert FrozenConvBNAct.fold(conv, None, nn.ReLU()).bn_train_mode is None
    half = FrozenConvBNAct.fold(conv.float(), bn.float(), nn.ReLU(), dtype=torch.float16)
    assert half.weight.dtype == torch.float16
    assert half.frozen_bias.dtype == torch.float32 and half.shift.dtype == torch.float32
    assert not FrozenConvBNAct.fold(conv, bn, nn.ReLU(), train_shift=False).shift.requires_grad


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (13, 3, 2, (1, 1)), (12, 3, 2, (0, 1)), (12, 2, 2, (0, 0)), (11, 5, 2, (2, 2)), (10, 5, 2, (1, 2)),
    (7, 3, 1, (1, 1)),
])
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride, 1) == expected


@pytest.mark.parametrize("conv, bn, activation, pattern", [
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), None, None, "padding_mode"),
    (nn.Conv2d(3, 4, 3, padding="same"), None, None, "string padding"),
    (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), None, "running statistics"),
    (nn.Conv2d(3, 4, 3), None, nn.SiLU(), "SiLU"),
    (nn.Conv2d(3, 4, 3), None, nn.Hardtanh(-1.0, 1.0), "Hardtanh"),
    (nn.Linear(3, 4), None, None, "Conv2d"),
])
def test_what_cannot_be_folded_says_why(conv, bn, activation, pattern):
    with pytest.raises(NotImplementedError, match=pattern):
        FrozenConvBNAct.fold(conv, bn, activation)


# The last conv of a residual block with the add and the block's activation as one node
# (FrozenConvBNAct.forward_add_activation): 1x1 at 16x16 takes the GEMM path, 3x3 at 5x5 oneDNN's.
ADD_ACTIVATION_CASES = {"1x1_gemm_relu": ((6, 8, 1), 16, float("inf")), "3x3_relu6": ((6, 8, 3), 5, 6.0)}


@pytest.mark.parametrize("name", sorted(ADD_ACTIVATION_CASES))
def test_conv_add_activation_matches_conv_bn_add_activation(name):
    (c_in, c_out, kernel), size, upper = ADD_ACTIVATION_CASES[name]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False).double()
    bn = randomize_bn(nn.BatchNorm2d(c_out), 0).double().eval()
    frozen = FrozenConvBNAct.fold(copy.deepcopy(conv), copy.deepcopy(bn), None, dtype=torch.float64)
    bn.requires_grad_(False)
    bn.bias.requires_grad_(True)
    conv.requires_grad_(False)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, c_in, size, size, dtype=torch.float64, generator=generator)
    residual = torch.randn(2, c_out, size, size, dtype=torch.float64, generator=generator) * 3
    grad = torch.randn(2, c_out, size, size, dtype=torch.float64, generator=generator)

    def activation(t):
        return torch.clamp(t, 0, upper) if math.isfinite(upper) else torch.relu(t)

    results = []
    for run in ("eager", "frozen"):
        xi, ri = x.clone().requires_grad_(True), residual.clone().requires_grad_(True)
        if run == "eager":
            y, shift = activation(bn(conv(xi)) + ri), bn.bias
        else:
            with SavedTensorCounter(exclude=model_state(frozen)) as counter:
                y = frozen.forward_add_activation(xi, ri, upper)
            assert counter.saved_bytes == 4 * int(math.ceil(y.numel() / 32.0))  # the mask alone
            shift = frozen.shift
        y.backward(grad)
        results.append((y.detach(), xi.grad, ri.grad, shift.grad))
    for eager_value, frozen_value in zip(*results):
        assert eager_value.abs().max() > 0
        assert relative_error(frozen_value, eager_value) < 1e-12
    with pytest.raises(ValueError, match="without activation"):
        FrozenConvBNAct.fold(conv, bn, nn.ReLU()).forward_add_activation(x.float(), residual.float(), upper)
