"""The adaptor's spatial conv (2 -> k channels) on the CPU: small maps call the
im2col kernel by name, large ones F.conv2d's choice; either way the same values
as F.conv2d, and no global setting (oneDNN's switch) is touched, so threads
running adaptors at once cannot change each other's backend."""
import pytest
import torch
import torch.nn.functional as F

import da2ext
from da2ext.ops.attention_branch import spatial_attention_logits, uses_im2col_conv
from da2ext.ops.attention_branch_backward import attention_logits_backward


@pytest.mark.parametrize("size, im2col", [(5, True), (28, True), (29, False)])
def test_the_spatial_conv_and_its_gradients_match_conv2d(size, im2col):
    generator = torch.Generator().manual_seed(size)
    spatial = torch.randn(3, 2, size, size, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 2, 7, 7, dtype=torch.float64, generator=generator)
    bias = torch.randn(4, dtype=torch.float64, generator=generator)
    assert uses_im2col_conv(spatial) == im2col
    expected = F.conv2d(spatial, weight, bias, padding=3)
    assert torch.allclose(spatial_attention_logits(spatial, weight, bias), expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (spatial, weight, bias)]
    reference = torch.autograd.grad(F.conv2d(leaves[0], leaves[1], leaves[2], padding=3), leaves, grad)
    channels, hidden = 6, 8
    grads = attention_logits_backward(torch.zeros(3, channels, dtype=torch.float64), grad,
                                      torch.zeros(3, channels, dtype=torch.float64), spatial,
                                      torch.zeros(3, hidden, dtype=torch.float64),
                                      torch.zeros(hidden, channels, dtype=torch.float64),
                                      torch.zeros(channels, hidden, dtype=torch.float64), weight,
                                      [False, True, False, False, False, False, True, True])
    for ours, theirs in zip((grads[1], grads[6], grads[7]), reference):
        assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10)
    assert grads[0] is None and grads[2] is None


def test_an_adaptor_step_changes_no_global_setting(monkeypatch):
    def refuse(*args):
        raise AssertionError("a global backend switch was flipped")

    monkeypatch.setattr(torch._C, "_set_mkldnn_enabled", refuse)
    adaptor = da2ext.ResidualAttentionAdaptor(16, rank=2)
    with torch.no_grad():
        adaptor.gamma.fill_(0.5)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    adaptor(x).square().sum().backward()
    assert x.grad is not None and adaptor.spatial.weight.grad.abs().sum() > 0
