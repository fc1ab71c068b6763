"""float64 gradient checks of the fused op and module on the CPU kernels (and CUDA where present)."""
import pytest
import torch

import da2ext
from helpers import adaptor_pair, all_devices

SHAPES = [
    (2, 3, 5, 7),
    (1, 1, 1, 1),
    (3, 1, 4, 1),
    (1, 5, 1, 6),
    (2, 17, 3, 3),
    (1, 9, 33, 2),  # more than one tile of positions per image on the CPU
    # the CPU's small-branch products take the images four at a time (then one), the
    # channels 16 and 8 at a time (then one); 2x2 and 3x2 maps take the small-plane loops
    (5, 6, 2, 2),
    (6, 40, 3, 2),
]


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_op(shape, mode, device):
    torch.manual_seed(1)
    fused, _ = adaptor_pair(shape[1], mode=mode, spatial_kernel=3)
    params = [p.detach().double().to(device).requires_grad_() for p in fused.branch_parameters()]
    gamma = (torch.randn(shape[1], dtype=torch.float64, device=device) * 0.7).requires_grad_()
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)

    def op(x, *tensors):
        return da2ext.residual_attention(x, *tensors[:-1], gamma=tensors[-1], mode=mode)

    assert torch.autograd.gradcheck(op, [x] + params + [gamma], eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_gradcheck_module_partial_requires_grad(mode, device):
    """Only some inputs need gradients: the others get None and the rest stay exact."""
    fused, _ = adaptor_pair(6, mode=mode)
    fused = fused.double().to(device)
    fused.fc1.requires_grad_(False)
    fused.spatial.weight.requires_grad_(False)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    trainable = [p for p in fused.parameters() if p.requires_grad]

    def run(x, *unused):
        return fused(x)

    assert torch.autograd.gradcheck(run, [x] + trainable, eps=1e-6, atol=1e-7, rtol=1e-5)
    y = fused(x.detach())  # input needs no gradient: the dF pass is skipped
    y.sum().backward()
    assert fused.fc1.weight.grad is None and fused.spatial.weight.grad is None
    assert all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_gradcheck_only_gamma(mode):
    """Only gamma trainable (nothing of the small branch needs autograd in backward)."""
    fused, _ = adaptor_pair(4, mode=mode)
    fused = fused.double()
    for p in fused.branch_parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def run(gamma):
        return da2ext.residual_attention(x, *fused.branch_parameters(), gamma=gamma, mode=mode)

    assert torch.autograd.gradcheck(run, [fused.gamma.detach().clone().requires_grad_()], eps=1e-6, atol=1e-7)
