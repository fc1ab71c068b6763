"""The lean backbone's channels_last path on the CPU (da2ext/ops/memory_order.py): every op and
module gives what it gives in NCHW, keeps the channels_last memory order, and
keeps the same bytes for backward."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import da2ext
from helpers import (FAMILY_NAMES, adapt_quietly, adaptor_pair, all_devices, make_original, python_mask,
                     randomize_common_trainable, relative_error, special_values)
from da2ext.lean.adapt import AdaptedBlock
from da2ext.ops.conv_passes import conv2d_forward, conv2d_input_grad
from da2ext.lean.frozen_conv import FrozenConvBNAct
from da2ext.lean.lean_max_pool import LeanMaxPool2d

CL = torch.channels_last
# (N, C, H, W): odd sizes; C = 1 and H = W = 1 are both NCHW and channels_last at once.
SHAPES = [(2, 16, 5, 7), (3, 40, 9, 4), (2, 1, 4, 6), (3, 24, 1, 1), (1, 8, 33, 2)]


def _with_ties(shape, dtype, seed):
    """Random values rounded to halves, so that the channel max has ties (argmax: first)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).round().div(2).to(dtype)


def _gates(n, c, h, w, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.rand(n, c, generator=generator, dtype=acc) - 0.5,
            torch.rand(n, h, w, generator=generator, dtype=acc))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_adaptor_ops_match_nchw(shape, dtype):
    n, c, h, w = shape
    x = _with_ties(shape, dtype, seed=0)
    if x.numel() > 4:
        x.view(-1)[3] = float("nan")  # the first NaN of a position is its max
    x_cl = x.contiguous(memory_format=CL)
    assert x_cl.is_contiguous(memory_format=CL)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]

    mean, spatial, argmax = torch.ops.da2ext.descriptor_pool(x)
    mean_cl, spatial_cl, argmax_cl = torch.ops.da2ext.descriptor_pool(x_cl)
    assert torch.equal(argmax_cl, argmax)
    torch.testing.assert_close(spatial_cl[:, 1], spatial[:, 1], rtol=0, atol=0, equal_nan=True)  # the max is exact
    for a, b in ((mean_cl, mean), (spatial_cl[:, 0], spatial[:, 0])):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.allclose(a.double(), b.double(), rtol=tolerance, atol=tolerance, equal_nan=True)

    x, x_cl = x.nan_to_num(), x_cl.nan_to_num()
    gate_channel, gate_spatial = _gates(n, c, h, w, dtype)
    g = _with_ties(shape, dtype, seed=2)
    g_cl = g.contiguous(memory_format=CL)
    for multiplicative in (False, True):
        y = torch.ops.da2ext.attention_apply(x, gate_channel, gate_spatial, multiplicative)
        y_cl = torch.ops.da2ext.attention_apply(x_cl, gate_channel, gate_spatial, multiplicative)
        assert y_cl.is_contiguous(memory_format=CL) and torch.equal(y_cl, y)  # elementwise: same arithmetic

        sums = torch.ops.da2ext.attention_backward_reduce(g, x, gate_channel, gate_spatial, multiplicative)
        sums_cl = torch.ops.da2ext.attention_backward_reduce(g_cl, x_cl, gate_channel, gate_spatial, multiplicative)
        for a, b in zip(sums_cl, sums):
            assert relative_error(a, b) < tolerance

        acc = gate_channel.dtype
        grad_mean = torch.randn(n, c, dtype=acc, generator=torch.Generator().manual_seed(3))
        grad_spatial = torch.randn(n, 2, h, w, dtype=acc, generator=torch.Generator().manual_seed(4))
        gi = torch.ops.da2ext.attention_input_grad(g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax,
                                                   multiplicative)
        gi_cl = torch.ops.da2ext.attention_input_grad(g_cl, gate_channel, gate_spatial, grad_mean, grad_spatial,
                                                      argmax, multiplicative)
        assert gi_cl.is_contiguous(memory_format=CL) and torch.equal(gi_cl, gi)


