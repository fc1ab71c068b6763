"""What the fused op keeps for backward (docs/design.md §2 and §4)."""
import pytest
import torch

import da2ext
from helpers import adaptor_pair, all_devices, relative_error


def kept_bytes(module, x):
    with da2ext.SavedTensorCounter() as counter:
        module(x)
    return counter.saved_bytes


@pytest.mark.parametrize("device", all_devices())
def test_add_mode_keeps_under_5_percent_of_input(device):
    fused, reference = adaptor_pair(256)
    fused.to(device)
    reference.to(device)
    x = torch.randn(8, 256, 56, 56, device=device, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    fused_bytes = kept_bytes(fused, x)
    # descriptors (N*C + 2*N*H*W floats), argmax (N*H*W int32), the MLP's hidden
    # layer (N*16), the channel logits (N*C; the spatial ones are recomputed) and the
    # weights the backward multiplies by
    N, C, HW, hidden = 8, 256, 56 * 56, 16
    activations = (N * C + 2 * N * HW) * 4 + N * HW * 4 + N * hidden * 4 + N * C * 4
    weights = sum(p.numel() * p.element_size() for p in (fused.fc1.weight, fused.fc2.weight, fused.spatial.weight,
                                                         fused.spatial.bias, fused.gamma))
    expected = activations + weights
    assert fused_bytes == expected
    assert fused_bytes < 0.05 * input_bytes
    assert kept_bytes(reference, x) > input_bytes  # the eager maths keeps full-size tensors


@pytest.mark.parametrize("device", all_devices())
def test_mul_mode_keeps_the_input_once(device):
    fused, _ = adaptor_pair(64, mode="mul")
    fused.to(device)
    x = torch.randn(4, 64, 20, 20, device=device, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    small = kept_bytes(adaptor_pair(64, mode="add")[0].to(device), x)  # the same adaptor without F
    assert kept_bytes(fused, x) == input_bytes + small
    fused.saved_input_dtype = torch.float16
    assert kept_bytes(fused, x) == input_bytes // 2 + small


@pytest.mark.parametrize("device", all_devices())
def test_mul_mode_half_saved_input_gradient_error(device):
    """Keeping F in float16 for mode "mul" perturbs only the attention gradients,
    by about float16's resolution (the README quotes this bound)."""
    fused, _ = adaptor_pair(64, mode="mul")
    fused.to(device)
    torch.manual_seed(5)
    x = torch.randn(4, 64, 20, 20, device=device)
    g = torch.randn_like(x)

    def gradients(saved_input_dtype):
        fused.saved_input_dtype = saved_input_dtype
        fused.zero_grad()
        xi = x.clone().requires_grad_()
        fused(xi).backward(g)
        return [xi.grad] + [p.grad.clone() for p in fused.parameters()]

    full, half = gradients(None), gradients(torch.float16)
    errors = [relative_error(h, f) for h, f in zip(half, full)]
    assert max(errors) < 1e-3, errors
