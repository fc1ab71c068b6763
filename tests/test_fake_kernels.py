"""Every torch.ops.da2ext op passes torch.library.opcheck - its schema, autograd
registration, fake kernel (shapes, dtypes, strides) and AOTAutograd with dynamic
shapes - on several shapes, both memory orders and every device with kernels:
what torch.compile and torch.export need to trace the ops (da2ext/ops/fake_kernels.py)."""
import types

import pytest
import torch

import da2ext
from da2ext.ops import fake_kernels
from da2ext.ops._extension import FAKE_KERNELS
from helpers import kernel_devices

pytestmark = [
    pytest.mark.skipif(da2ext.backend("cpu") != "cpu", reason="needs the compiled extension (da2ext._C)"),
    pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4"),
]

# (N, C, H, W): odd sizes; C == 1 and H == W == 1, where NCHW and channels_last are one order
SHAPES = [(2, 8, 5, 5), (3, 5, 4, 7), (2, 1, 3, 3), (2, 6, 1, 1)]
ORDERS = ["contiguous", "channels_last"]
DTYPES = [torch.float32, torch.float64, torch.float16]


def feature(shape, order, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if order == "channels_last" else x


def accumulate(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def gates(shape, dtype, device, rank):
    n, c, h, w = shape
    acc = accumulate(dtype)
    if rank == 1:
        return torch.rand(n, c, dtype=acc, device=device), torch.rand(n, h, w, dtype=acc, device=device)
    return torch.rand(n, rank, c, dtype=acc, device=device), torch.rand(n, rank, h, w, dtype=acc, device=device)


def opcheck(op, args):
    """All of opcheck's default tests; a failure names the test and the arguments' layout."""
    results = torch.library.opcheck(op, args, raise_exception=False)
    failed = {test: result for test, result in results.items() if result != "SUCCESS"}
    layout = [(tuple(a.shape), a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in args]
    assert not failed, "{} failed {} for {}".format(op, failed, layout)
    assert set(results) >= {"test_schema", "test_autograd_registration", "test_faketensor",
                            "test_aot_dispatch_dynamic"}


def cases():
    """(device, shape, order, dtype) for every device; CUDA's skipped without a GPU."""
    for device in ("cpu", "cuda"):
        marks = () if device in kernel_devices() else pytest.mark.skipif(
            True, reason="needs a CUDA GPU and a CUDA build of da2ext")
        for shape in SHAPES:
            for order in ORDERS:
                for dtype in DTYPES:
                    yield pytest.param(device, shape, order, dtype, marks=marks, id="{}-{}-{}-{}".format(
                        device, "x".join(map(str, shape)), order, str(dtype).replace("torch.", "")))


def skip_unsupported(device, order):
    if device == "cuda" and order == "channels_last":
        pytest.skip("the CUDA kernels take NCHW feature maps (a channels_last map is made NCHW by the caller)")


@pytest.mark.parametrize("device,shape,order,dtype", list(cases()))
@pytest.mark.parametrize("rank", [1, 3])
def test_residual_attention_ops(device, shape, order, dtype, rank):
    skip_unsupported(device, order)
    ops = torch.ops.da2ext
    x = feature(shape, order, dtype, device)
    grad = feature(shape, order, dtype, device, seed=1)
    gate_channel, gate_spatial = gates(shape, dtype, device, rank)
    n, c, h, w = shape
    acc = accumulate(dtype)
    if rank == 1:
        opcheck(ops.descriptor_pool.default, (x,))
    for multiplicative in (False, True):
        opcheck(ops.attention_apply.default, (x, gate_channel, gate_spatial, multiplicative))
        opcheck(ops.attention_backward_reduce.default,
                (grad, x if multiplicative else None, gate_channel, gate_spatial, multiplicative))
        opcheck(ops.attention_input_grad.default,
                (grad, gate_channel, gate_spatial, torch.randn(n, c, dtype=acc, device=device),
                 torch.randn(n, 2, h, w, dtype=acc, device=device),
                 torch.randint(c, (n, h, w), dtype=torch.int32, device=device), multiplicative))


def branch_parameters(channels, rank, dtype, device, seed=2):
    """fc1 (hidden 4), fc2, a 3x3 spatial conv and gamma of a rank-k adaptor, as the adaptor ops take them."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, channels), (4,), (rank * channels, 4), (rank * channels,), (rank, 2, 3, 3), (rank,),
              (channels,) if rank == 1 else (rank, channels)]
    return [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("device,shape,order,dtype", [c for c in cases() if c.values[0] == "cpu"])
@pytest.mark.parametrize("rank", [1, 3])
def test_adaptor_forward_and_backward_ops(device, shape, order, dtype, rank):
    # residual_attention_forward / _backward: registered for the CPU (csrc/ops/residual_attention_composite.cpp)
    if not fake_kernels.has_op("residual_attention_forward"):
        pytest.skip("the adaptor's forward and backward ops need an extension built against torch >= 1.11")
    ops = torch.ops.da2ext
    x = feature(shape, order, dtype, device)
    grad = feature(shape, order, dtype, device, seed=1)
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma = params = branch_parameters(
        shape[1], rank, dtype, device)
    for multiplicative in (False, True):
        opcheck(ops.residual_attention_forward.default, tuple([x] + params + [multiplicative]))
        _, channel_mean, spatial, argmax, hidden_pre, channel_logits = ops.residual_attention_forward(
            x, *params, multiplicative)
        for needs_input_grad in (True, False):
            opcheck(ops.residual_attention_backward.default,
                    (grad, x if multiplicative else None, channel_mean, spatial, argmax, hidden_pre, channel_logits,
                     gamma, fc1_weight, fc2_weight, spatial_weight, spatial_bias, multiplicative, needs_input_grad))


@pytest.mark.parametrize("device,shape,order,dtype", [c for c in cases() if c.values[0] == "cpu"])
@pytest.mark.parametrize("rank", [1, 3])
def test_one_op_adaptor(device, shape, order, dtype, rank):
    # residual_attention, with its autograd node in C++ (csrc/ops/residual_attention_autograd.cpp): opcheck
    # traces its forward and backward through AOTAutograd too (test_aot_dispatch_dynamic)
    if not fake_kernels.has_op("residual_attention"):
        pytest.skip("the one-op adaptor needs an extension built against torch >= 1.11")
    x = feature(shape, order, dtype, device).requires_grad_()
    params = [p.requires_grad_() for p in branch_parameters(shape[1], rank, dtype, device)]
    for multiplicative, saved_input_dtype in ((False, None), (True, None), (True, torch.float16)):
        opcheck(torch.ops.da2ext.residual_attention.default, tuple([x] + params + [multiplicative, saved_input_dtype]))


@pytest.mark.parametrize("device,shape,order,dtype", list(cases()))
def test_packed_activation_ops(device, shape, order, dtype):
    skip_unsupported(device, order)
    ops = torch.ops.da2ext
    x = feature(shape, order, dtype, device)
    grad = feature(shape, order, dtype, device, seed=1)
    for upper in (float("inf"), 6.0):
        opcheck(ops.packed_activation.default, (x, upper))
        opcheck(ops.packed_activation_.default, (x.clone(), upper))
    _, mask = ops.packed_activation(x, 6.0)
    opcheck(ops.packed_activation_backward.default, (grad, mask))
    if device == "cpu":  # CPU-only fused kernels (on CUDA the callers run the composite)
        opcheck(ops.packed_activation_backward_channel_sums.default, (grad, mask))
        if order == "contiguous":  # the bias op takes NCHW
            bias = torch.randn(shape[1], dtype=dtype)
            opcheck(ops.packed_bias_activation_.default, (x.clone(), bias, None, float("inf")))
            opcheck(ops.packed_bias_activation_.default, (x.clone(), bias, grad, 6.0))


def test_every_op_of_the_library_has_a_fake_kernel():
    defined = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                     if name.startswith("da2ext::"))
    assert defined, "no da2ext ops are registered"
    assert sorted(FAKE_KERNELS) == defined


def test_packed_activation_backward_channel_sums_fake_matches_on_1d_and_5d():
    # The ops take any tensor of at least 2 dims (the activation's also 1-D): the
    # fake must keep such a tensor contiguous, as the kernels do.
    for shape in [(4, 3), (2, 3, 2, 2, 2)]:
        x = torch.randn(shape)
        opcheck(torch.ops.da2ext.packed_activation.default, (x, 6.0))
        _, mask = torch.ops.da2ext.packed_activation(x, 6.0)
        opcheck(torch.ops.da2ext.packed_activation_backward_channel_sums.default, (torch.randn(shape), mask))
    opcheck(torch.ops.da2ext.packed_activation.default, (torch.randn(37), float("inf")))


def test_nothing_is_registered_where_torch_cannot_trace_custom_ops(monkeypatch):
    # The Jetson's torch 1.10 has neither register_fake nor impl_abstract.
    monkeypatch.setattr(torch, "library", types.SimpleNamespace())
    assert fake_kernels.register_fake_kernels() == ()
