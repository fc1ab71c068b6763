"""The adaptor in one dispatch: on the CPU the fused adaptor is one op,
torch.ops.da2ext.residual_attention, whose autograd node is C++
(csrc/ops/residual_attention_autograd.cpp); its forward and backward are one op each
(csrc/ops/residual_attention_composite.cpp), the small branch as loops on small sizes
(cpu/attention_branch_loops.cpp) and through ATen above. Its outputs and every
gradient match the op-by-op path's (the CUDA path: the same kernels, the small branch
in PyTorch ops) to rounding, it passes float64 gradcheck, it skips the input gradient
when nothing needs it, it refuses a second-order gradient, it runs in inference mode,
and bad arguments are refused naming them."""
import importlib

import pytest
import torch

import da2ext
from da2ext.ops.fake_kernels import has_op

residual_attention_module = importlib.import_module("da2ext.ops.residual_attention")

pytestmark = pytest.mark.skipif(
    da2ext.backend("cpu") != "cpu" or not has_op("residual_attention_forward"),
    reason="needs the compiled extension, built against torch >= 1.11")
if da2ext.backend("cpu") == "cpu" and not has_op("residual_attention"):
    pytestmark = pytest.mark.skip(reason="needs the one-op adaptor (an extension built against torch >= 1.11)")


def _adaptor(channels, rank, mode, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    module = da2ext.ResidualAttentionAdaptor(channels, reduction=4, rank=rank, mode=mode).to(dtype)
    with torch.no_grad():
        module.gamma.normal_()  # gamma 0 would hide the branch's gradients
    return module


def assert_matches(a, b):
    """Equal to rounding: the loops sum in another order than BLAS and ATen's sigmoid."""
    tolerance = 1e-12 if a.dtype == torch.float64 else 1e-5
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a - b).abs().max() <= tolerance * max(b.abs().max().item(), 1e-30)


