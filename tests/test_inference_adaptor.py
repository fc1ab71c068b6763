"""InferenceAdaptor (da2ext.deploy.inference_model): the adaptor's forward in standard ops
(the rank-k sum as a batched matrix product, rank 1 as one broadcast product) gives the
fused adaptor's output, in both modes, on both memory orders."""
import pytest
import torch

import da2ext
from da2ext.deploy.inference_model import InferenceAdaptor


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_adaptor_matches_the_fused_adaptor(rank, mode, channels_last):
    torch.manual_seed(rank)
    adaptor = da2ext.ResidualAttentionAdaptor(24, reduction=4, mode=mode, rank=rank).double()
    with torch.no_grad():
        for p in adaptor.parameters():
            p.normal_(std=0.5)  # gamma starts at 0, where every adaptor is the identity
    x = torch.randn(3, 24, 5, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = adaptor(x)
        got = InferenceAdaptor(adaptor)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_inference_adaptor_refuses_what_is_not_an_adaptor():
    with pytest.raises(TypeError, match="expected a residual attention adaptor"):
        InferenceAdaptor(torch.nn.Conv2d(3, 3, 1))
