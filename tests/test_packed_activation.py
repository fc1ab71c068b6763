"""The packed activation (ReLU/ReLU6 keeping one bit per element for backward):
values and gradients as torch's, the mask's bit layout, what is kept, errors."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import da2ext
from da2ext.ops import _extension
from helpers import all_devices, python_mask, special_values

packed_module = importlib.import_module("da2ext.ops.packed_activation")  # (da2ext.packed_activation is the function)

DTYPES = [torch.float64, torch.float32, torch.float16]
ACTIVATIONS = {
    "relu": (da2ext.packed_relu, torch.relu, float("inf")),
    "relu6": (da2ext.packed_relu6, F.relu6, 6.0),
}


def torch_forward_backward(fn, x, grad):
    """torch's values and input gradient, computed in float64 (both are exact selects)."""
    xd = x.detach().double().requires_grad_()
    y = fn(xd)
    y.backward(grad.double())
    return y.detach().to(x.dtype), xd.grad.to(x.dtype)


def packed_forward_backward(fn, x, grad):
    xi = x.detach().clone().requires_grad_()
    y = fn(xi)
    y.backward(grad)
    return y.detach(), xi.grad


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_forward_matches_torch_including_nan(device, dtype, name):
    packed, reference, _ = ACTIVATIONS[name]
    x = special_values((4, 6, 7, 9), device, dtype)
    y = packed(x)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    expected = reference(x.double()).to(dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(y).sum().item() == torch.isnan(x).sum().item() > 0


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_backward_matches_torch(device, dtype, name):
    # exact 0 and 6 (no gradient), +-inf; NaN is left out: torch's hardtanh passes
    # the gradient at NaN, the packed mask does not (documented)
    packed, reference, _ = ACTIVATIONS[name]
    x = special_values((3, 5, 11, 13), device, dtype, seed=1, nan=False)
    grad = torch.randn(x.shape, dtype=torch.float64).to(device=device, dtype=dtype)
    y, grad_input = packed_forward_backward(packed, x, grad)
    expected_y, expected_grad = torch_forward_backward(reference, x, grad)
    assert torch.equal(y, expected_y)
    assert torch.equal(grad_input, expected_grad)
    assert (grad_input[x == 0] == 0).all()
    if name == "relu6":
        assert (grad_input[x == 6] == 0).all()


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_nan_gets_no_gradient(device, name):
    packed, _, _ = ACTIVATIONS[name]
    x = torch.tensor([float("nan"), 1.0, float("nan")], device=device)
    _, grad_input = packed_forward_backward(packed, x, torch.ones_like(x))
    assert grad_input.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gradcheck_float64_cpu(name):
    packed, _, upper = ACTIVATIONS[name]
    generator = torch.Generator().manual_seed(3)
    # values at least 0.1 away from the kinks at 0 and 6
    magnitudes = torch.rand(2, 3, 5, 7, generator=generator, dtype=torch.float64) * 5.8 + 0.1
    x = magnitudes * torch.where(torch.rand(magnitudes.shape, generator=generator) < 0.5, -1.0, 1.0).double()
    x.view(-1)[::5] += 6.0  # some beyond 6 (and some of those back near 0..6, all away from the kinks)
    x = torch.where((x - 6).abs() < 0.1, x + 0.3, x)
    x = torch.where(x.abs() < 0.1, x + 0.3, x).requires_grad_()
    assert torch.autograd.gradcheck(packed, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("shape", [(1,), (31,), (32,), (33,), (3, 5, 7), (2, 3, 11, 13), (100003,)])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_shapes_with_a_partial_last_word(device, shape, name):
    packed, reference, upper = ACTIVATIONS[name]
    x = special_values(shape, device, torch.float32, seed=2, nan=False)
    grad = torch.randn(shape).to(device)
    y, grad_input = packed_forward_backward(packed, x, grad)
    expected_y, expected_grad = torch_forward_backward(reference, x, grad)
    assert torch.equal(y, expected_y)
    assert torch.equal(grad_input, expected_grad)
    _, mask = torch.ops.da2ext.packed_activation(x, upper)
    assert torch.equal(mask.cpu(), python_mask(x, upper))


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33,), (2, 3, 11, 13), (100003,), (0,)])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_inplace_op_matches_the_out_of_place_op(device, dtype, shape, name):
    upper = ACTIVATIONS[name][2]
    x = special_values(shape, device, dtype, seed=4)
    expected, expected_mask = torch.ops.da2ext.packed_activation(x, upper)
    data = x.clone()
    mask = torch.ops.da2ext.packed_activation_(data, upper)
    torch.testing.assert_close(data, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(mask, expected_mask)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_inplace_under_autograd(device, name):
    packed, reference, upper = ACTIVATIONS[name]
    x = special_values((3, 5, 7), device, torch.float32, seed=5, nan=False).requires_grad_()
    grad = torch.randn(x.shape).to(device)
    hidden = x * 2  # a temporary that nothing saves: may be overwritten
    y = packed(hidden, inplace=True)
    assert y is hidden
    with da2ext.SavedTensorCounter() as counter:
        da2ext.packed_activation(x * 2, upper, inplace=True)
    assert counter.saved_bytes == 4 * math.ceil(x.numel() / 32)  # the mask alone, as out of place
    y.backward(grad)
    expected_y, expected_grad = torch_forward_backward(lambda t: reference(t * 2), x, grad)
    assert torch.equal(y.detach(), expected_y)
    assert torch.equal(x.grad, expected_grad)
    # autograd refuses what it refuses torch.relu_: a leaf that requires grad ...
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        packed(x, inplace=True)
    # ... and overwriting what another op keeps for its backward (exp keeps its output).
    kept = x.exp()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        packed(kept, inplace=True).sum().backward()


@pytest.mark.parametrize("device", all_devices())
def test_inplace_on_a_non_contiguous_input_copies(device):
    x = special_values((4, 6, 5), device, torch.float32, seed=6).transpose(0, 2)
    before = x.clone()
    y = da2ext.packed_relu6(x, inplace=True)
    torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)  # strided: the result is a copy
    assert y.is_contiguous() and torch.allclose(y, F.relu6(before), equal_nan=True, rtol=0, atol=0)
    with torch.no_grad():
        z = before.contiguous()
        assert da2ext.PackedReLU(inplace=True)(z) is z
        assert torch.allclose(z, torch.relu(before), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("shape", [(0,), (2, 0, 5)])
def test_empty(device, shape):
    x = torch.empty(shape, device=device, requires_grad=True)
    with da2ext.SavedTensorCounter() as counter:
        y = da2ext.packed_relu6(x)
    assert y.shape == x.shape
    assert counter.saved_bytes == 0
    y.sum().backward()
    assert x.grad.shape == x.shape
    output, mask = torch.ops.da2ext.packed_activation(x.detach(), 6.0)
    assert output.shape == x.shape and mask.shape == (0,) and mask.dtype == torch.int32
    assert torch.ops.da2ext.packed_activation_backward(output, mask).shape == x.shape


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_non_contiguous_input_gives_the_right_result(device, layout, name):
    packed, reference, _ = ACTIVATIONS[name]
    base = special_values((2, 8, 5, 7), device, torch.float32, seed=4, nan=False)
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(1, 3)
    else:
        x = base[:, ::2, 1:]
    assert not x.is_contiguous()
    grad = torch.randn(x.shape).to(device)
    y, grad_input = packed_forward_backward(packed, x, grad)
    expected_y, expected_grad = torch_forward_backward(reference, x, grad)
    assert torch.equal(y, expected_y)
    assert torch.equal(grad_input, expected_grad)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("shape", [(8, 64, 14, 14), (3, 5, 7), (33,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_keeps_only_the_mask(device, shape, dtype):
    numel = 1
    for size in shape:
        numel *= size
    x = torch.randn(shape).to(device=device, dtype=dtype).requires_grad_()
    for module in (da2ext.PackedReLU(), da2ext.PackedReLU6()):
        with da2ext.SavedTensorCounter() as counter:
            y = module(x)
        assert counter.saved_bytes == 4 * ((numel + 31) // 32)
        assert counter.saved_tensors == 1
        y.sum().backward()
    # a channels_last input keeps its memory order, and its mask is as large
    if len(shape) == 4:
        x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        with da2ext.SavedTensorCounter() as counter:
            da2ext.packed_relu(x_cl)
        assert counter.saved_bytes == 4 * ((numel + 31) // 32)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_mask_bit_layout(device, dtype, name):
    _, _, upper = ACTIVATIONS[name]
    x = special_values((5, 41), device, dtype, seed=5)  # 205 elements: 6 full words and 13 bits
    output, mask = torch.ops.da2ext.packed_activation(x, upper)
    assert mask.dtype == torch.int32 and mask.shape == (7,) and mask.device == x.device
    assert torch.equal(mask.cpu(), python_mask(x, upper))
    # a word with bit 31 set reads as a negative int32
    ones = torch.ones(64, device=device, dtype=dtype)
    assert torch.ops.da2ext.packed_activation(ones, upper)[1].tolist() == [-1, -1]


@pytest.mark.parametrize("device", all_devices())
def test_generic_upper(device):
    x = special_values((7, 9), device, torch.float32, seed=6, nan=False)
    grad = torch.randn(x.shape).to(device)
    y, grad_input = packed_forward_backward(lambda t: da2ext.packed_activation(t, 2.5), x, grad)
    expected_y, expected_grad = torch_forward_backward(lambda t: F.hardtanh(t, 0.0, 2.5), x, grad)
    assert torch.equal(y, expected_y)
    assert torch.equal(grad_input, expected_grad)


def test_no_grad_and_modules():
    x = torch.randn(4, 33)
    with torch.no_grad():
        y = da2ext.packed_relu(x.requires_grad_())
    assert y.grad_fn is None and torch.equal(y, torch.relu(x.detach()))
    model = torch.nn.Sequential(torch.nn.Linear(33, 16), da2ext.PackedReLU6(), torch.nn.Linear(16, 2),
                                da2ext.PackedReLU())
    model(x.detach()).sum().backward()
    assert model[0].weight.grad is not None


def test_op_errors_name_the_argument():
    x = torch.randn(4, 8, 3, 3)
    non_contiguous = x.transpose(1, 2)
    with pytest.raises(RuntimeError, match="packed_activation: input must be contiguous"):
        torch.ops.da2ext.packed_activation(non_contiguous, 6.0)
    with pytest.raises(RuntimeError, match="packed_activation: input must be float16, float32 or float64"):
        torch.ops.da2ext.packed_activation(torch.ones(4, dtype=torch.int32), 6.0)
    with pytest.raises(RuntimeError, match="packed_activation: upper must be > 0"):
        torch.ops.da2ext.packed_activation(x, 0.0)
    with pytest.raises(RuntimeError, match="packed_activation: upper must be > 0"):
        torch.ops.da2ext.packed_activation(x, float("nan"))
    with pytest.raises(RuntimeError, match="packed_activation_: self must be contiguous"):
        torch.ops.da2ext.packed_activation_(non_contiguous, 6.0)
    with pytest.raises(RuntimeError, match="packed_activation_: self must be float16, float32 or float64"):
        torch.ops.da2ext.packed_activation_(torch.ones(4, dtype=torch.int32), 6.0)
    with pytest.raises(RuntimeError, match="packed_activation_: upper must be > 0"):
        torch.ops.da2ext.packed_activation_(x, -1.0)
    output, mask = torch.ops.da2ext.packed_activation(x, 6.0)
    backward = torch.ops.da2ext.packed_activation_backward
    with pytest.raises(RuntimeError, match=r"packed_activation_backward: mask must have ceil\(numel / 32\) = 9 "):
        backward(output, mask[:-1])
    with pytest.raises(RuntimeError, match="packed_activation_backward: mask must be int32"):
        backward(output, mask.long())
    with pytest.raises(RuntimeError, match="packed_activation_backward: grad_output must be contiguous"):
        backward(output.transpose(1, 2), mask)
    with pytest.raises(RuntimeError, match="packed_activation_backward: mask must be contiguous"):
        backward(output, torch.stack([mask, mask], 1)[:, 0])


def test_python_errors():
    with pytest.raises(ValueError, match="upper must be > 0"):
        da2ext.packed_activation(torch.randn(3), -1.0)
    with pytest.raises(TypeError, match="must be float16, float32 or float64"):
        da2ext.packed_relu(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        da2ext.packed_relu([1.0])


def test_fallback_runs_plain_pytorch_with_a_warning(monkeypatch):
    monkeypatch.setattr(packed_module, "kernels_available", lambda device_type: False)
    monkeypatch.setattr(_extension, "_warned", set())
    x = special_values((3, 40), "cpu", torch.float32, seed=7, nan=False)
    grad = torch.randn(x.shape)
    with pytest.warns(RuntimeWarning, match="da2ext: running the pure-PyTorch reference"):
        y, grad_input = packed_forward_backward(da2ext.packed_relu6, x, grad)
    expected_y, expected_grad = torch_forward_backward(F.relu6, x, grad)
    assert torch.equal(y, expected_y)
    assert torch.equal(grad_input, expected_grad)


# ----------------------------------------------------------------------------------------------
# Fused with the neighbouring passes (CPU kernels): bias (+ residual) into the forward's pass,
# the per-channel sum (the BN shift's gradient) into the backward's.

FUSED_SHAPES = [(2, 3, 7, 7), (8, 64, 12, 12), (3, 5, 1, 1), (2, 4, 33), (1, 1, 5, 7), (4, 6), (2, 3, 0, 4)]


def _bits(mask, numel):
    return ((mask.view(-1, 1) >> torch.arange(32)) & 1).flatten()[:numel].bool()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("residual", [False, True], ids=["bias", "bias_residual"])
def test_bias_activation_matches_its_composite(dtype, shape, name, residual):
    upper = ACTIVATIONS[name][2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=generator) * 4).to(dtype)
    bias = torch.randn(shape[1], generator=generator).to(dtype)
    other = (torch.randn(shape, generator=generator) * 2).to(dtype) if residual else None
    # The kernel's arithmetic: (x + bias) (+ residual) in the accumulation dtype, clamped, rounded once.
    pre = x.to(acc) + bias.to(acc).view([1, -1] + [1] * (len(shape) - 2))
    if residual:
        pre = pre + other.to(acc)
    y = x.clone()
    mask = torch.ops.da2ext.packed_bias_activation_(y, bias, other, upper)
    assert mask.dtype == torch.int32 and mask.numel() == (x.numel() + 31) // 32
    assert torch.equal(y, pre.clamp(0, upper).to(dtype))
    assert torch.equal(_bits(mask, x.numel()), ((pre > 0) & (pre < upper)).flatten())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_channel_sums_match_mask_then_sum(dtype, shape):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator).to(dtype)
    _, mask = torch.ops.da2ext.packed_activation(x, 6.0)
    grad = torch.randn(shape, generator=generator).to(dtype)
    grad_input, sums = torch.ops.da2ext.packed_activation_backward_channel_sums(grad, mask)
    assert torch.equal(grad_input, torch.ops.da2ext.packed_activation_backward(grad, mask))
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = grad_input.double().sum(dim=[0] + list(range(2, len(shape))))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(sums.double(), expected, rtol=tolerance, atol=tolerance)
    again = torch.ops.da2ext.packed_activation_backward_channel_sums(grad, mask)[1]
    assert torch.equal(again, sums)  # a fixed summation order


# channels_last: C a multiple of 32 (whole words inside rows), not (words across rows),
# enough rows for several blocks of the kernel, one pixel.
CHANNELS_LAST_SHAPES = [(2, 64, 5, 7), (3, 24, 9, 11), (8, 40, 30, 30), (2, 96, 1, 1), (1, 7, 3, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_channel_sums_in_channels_last(dtype, shape):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    output, mask = torch.ops.da2ext.packed_activation(x, 6.0)
    assert output.stride() == x.stride() and torch.equal(output, F.relu6(x.double()).to(dtype))
    # the mask follows memory order: the (N, H, W, C) view's
    assert torch.equal(mask, python_mask(x.permute(0, 2, 3, 1), 6.0))
    grad = torch.randn(shape, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    grad_input, sums = torch.ops.da2ext.packed_activation_backward_channel_sums(grad, mask)
    separate = torch.ops.da2ext.packed_activation_backward(grad, mask)
    assert grad_input.stride() == grad.stride() and separate.stride() == grad.stride()
    assert torch.equal(grad_input, separate)
    passes = (x.double() > 0) & (x.double() < 6)
    assert torch.equal(grad_input, torch.where(passes, grad, torch.zeros_like(grad)))
    expected = grad_input.double().sum(dim=(0, 2, 3))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(sums.double(), expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(torch.ops.da2ext.packed_activation_backward_channel_sums(grad, mask)[1], sums)


def test_fused_ops_say_what_is_wrong():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="bias must be 1-D with one value per channel"):
        torch.ops.da2ext.packed_bias_activation_(x, torch.zeros(4), None, 6.0)
    with pytest.raises(RuntimeError, match="bias must be a contiguous Float tensor"):
        torch.ops.da2ext.packed_bias_activation_(x, torch.zeros(3, dtype=torch.float64), None, 6.0)
    with pytest.raises(RuntimeError, match="residual must be a Float tensor of shape"):
        torch.ops.da2ext.packed_bias_activation_(x, torch.zeros(3), torch.zeros(2, 3, 4, 5), 6.0)
    with pytest.raises(RuntimeError, match="self must have at least 2 dims"):
        torch.ops.da2ext.packed_bias_activation_(torch.zeros(5), torch.zeros(5), None, 6.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.da2ext.packed_bias_activation_(x.transpose(2, 3), torch.zeros(3), None, 6.0)
    with pytest.raises(RuntimeError, match=r"self must be contiguous \(N x C x \.\.\.\)"):
        torch.ops.da2ext.packed_bias_activation_(x.contiguous(memory_format=torch.channels_last), torch.zeros(3),
                                                 None, 6.0)
    with pytest.raises(RuntimeError, match="mask must have ceil"):
        torch.ops.da2ext.packed_activation_backward_channel_sums(x, torch.zeros(1, dtype=torch.int32))