@pytest.mark.parametrize("channels", [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 64])
def test_channel_max_keeps_the_first_max_and_the_first_nan(channels):
    """The channels_last max is found in any order, then its channel by a blocked
    scan; the answer must be the NCHW loop's: the first of equal maxima (+0 and -0
    tie, the value kept is that channel's), the first NaN."""
    generator = torch.Generator().manual_seed(channels)
    x = torch.randint(-2, 3, (4, channels, 6, 5), generator=generator).double()  # many ties
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=generator)[:flat.numel() // 10]] = float("nan")
    flat[torch.randperm(flat.numel(), generator=generator)[:flat.numel() // 5]] = -0.0
    _, spatial, argmax = torch.ops.da2ext.descriptor_pool(x)
    _, spatial_cl, argmax_cl = torch.ops.da2ext.descriptor_pool(x.contiguous(memory_format=CL))
    assert torch.equal(argmax_cl, argmax)
    torch.testing.assert_close(spatial_cl[:, 1], spatial[:, 1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(spatial_cl[:, 1]), torch.signbit(spatial[:, 1]))


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_adaptor_gradcheck_in_channels_last(mode):
    fused, _ = adaptor_pair(16, mode=mode)
    fused.double()
    params = list(fused.branch_parameters()) + [fused.gamma]
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()

    def run(x, *params):
        assert x.is_contiguous(memory_format=CL)
        y = da2ext.ops.residual_attention(x, *params, mode=mode)
        assert y.is_contiguous(memory_format=CL)
        return y

    assert torch.autograd.gradcheck(run, (x,) + tuple(params))


@pytest.mark.parametrize("upper", [float("inf"), 6.0])
def test_packed_activation_keeps_channels_last_and_masks_in_memory_order(upper):
    x = special_values((2, 8, 5, 7), "cpu", torch.float32, seed=4, nan=False).contiguous(memory_format=CL)
    grad = torch.randn(x.shape)
    for inplace in (False, True):
        xi = x.clone().requires_grad_()
        with da2ext.SavedTensorCounter() as counter:
            y = da2ext.packed_activation(xi * 1.0, upper, inplace=inplace)
        assert counter.saved_bytes == 4 * ((x.numel() + 31) // 32)
        assert y.is_contiguous(memory_format=CL)
        expected = torch.relu(x) if upper == float("inf") else F.relu6(x)
        assert torch.equal(y, expected)
        y.backward(grad)
        reference = x.detach().clone().requires_grad_()
        (torch.relu(reference) if upper == float("inf") else F.relu6(reference)).backward(grad)
        assert xi.grad.is_contiguous(memory_format=CL) and torch.equal(xi.grad, reference.grad)
    # the mask's bits follow memory order: that of the (N, H, W, C) view
    _, mask = torch.ops.da2ext.packed_activation(x.permute(0, 2, 3, 1), upper)
    assert torch.equal(mask, python_mask(x.permute(0, 2, 3, 1), upper))


def _random_conv_bn(conv):
    bn = nn.BatchNorm2d(conv.out_channels).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


CONVS = [
    dict(in_channels=16, out_channels=32, kernel_size=1),  # a GEMM in NCHW
    dict(in_channels=16, out_channels=24, kernel_size=1, stride=2),  # strided 1x1: GEMM at the read pixels
    dict(in_channels=16, out_channels=16, kernel_size=3, padding=1),
    dict(in_channels=16, out_channels=16, kernel_size=3, stride=2, padding=1, groups=16),  # depthwise
]


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU6(), None], ids=["relu", "relu6", "none"])
@pytest.mark.parametrize("conv_args", CONVS, ids=["1x1", "1x1_stride2", "3x3", "depthwise_stride2"])
def test_frozen_conv_channels_last_matches_nchw(conv_args, activation):
    torch.manual_seed(0)
    conv = nn.Conv2d(bias=False, **conv_args).double()
    layer = FrozenConvBNAct.fold(conv, _random_conv_bn(conv).double(), activation, dtype=torch.float64)
    x = torch.randn(2, 16, 12, 10, dtype=torch.float64)
    results = []
    for memory_format in (torch.contiguous_format, CL):
        layer.zero_grad()
        xi = x.clone(memory_format=memory_format).requires_grad_()
        with da2ext.SavedTensorCounter() as counter:
            y = layer(xi)
        assert y.is_contiguous(memory_format=memory_format)
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y.backward(g)
        assert xi.grad.is_contiguous(memory_format=memory_format)
        results.append((y.detach(), xi.grad, layer.shift.grad.clone(), counter.saved_bytes))
    (y, gx, gs, saved), (y_cl, gx_cl, gs_cl, saved_cl) = results
    assert relative_error(y_cl, y) < 1e-12
    assert relative_error(gx_cl, gx) < 1e-12
    assert relative_error(gs_cl, gs) < 1e-12
    assert saved_cl == saved


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "autograd"])
def test_frozen_weight_follows_the_input_order(requires_grad):
    """A k x k folded weight is held channels_last while channels_last CPU inputs come
    (oneDNN would reorder it in every pass), and contiguous again for an NCHW input,
    whose result then stays NCHW."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False).double()
    layer = FrozenConvBNAct.fold(conv, _random_conv_bn(conv).double(), nn.ReLU(), dtype=torch.float64)
    x = torch.randn(2, 16, 12, 10, dtype=torch.float64)
    expected = layer(x).detach()
    for memory_format in (CL, torch.contiguous_format, CL):
        y = layer(x.contiguous(memory_format=memory_format).requires_grad_(requires_grad))
        assert y.is_contiguous(memory_format=memory_format)
        assert layer.weight.is_contiguous(memory_format=memory_format)
        assert relative_error(y.detach(), expected) < 1e-12
    # An input in both orders (1 x 1 maps) takes the weight as it is: no conversion
    # inside a forward, where a counter would see the converted copy as kept.
    layer(torch.randn(2, 16, 1, 1, dtype=torch.float64).requires_grad_(requires_grad))
    assert layer.weight.is_contiguous(memory_format=CL) and not layer.weight.is_contiguous()


@pytest.mark.parametrize("cpu_channels_last", [True, False])
def test_adapt_holds_frozen_weights_in_the_cpu_order(cpu_channels_last):
    """adapt() stores the k x k frozen weights channels_last up front (so no forward
    converts them, and no converted copy is counted as kept for backward)."""
    original, _ = make_original("mobilenet_v2")
    model = adapt_quietly(original, 10, cpu_channels_last=cpu_channels_last)
    layers = [m for m in model.modules() if isinstance(m, FrozenConvBNAct) and m.weight.shape[-1] > 1]
    assert layers
    memory_format = CL if cpu_channels_last else torch.contiguous_format
    assert all(m.weight.is_contiguous(memory_format=memory_format) for m in layers)


def test_timm_same_padding_keeps_channels_last():
    pytest.importorskip("timm")
    from timm.layers import create_conv2d
    torch.manual_seed(0)
    conv = create_conv2d(8, 8, 3, stride=2, padding="same").double()
    assert type(conv).__name__ == "Conv2dSame"
    layer = FrozenConvBNAct.fold(conv, _random_conv_bn(conv).double(), nn.ReLU6(), dtype=torch.float64)
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    y = layer(x.contiguous(memory_format=CL).requires_grad_())
    assert y.is_contiguous(memory_format=CL)
    assert relative_error(y, layer(x)) < 1e-12  # the NCHW run


def test_lean_max_pool_channels_last_gradient():
    ref = nn.MaxPool2d(3, 2, 1)
    lean = LeanMaxPool2d.from_module(ref)
    x = _with_ties((2, 5, 9, 11), torch.float64, seed=0).contiguous(memory_format=CL).requires_grad_()
    g = torch.randn(ref(x).shape, dtype=torch.float64)
    y = lean(x)
    y.backward(g)
    assert y.is_contiguous(memory_format=CL) and x.grad.is_contiguous(memory_format=CL)
    lean_grad, x.grad = x.grad, None
    ref(x).backward(g)
    assert torch.equal(lean_grad, x.grad)


def test_strided_pointwise_input_grad_in_channels_last():
    w = torch.randn(24, 16, 1, 1, dtype=torch.float64)
    x = torch.randn(2, 16, 9, 8, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    y = F.conv2d(x, w, None, 2)
    g = torch.randn(y.shape, dtype=torch.float64).contiguous(memory_format=CL)
    expected, = torch.autograd.grad(y, x, g)
    got = conv2d_input_grad(g, x.shape, w, (2, 2), (0, 0), (1, 1), 1)
    assert got.is_contiguous(memory_format=CL) and relative_error(got, expected) < 1e-14
    assert torch.equal(conv2d_forward(x, w, None, (2, 2), (0, 0), (1, 1), 1), y)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapted_model_same_in_both_orders(family):
    """adapt(cpu_channels_last=True), the default, against False: the same outputs,
    gradients and bytes kept; every block's output channels_last."""
    original, shape = make_original(family, dtype=torch.float64)
    fast = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float64).double()
    nchw = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float64, cpu_channels_last=False).double()
    randomize_common_trainable(fast, nchw)
    nchw.load_state_dict(fast.state_dict())
    orders = []
    for block in fast.modules():
        if isinstance(block, AdaptedBlock):
            block.register_forward_hook(lambda m, i, o: orders.append(o.is_contiguous(memory_format=CL)))
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for model in (fast, nchw):
        model.eval()  # no dropout in the head
        xi = x.clone().requires_grad_()
        with da2ext.SavedTensorCounter() as counter:
            y = model(xi)
        y.backward(torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
        grads = dict((name, p.grad) for name, p in model.named_parameters() if p.requires_grad)
        results.append((y, xi.grad, grads, counter.saved_bytes))
    assert orders and all(orders)
    (y, gx, grads, saved), (y_ref, gx_ref, grads_ref, saved_ref) = results
    assert relative_error(y, y_ref) < 1e-10
    assert relative_error(gx, gx_ref) < 1e-10
    assert sorted(grads) == sorted(grads_ref)
    for name in grads:
        assert relative_error(grads[name], grads_ref[name]) < 1e-10, name
    assert saved == saved_ref


def test_cpu_channels_last_must_be_a_bool():
    original, _ = make_original("resnet18")
    with pytest.raises(TypeError, match="cpu_channels_last must be True or False"):
        da2ext.adapt(original, 10, cpu_channels_last="yes")


@pytest.mark.parametrize("device", [d for d in all_devices() if d != "cpu"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cuda_model_takes_a_channels_last_batch(family, device):
    """The CUDA adaptor kernels take NCHW only; the model's pre-hook makes a
    channels_last CUDA batch NCHW, so it gives what the NCHW batch gives."""
    original, shape = make_original(family)
    model = adapt_quietly(copy.deepcopy(original), 10).to(device).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(device)
    results = []
    for batch in (x, x.contiguous(memory_format=CL)):
        xi = batch.clone().requires_grad_()
        y = model(xi)
        y.sum().backward()
        results.append((y, xi.grad))
    assert relative_error(results[1][0], results[0][0]) < 1e-5
    assert relative_error(results[1][1], results[0][1]) < 1e-5
