"""LeanMaxPool2d: nn.MaxPool2d's values and gradients, keeping one uint8 per output
element for backward instead of an int64 index."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from da2ext.lean.lean_max_pool import LeanMaxPool2d
from da2ext.profiling import SavedTensorCounter

# (kernel_size, stride, padding, dilation, ceil_mode)
CONFIGS = [
    (3, 2, 1, 1, False),  # ResNet's stem pool: overlapping windows
    (2, 2, 0, 1, False),
    (3, 1, 1, 1, False),  # stride 1: every input in up to 9 windows
    (3, 2, 1, 1, True),
    (2, 2, 0, 1, True),  # ceil_mode: the last window runs off the odd edge
    (3, 2, 0, 2, False),  # dilation
    (2, 3, 1, 2, True),
    ((3, 2), (2, 1), (1, 0), (2, 1), False),  # rectangular everything
    ((2, 3), (1, 2), (0, 1), (1, 1), True),
    (5, 2, 2, 1, False),
    (16, 1, 0, 1, False),  # 256 window positions: offsets 0..255 fill the uint8
]
IDS = ["k{}-s{}-p{}-d{}-{}".format(*c).replace(" ", "") for c in CONFIGS]


def pools(config):
    kernel_size, stride, padding, dilation, ceil_mode = config
    reference = nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
    return LeanMaxPool2d.from_module(reference), reference


def inputs(shape, ties, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: most windows hold their maximum more than once
        return torch.randint(-2, 3, shape, generator=generator).double()
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def values_and_gradient(pool, x, grad):
    xi = x.clone().requires_grad_(True)
    y = pool(xi)
    y.backward(grad)
    return y.detach(), xi.grad


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_values_and_gradients_match_max_pool(config, ties):
    lean, reference = pools(config)
    shape = (2, 3, 19, 17) if config[0] != 16 else (1, 2, 20, 18)
    x = inputs(shape, ties)
    with torch.no_grad():
        expected = reference(x)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, gx = values_and_gradient(lean, x, grad)
    y_ref, gx_ref = values_and_gradient(reference, x, grad)
    assert y.shape == y_ref.shape
    assert torch.equal(y, y_ref)
    # the same winners: exactly the same sums (in the same order of addition up to rounding)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    # and without autograd: the same values
    assert torch.equal(lean(x), y_ref)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_keeps_one_byte_per_output_element(config):
    lean, reference = pools(config)
    x = torch.randn(2, 3, 21, 20, requires_grad=True) if config[0] != 16 else torch.randn(1, 2, 20, 18,
                                                                                           requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lean(x)
    assert saved == [(torch.uint8, y.numel())]
    with SavedTensorCounter() as counter:
        lean(x)
    assert counter.saved_bytes == y.numel()
    with SavedTensorCounter() as counter:
        reference(x)
    assert counter.saved_bytes >= 8 * y.numel()  # torch keeps int64 indices (and the input)


def test_no_autograd_when_the_input_needs_no_gradient():
    lean = LeanMaxPool2d(3, 2, 1)
    x = torch.randn(1, 2, 9, 9)
    with SavedTensorCounter() as counter:
        y = lean(x)
    assert counter.saved_bytes == 0 and y.grad_fn is None
    assert torch.equal(y, F.max_pool2d(x, 3, 2, 1))


def test_float32_non_contiguous_input():
    lean, reference = pools((3, 2, 1, 1, False))
    x = torch.randn(2, 9, 11, 3).permute(0, 3, 1, 2)  # N x C x H x W view, not contiguous
    grad = torch.randn(2, 3, 5, 6)
    y, gx = values_and_gradient(lean, x, grad)
    y_ref, gx_ref = values_and_gradient(reference, x, grad)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="256 window positions"):
        LeanMaxPool2d(17)
    with pytest.raises(NotImplementedError):
        LeanMaxPool2d.from_module(nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(NotImplementedError):
        LeanMaxPool2d.from_module(nn.AvgPool2d(2))
    with pytest.raises(ValueError, match="N x C x H x W"):
        LeanMaxPool2d(2)(torch.randn(3, 8, 8))


def test_from_module_copies_the_settings():
    lean = LeanMaxPool2d.from_module(nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True))
    assert (lean.kernel_size, lean.stride, lean.padding, lean.dilation, lean.ceil_mode) == (
        (3, 3), (2, 2), (1, 1), (2, 2), True)
    assert LeanMaxPool2d(3).stride == (3, 3)  # stride defaults to the kernel size, as torch's
