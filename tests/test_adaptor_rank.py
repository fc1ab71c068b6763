"""Rank-k residual attention (docs/design.md §2, "Rank and placement"): the module
and op at k > 1 against the reference, float64 gradchecks, and what backward keeps."""
import pytest
import torch
from torch import nn

import da2ext
from helpers import all_devices, relative_error


def rank_pair(channels, rank, mode="add", seed=0):
    torch.manual_seed(seed)
    fused = da2ext.ResidualAttentionAdaptor(channels, spatial_kernel=3, mode=mode, rank=rank)
    with torch.no_grad():
        nn.init.normal_(fused.gamma, std=0.5)
    reference = da2ext.reference.ResidualAttentionAdaptor(channels, spatial_kernel=3, mode=mode, rank=rank)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_parameter_shapes_grow_with_the_rank(rank):
    adaptor = da2ext.ResidualAttentionAdaptor(32, rank=rank)
    assert adaptor.fc2.out_features == rank * 32
    assert adaptor.spatial.out_channels == rank
    assert tuple(adaptor.gamma.shape) == ((32,) if rank == 1 else (rank, 32))
    x = torch.randn(2, 32, 5, 5)
    assert torch.equal(adaptor(x), x)  # gamma starts at 0: the identity, at every rank
    assert "rank={}".format(rank) in repr(adaptor)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("rank", [2, 4])
# 3x3 and 2x2 maps take the CPU's small-tile loops (their channels four at a time, then the rest)
@pytest.mark.parametrize("shape", [(3, 12, 6, 5), (5, 13, 3, 3), (2, 6, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_rank_k_matches_the_reference_in_float64(shape, rank, mode, memory_format, device):
    if device == "cuda" and memory_format == torch.channels_last:
        pytest.skip("the CUDA kernels take NCHW")
    fused, reference = rank_pair(shape[1], rank, mode)
    fused, reference = fused.double().to(device), reference.double().to(device)
    x = torch.randn(shape, dtype=torch.float64, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_()
    y = fused(x)
    expected = reference(x)
    assert relative_error(y, expected) < 1e-12
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(y, [x] + list(fused.parameters()), g)
    expected_grads = torch.autograd.grad(expected, [x] + list(reference.parameters()), g)
    for (name, _), a, b in zip([("input", None)] + list(fused.named_parameters()), grads, expected_grads):
        assert relative_error(a, b) < 1e-10, name


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_gradcheck_rank_3(mode, device):
    fused, _ = rank_pair(5, 3, mode)
    fused = fused.double().to(device)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    params = list(fused.parameters())

    def run(x, *unused):
        return fused(x)

    assert torch.autograd.gradcheck(run, [x] + params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_rank_k_keeps_small_tensors_only():
    """What backward keeps grows as O(N*k*(C+H*W)): nothing of size N*C*H*W in mode add."""
    n, c, h, w = 2, 64, 16, 16
    x = torch.randn(n, c, h, w, requires_grad=True)
    kept = {}
    for rank in (1, 4):
        adaptor, _ = rank_pair(c, rank)
        kept[rank] = da2ext.saved_bytes(adaptor, x)
        assert kept[rank] < x.numel() * 4 / 4  # far below one copy of F
    assert kept[4] > kept[1]


@pytest.mark.parametrize("rank", [0, 17, 2.5, True])
def test_a_bad_rank_is_refused_by_name(rank):
    with pytest.raises(ValueError, match="rank must be an integer from 1 to 16"):
        da2ext.ResidualAttentionAdaptor(8, rank=rank)
    model = __import__("torchvision").models.resnet18()
    with pytest.raises(ValueError, match="adapt: rank must be an int from 1 to 16"):
        da2ext.adapt(model, 10, rank=rank)