def _run(module, x, grad):
    x = x.detach().requires_grad_(True)
    module.zero_grad()
    y = module(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("shape,order", [((3, 16, 5, 6), "contiguous"), ((2, 32, 4, 4), "channels_last"),
                                         ((2, 8, 40, 40), "contiguous"), ((2, 8, 31, 33), "channels_last"),
                                         ((8, 256, 2, 2), "contiguous"), ((2, 512, 7, 7), "contiguous"),
                                         ((1, 4, 1, 1), "contiguous"), ((2, 3, 1, 9), "channels_last"),
                                         ((3, 24, 3, 3), "contiguous"), ((2, 40, 3, 4), "contiguous"),
                                         ((4, 64, 1, 1), "contiguous")],
                         ids=["small", "small-cl", "im2col-above-28x28", "odd-cl", "deep-2x2", "deep-7x7",
                              "one-pixel", "one-row-cl", "3x3", "3x4", "deep-1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_op_by_op_path(rank, mode, shape, order, dtype):
    module = _adaptor(shape[1], rank, mode, dtype)
    x = torch.randn(shape, dtype=dtype)
    if order == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    assert residual_attention_module.uses_one_op(x)
    one_op = _run(module, x, grad)
    with residual_attention_module.op_by_op():
        assert not residual_attention_module.uses_one_op(x)
        op_by_op = _run(module, x, grad)
    for a, b in zip(one_op, op_by_op):
        assert_matches(a, b)
    if not (x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):  # a 1x1 map is both
        assert one_op[0].is_contiguous(memory_format=torch.channels_last) == (order == "channels_last")


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_gradcheck_float64(rank, mode):
    module = _adaptor(6, rank, mode, torch.float64)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(module.branch_parameters()) + (module.gamma,)
    assert torch.autograd.gradcheck(
        lambda x, *p: da2ext.residual_attention(x, *p, mode=mode), (x,) + params, eps=1e-6, atol=1e-6)


def test_saved_input_in_float16_as_the_op_by_op_path():
    module = _adaptor(16, 2, "mul")
    x, grad = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    params = tuple(module.branch_parameters()) + (module.gamma,)
    results = []
    for context in (None, residual_attention_module.op_by_op()):
        xi = x.clone().requires_grad_(True)
        if context is None:
            y = da2ext.residual_attention(xi, *params, mode="mul", saved_input_dtype=torch.float16)
        else:
            with context:
                y = da2ext.residual_attention(xi, *params, mode="mul", saved_input_dtype=torch.float16)
        results.append(torch.autograd.grad(y, (xi,) + params, grad))
    for a, b in zip(*results):
        assert_matches(a, b)


def test_no_input_gradient_when_the_input_needs_none():
    module = _adaptor(16, 4, "add")
    x = torch.randn(2, 16, 3, 3)  # e.g. the first adaptor after a backbone run without autograd
    y = module(x)
    y.sum().backward()
    assert x.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_keeps_what_the_op_by_op_path_keeps():
    module = _adaptor(64, 4, "add")
    x = torch.randn(4, 64, 14, 14, requires_grad=True)
    kept = []
    for context in (None, residual_attention_module.op_by_op()):
        with (context or torch.enable_grad()):
            kept.append(da2ext.saved_bytes(module, x))
    assert kept[0] == kept[1] > 0


@pytest.mark.parametrize("argument, bad, message", [
    (1, torch.randn(4, 7), "fc1_weight must be \\[hidden, C = 8\\]"),
    (3, torch.randn(8, 4), "fc2_weight must be \\[k\\*C = 16, hidden = 4\\]"),
    (5, torch.randn(1, 2, 3, 3), "spatial_weight must be \\[k = 2, 2, K, K\\]"),
    (7, torch.randn(2, 9), "gamma must have C = 8 entries per row"),
    (7, torch.randn(2, 8, dtype=torch.float64), "must have the input's dtype and device"),
], ids=["fc1_weight", "fc2_weight", "spatial_weight", "gamma_shape", "gamma_dtype"])
def test_bad_arguments_are_named(argument, bad, message):
    # a rank-2 adaptor of 8 channels, hidden width 4, 3x3 spatial conv; one argument replaced
    args = [torch.randn(2, 8, 3, 3), torch.randn(4, 8), torch.randn(4), torch.randn(16, 4), torch.randn(16),
            torch.randn(2, 2, 3, 3), torch.randn(2), torch.randn(2, 8)]
    args[argument] = bad
    with pytest.raises(RuntimeError, match=message):
        torch.ops.da2ext.residual_attention_forward(*args, False)


def test_mode_mul_backward_needs_the_input():
    module = _adaptor(8, 1, "mul")
    x = torch.randn(2, 8, 3, 3)
    outputs = torch.ops.da2ext.residual_attention_forward(x, *module.branch_parameters(), module.gamma.detach(), True)
    with pytest.raises(RuntimeError, match="mode mul needs the forward's input"):
        torch.ops.da2ext.residual_attention_backward(
            torch.randn_like(x), None, *outputs[1:], module.gamma.detach(), module.fc1.weight, module.fc2.weight,
            module.spatial.weight, module.spatial.bias, True, True)


@pytest.mark.parametrize("index, bad, message", [
    (0, torch.randn(2, 9), "channel_mean must have shape \\[N, C\\]"),
    (1, torch.randn(2, 2, 3, 4), "spatial must have shape \\[N, 2, H, W\\]"),
    (2, torch.zeros(2, 3, 3), "argmax must be Int"),
    (3, torch.randn(2, 5), "hidden_pre must have shape \\[N, hidden\\]"),
    (4, torch.randn(2, 8).t(), "channel_logits must be contiguous"),
], ids=["channel_mean", "spatial", "argmax", "hidden_pre", "channel_logits"])
def test_backward_refuses_saved_tensors_that_do_not_fit(index, bad, message):
    # residual_attention_backward reads what forward kept through raw pointers: each is checked first
    module = _adaptor(8, 1, "add")
    x = torch.randn(2, 8, 3, 3)
    params = [p.detach() for p in module.branch_parameters()]
    saved = list(torch.ops.da2ext.residual_attention_forward(x, *params, module.gamma.detach(), False)[1:])
    if index == 4:
        bad = torch.randn(8, 2).t()  # [2, 8], the right size, not contiguous
    saved[index] = bad
    with pytest.raises(RuntimeError, match=message):
        torch.ops.da2ext.residual_attention_backward(
            torch.randn_like(x), None, *saved, module.gamma.detach(), params[0], params[2], params[4], params[5],
            False, True)


def test_a_parametrised_weight_is_read_through_its_parametrisation():
    parametrize = pytest.importorskip("torch.nn.utils.parametrize")

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    module = _adaptor(8, 1, "add")
    weight = module.fc1.weight.detach().clone()
    parametrize.register_parametrization(module.fc1, "weight", Doubled())
    assert torch.equal(module.adaptor_tensors()[0], 2 * weight)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    module(x).sum().backward()
    assert module.fc1.parametrizations.weight.original.grad is not None


def test_a_second_order_gradient_is_refused():
    module = _adaptor(8, 1, "add")
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = module(x)
    grads = torch.autograd.grad(y.square().sum(), (x, module.gamma), create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        sum(g.sum() for g in grads).backward()


def test_a_first_order_gradient_under_create_graph_is_the_same():
    module = _adaptor(8, 2, "mul")
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    grad = torch.randn(2, 8, 3, 3)
    plain = torch.autograd.grad(module(x), (x,) + tuple(module.parameters()), grad)
    graphed = torch.autograd.grad(module(x), (x,) + tuple(module.parameters()), grad, create_graph=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b.detach())


def test_inference_mode_runs_the_forward_alone():
    module = _adaptor(8, 1, "add")
    x = torch.randn(2, 8, 5, 5)
    expected = module(x).detach()
    with torch.inference_mode():
        y = module(x)
    assert not y.requires_grad and torch.equal(y, expected)
