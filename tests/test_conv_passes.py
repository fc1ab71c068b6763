"""The frozen conv's two passes (GEMM for pointwise convs on the CPU, transposed
conv for other input gradients) against F.conv2d and autograd, in float64."""
import pytest
import torch
import torch.nn.functional as F

from da2ext.ops.conv_passes import conv2d_forward, conv2d_input_grad, is_pointwise

CASES = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
    (2, 5, 7, 9, 3, 1, 1, 0, 1, 1),    # pointwise, 63 pixels: oneDNN
    (2, 5, 8, 9, 3, 1, 1, 0, 1, 1),    # pointwise, 72 pixels: the GEMM path
    (1, 4, 1, 1, 6, 1, 1, 0, 1, 1),    # pointwise on a 1x1 map
    (2, 6, 9, 8, 4, 1, 2, 0, 1, 1),    # strided 1x1 (ResNet's downsample), 20 output pixels: conv path
    (2, 6, 17, 16, 4, 1, 2, 0, 1, 1),  # strided 1x1, 72 output pixels: GEMM at the read pixels
    (1, 3, 25, 26, 5, 1, 3, 0, 1, 1),  # stride 3, 9x9 output pixels: GEMM; column 25 gets no gradient
    (2, 4, 11, 10, 8, 3, 2, 1, 1, 1),  # strided 3x3, odd sizes: output_padding needed
    (2, 6, 8, 7, 6, 3, 1, 1, 1, 6),    # depthwise
    (2, 4, 9, 9, 4, 3, 1, 2, 2, 2),    # dilated, grouped
    (2, 3, 13, 12, 5, 7, 2, 3, 1, 1),  # a stem
    (0, 5, 7, 9, 3, 1, 1, 0, 1, 1),    # an empty batch
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_input_grad_match_conv2d(case, with_bias):
    n, c_in, h, w, c_out, k, stride, padding, dilation, groups = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64, generator=gen)
    bias = torch.randn(c_out, dtype=torch.float64, generator=gen) if with_bias else None
    args = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    expected = F.conv2d(x, weight, bias, *args)
    out = conv2d_forward(x.detach(), weight, bias, *args)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    expected_grad, = torch.autograd.grad(expected, x, grad) if expected.numel() else (torch.zeros_like(x),)
    grad_input = conv2d_input_grad(grad, x.shape, weight, *args)
    assert grad_input.shape == x.shape
    torch.testing.assert_close(grad_input, expected_grad, rtol=1e-12, atol=1e-12)


def test_is_pointwise():
    w = torch.zeros(4, 3, 1, 1)
    assert is_pointwise(w, (1, 1), (0, 0), (1, 1), 1)
    assert not is_pointwise(w, (2, 2), (0, 0), (1, 1), 1)
    assert is_pointwise(w, (2, 2), (0, 0), (1, 1), 1, any_stride=True)
    assert not is_pointwise(w, (2, 2), (1, 1), (1, 1), 1, any_stride=True)
    assert not is_pointwise(w, (1, 1), (1, 1), (1, 1), 1)
    assert not is_pointwise(torch.zeros(4, 1, 1, 1), (1, 1), (0, 0), (1, 1), 3)
    assert not is_pointwise(torch.zeros(4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1)
