"""The adaptor in eight kernel launches on CUDA: torch.ops.da2ext.residual_attention with
the CUDA forward and backward ops (csrc/ops/cuda/residual_attention_one_op_cuda.cpp,
the small branch in cuda/attention_branch_kernel.cu), run within one_op_on_cuda() (the
default where DA2EXT_CUDA_ONE_OP=1).

Its output and every gradient match the op-by-op CUDA path's (the same heavy kernels,
the small branch in PyTorch ops) to float32 and float16 rounding, float64 gradcheck
passes, an empty batch gives zero parameter gradients, two runs give the same bits
(no atomics), one forward + backward launches at most eight kernels, and a hidden
layer too wide for a block's shared memory is refused naming fc1_weight.

Skipped without a CUDA device and an extension built with the CUDA kernels.
"""
import importlib

import pytest
import torch

import da2ext
from da2ext.ops.fake_kernels import has_op

residual_attention_module = importlib.import_module("da2ext.ops.residual_attention")

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or da2ext.backend("cuda") != "cuda" or not has_op("residual_attention"),
    reason="needs a CUDA device and the extension's CUDA kernels (torch >= 1.11)")

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2}


def _adaptor(channels, rank, mode, dtype, seed=0, reduction=4, spatial_kernel=7):
    torch.manual_seed(seed)
    module = da2ext.ResidualAttentionAdaptor(channels, reduction=reduction, rank=rank, mode=mode,
                                             spatial_kernel=spatial_kernel)
    module = module.to(device="cuda", dtype=dtype)
    with torch.no_grad():
        module.gamma.normal_()  # gamma 0 would hide the branch's gradients
    return module


def _run(module, x, grad):
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("shape", [(3, 16, 5, 6), (8, 256, 2, 2), (2, 64, 56, 56), (2, 8, 113, 111),
                                   (1, 4, 1, 1), (2, 2048, 7, 7), (4, 3, 1, 9)],
                         ids=["small", "deep-2x2", "56x56", "odd-113x111", "one-pixel", "c2048-7x7", "one-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cuda_one_op_matches_the_op_by_op_path(rank, mode, shape, dtype):
    module = _adaptor(shape[1], rank, mode, dtype)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    grad = torch.randn_like(x)
    with residual_attention_module.one_op_on_cuda():
        assert residual_attention_module.uses_one_op(x)
        one_op = _run(module, x, grad)
    with residual_attention_module.op_by_op():
        op_by_op = _run(module, x, grad)
    names = ["y", "x.grad"] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, one_op, op_by_op):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _relative(a, b) <= TOLERANCE[dtype], (name, _relative(a, b))


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_cuda_one_op_gradcheck_float64(rank, mode):
    module = _adaptor(6, rank, mode, torch.float64, reduction=2, spatial_kernel=3)
    x = torch.randn(2, 6, 4, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    params = tuple(module.branch_parameters()) + (module.gamma,)

    def function(x, *params):
        return da2ext.residual_attention(x, *params, mode=mode)

    with residual_attention_module.one_op_on_cuda():
        assert torch.autograd.gradcheck(function, (x,) + params, eps=1e-6, atol=1e-7)


def test_cuda_one_op_is_deterministic():
    module = _adaptor(128, 2, "mul", torch.float32)
    x = torch.randn(4, 128, 14, 14, device="cuda")
    grad = torch.randn_like(x)
    with residual_attention_module.one_op_on_cuda():
        first, second = _run(module, x, grad), _run(module, x, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cuda_one_op_of_an_empty_batch_gives_zero_parameter_gradients():
    module = _adaptor(16, 2, "add", torch.float32)
    x = torch.randn(0, 16, 5, 5, device="cuda")
    with residual_attention_module.one_op_on_cuda():
        results = _run(module, x, torch.zeros_like(x))
    assert results[0].shape == x.shape and results[1].shape == x.shape
    for grad in results[2:]:
        assert torch.count_nonzero(grad).item() == 0


def test_cuda_one_op_launches_at_most_eight_kernels():
    module = _adaptor(256, 1, "add", torch.float32)
    x = torch.randn(8, 256, 2, 2, device="cuda", requires_grad=True)
    grad = torch.ones_like(x)
    with residual_attention_module.one_op_on_cuda():
        _run(module, x, grad)  # warm-up
        module.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            module(x).backward(grad)
            torch.cuda.synchronize()
    kernels = [e.name for e in profile.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    assert 0 < len(kernels) <= 8, kernels


def test_cuda_one_op_refuses_a_hidden_layer_wider_than_a_block_holds():
    channels, hidden = 8, 20000
    x = torch.randn(1, channels, 3, 3, device="cuda")
    params = (torch.randn(hidden, channels, device="cuda"), torch.randn(hidden, device="cuda"),
              torch.randn(channels, hidden, device="cuda"), torch.randn(channels, device="cuda"),
              torch.randn(1, 2, 3, 3, device="cuda"), torch.randn(1, device="cuda"),
              torch.randn(channels, device="cuda"))
    with pytest.raises(RuntimeError, match="fc1_weight has 20000"):
        torch.ops.da2ext.residual_attention_forward(x, *params, False)
