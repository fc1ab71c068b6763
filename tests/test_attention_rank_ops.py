"""The attention ops at rank k (gate_channel [N, k, C], gate_spatial [N, k, H, W]):
attention_apply, attention_backward_reduce and attention_input_grad against a
pure-PyTorch float64 formula (einsum over the rank terms), in both memory orders
on the CPU, modes add and mul; rank 1 in its 2-D/3-D form and stacked as k = 1;
and the errors for bad k, mismatched ranks and wrong shapes."""
import pytest
import torch

from helpers import all_devices, relative_error

CL = torch.channels_last
# (N, C, H, W): small, odd, and one whose H*W spans two CPU reduction tiles (> 2048 positions).
SHAPES = [(2, 6, 4, 5), (3, 13, 7, 3), (1, 3, 50, 45)]
RANKS = [1, 2, 4]
# float64 must match the float64 formula to rounding; float32/float16 store the result in
# their own precision (the kernels accumulate in float32).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _operands(shape, k, dtype, device, seed=0):
    """x, g (dtype), stacked gates (accumulation dtype), descriptor-path gradients and an argmax."""
    n, c, h, w = shape
    generator = torch.Generator().manual_seed(seed)
    acc = _acc(dtype)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    g = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    gate_channel = (torch.rand(n, k, c, generator=generator, dtype=torch.float64) - 0.5).to(acc)
    gate_spatial = torch.rand(n, k, h, w, generator=generator, dtype=torch.float64).to(acc)
    grad_mean = torch.randn(n, c, generator=generator, dtype=torch.float64).to(acc)
    grad_spatial = torch.randn(n, 2, h, w, generator=generator, dtype=torch.float64).to(acc)
    argmax = torch.randint(0, c, (n, h, w), generator=generator, dtype=torch.int32)
    return [t.to(device) for t in (x, g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax)]


def _attention(gate_channel, gate_spatial):
    """sum_j gate_channel[n, j, c] * gate_spatial[n, j, h, w], float64."""
    return torch.einsum("njc,njhw->nchw", gate_channel.double(), gate_spatial.double())


def _expected_apply(x, gate_channel, gate_spatial, multiplicative):
    a = _attention(gate_channel, gate_spatial)
    x = x.double()
    return x * (1 + a) if multiplicative else x + a


def _expected_reduce(g, x, gate_channel, gate_spatial, multiplicative):
    t = g.double() * x.double() if multiplicative else g.double()
    channel_sum = torch.einsum("nchw,njhw->njc", t, gate_spatial.double())
    spatial_sum = torch.einsum("nchw,njc->njhw", t, gate_channel.double())
    return channel_sum, spatial_sum


def _expected_input_grad(g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax, multiplicative):
    n, c, h, w = g.shape
    scale = 1 + _attention(gate_channel, gate_spatial) if multiplicative else 1
    one_hot = torch.nn.functional.one_hot(argmax.long(), c).permute(0, 3, 1, 2).double()
    return (g.double() * scale + grad_mean.double()[:, :, None, None] / (h * w) +
            grad_spatial.double()[:, :1] / c + one_hot * grad_spatial.double()[:, 1:])


def _close(actual, expected, dtype):
    tolerance = TOLERANCE[dtype]
    if dtype == torch.float64:
        torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tolerance, atol=tolerance)
    else:
        assert relative_error(actual, expected) < tolerance


def _orders(device):
    """The memory orders the kernels of `device` take: the CUDA kernels read NCHW alone."""
    return ["nchw", "channels_last"] if device == "cpu" else ["nchw"]


def _in_order(t, order):
    return t.contiguous(memory_format=CL) if order == "channels_last" else t


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("multiplicative", [False, True], ids=["add", "mul"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=["float64", "float32", "float16"])
@pytest.mark.parametrize("k", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rank_ops_match_formula(shape, k, dtype, multiplicative, device):
    if shape == SHAPES[-1] and dtype != torch.float64:
        pytest.skip("the two-tile shape is covered in float64")
    x, g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax = _operands(shape, k, dtype, device)
    for order in _orders(device):
        xo, go = _in_order(x, order), _in_order(g, order)

        y = torch.ops.da2ext.attention_apply(xo, gate_channel, gate_spatial, multiplicative)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=CL if order == "channels_last" else torch.contiguous_format)
        _close(y, _expected_apply(x, gate_channel, gate_spatial, multiplicative), dtype)

        channel_sum, spatial_sum = torch.ops.da2ext.attention_backward_reduce(
            go, xo if multiplicative else None, gate_channel, gate_spatial, multiplicative)
        assert channel_sum.shape == gate_channel.shape and spatial_sum.shape == gate_spatial.shape
        assert channel_sum.dtype == _acc(dtype) and spatial_sum.dtype == _acc(dtype)
        expected_channel, expected_spatial = _expected_reduce(g, x, gate_channel, gate_spatial, multiplicative)
        _close(channel_sum, expected_channel, dtype)
        _close(spatial_sum, expected_spatial, dtype)

        grad_input = torch.ops.da2ext.attention_input_grad(go, gate_channel, gate_spatial, grad_mean, grad_spatial,
                                                           argmax, multiplicative)
        assert grad_input.dtype == dtype and grad_input.shape == x.shape
        _close(grad_input, _expected_input_grad(g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax,
                                                multiplicative), dtype)


@pytest.mark.parametrize("multiplicative", [False, True], ids=["add", "mul"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=["float64", "float32", "float16"])
@pytest.mark.parametrize("k", [2, 5])
def test_rank_elementwise_ops_same_bits_in_both_orders(k, dtype, multiplicative):
    """apply and input_grad sum the rank terms in the same order in NCHW and channels_last."""
    x, g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax = _operands((2, 9, 6, 5), k, dtype, "cpu")
    y = torch.ops.da2ext.attention_apply(x, gate_channel, gate_spatial, multiplicative)
    y_cl = torch.ops.da2ext.attention_apply(x.contiguous(memory_format=CL), gate_channel, gate_spatial,
                                            multiplicative)
    assert torch.equal(y_cl, y)
    gi = torch.ops.da2ext.attention_input_grad(g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax,
                                               multiplicative)
    gi_cl = torch.ops.da2ext.attention_input_grad(g.contiguous(memory_format=CL), gate_channel, gate_spatial,
                                                  grad_mean, grad_spatial, argmax, multiplicative)
    assert torch.equal(gi_cl, gi)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("multiplicative", [False, True], ids=["add", "mul"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=["float64", "float32", "float16"])
def test_rank_one_forms_agree(dtype, multiplicative, device):
    """Rank 1 given as [N, C] / [N, H, W] and stacked as [N, 1, C] / [N, 1, H, W]: the same bits;
    the reduction's outputs are shaped like the gates."""
    x, g, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax = _operands((2, 7, 5, 6), 1, dtype, device)
    flat_channel, flat_spatial = gate_channel[:, 0].contiguous(), gate_spatial[:, 0].contiguous()
    for order in _orders(device):
        xo, go = _in_order(x, order), _in_order(g, order)
        inp = xo if multiplicative else None
        assert torch.equal(torch.ops.da2ext.attention_apply(xo, gate_channel, gate_spatial, multiplicative),
                           torch.ops.da2ext.attention_apply(xo, flat_channel, flat_spatial, multiplicative))
        stacked = torch.ops.da2ext.attention_backward_reduce(go, inp, gate_channel, gate_spatial, multiplicative)
        flat = torch.ops.da2ext.attention_backward_reduce(go, inp, flat_channel, flat_spatial, multiplicative)
        assert stacked[0].shape == (2, 1, 7) and stacked[1].shape == (2, 1, 5, 6)
        assert flat[0].shape == (2, 7) and flat[1].shape == (2, 5, 6)
        assert torch.equal(stacked[0][:, 0], flat[0]) and torch.equal(stacked[1][:, 0], flat[1])
        descriptor = (grad_mean, grad_spatial, argmax, multiplicative)
        assert torch.equal(torch.ops.da2ext.attention_input_grad(go, gate_channel, gate_spatial, *descriptor),
                           torch.ops.da2ext.attention_input_grad(go, flat_channel, flat_spatial, *descriptor))


@pytest.mark.parametrize("order", ["nchw", "channels_last"])
@pytest.mark.parametrize("multiplicative", [False, True], ids=["add", "mul"])
def test_rank_reduction_independent_of_threads(multiplicative, order):
    """Fixed-order partial sums: the same bits on 1 thread as on several."""
    x, g, gate_channel, gate_spatial = _operands((2, 5, 60, 41), 3, torch.float32, "cpu")[:4]
    x, g = _in_order(x, order), _in_order(g, order)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.da2ext.attention_backward_reduce(g, x, gate_channel, gate_spatial, multiplicative)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.da2ext.attention_backward_reduce(g, x, gate_channel, gate_spatial, multiplicative)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def _call_all(x, gate_channel, gate_spatial, device):
    """Each op with these gates: (op name, thunk)."""
    n, c, h, w = x.shape
    acc = _acc(x.dtype)
    grad_mean = torch.zeros(n, c, dtype=acc, device=device)
    grad_spatial = torch.zeros(n, 2, h, w, dtype=acc, device=device)
    argmax = torch.zeros(n, h, w, dtype=torch.int32, device=device)
    return [
        ("attention_apply", lambda: torch.ops.da2ext.attention_apply(x, gate_channel, gate_spatial, True)),
        ("attention_backward_reduce",
         lambda: torch.ops.da2ext.attention_backward_reduce(x, x, gate_channel, gate_spatial, True)),
        ("attention_input_grad", lambda: torch.ops.da2ext.attention_input_grad(
            x, gate_channel, gate_spatial, grad_mean, grad_spatial, argmax, True)),
    ]


N, C, H, W = 2, 4, 3, 5


def _bad_gates(device):
    """(gate_channel, gate_spatial, message pattern) for each kind of bad rank-k gate."""
    def rand(*shape, dtype=torch.float32):
        return torch.rand(*shape, dtype=dtype, device=device)
    return [
        (rand(N, 0, C), rand(N, 0, H, W), r"gate_channel \[N, k, C\] must have a rank k between 1 and 16, got k = 0"),
        (rand(N, 17, C), rand(N, 17, H, W), r"rank k between 1 and 16, got k = 17"),
        (rand(N, 2, C), rand(N, 3, H, W), r"gate_spatial \[N, k, H, W\] must have the same rank k as gate_channel "
                                          r"\(k = 2\), got k = 3"),
        (rand(N, 2, C), rand(N, H, W), r"gate_channel is 3-D \(\[N, k, C\], rank k\), so gate_spatial must be 4-D"),
        (rand(N, C), rand(N, 2, H, W), r"gate_spatial is 4-D \(\[N, k, H, W\], rank k\), so gate_channel must be "
                                       r"3-D"),
        (rand(N, 2, C + 1), rand(N, 2, H, W), r"gate_channel must have shape \[N, k, C\]"),
        (rand(N + 1, 2, C), rand(N, 2, H, W), r"gate_channel must have shape \[N, k, C\]"),
        (rand(N, 2, C), rand(N, 2, W, H), r"gate_spatial must have shape \[N, k, H, W\] \[2, 2, 3, 5\]"),
        (rand(N, 2, C, dtype=torch.float64), rand(N, 2, H, W), r"gate_channel must be Float, got Double"),
        (rand(N, 2, C), rand(N, 2, H, W).transpose(2, 3).contiguous().transpose(2, 3),
         r"gate_spatial must be contiguous"),
    ]


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("case", range(10))
def test_rank_errors_name_op_and_argument(case, device):
    x = torch.randn(N, C, H, W, device=device)
    gate_channel, gate_spatial, pattern = _bad_gates(device)[case]
    for op, call in _call_all(x, gate_channel, gate_spatial, device):
        with pytest.raises(RuntimeError, match=op + ": .*" + pattern):
            call()


@pytest.mark.parametrize("device", all_devices()[1:])  # cuda: CPU gates with a CUDA feature map
def test_rank_gates_on_another_device(device):
    x = torch.randn(N, C, H, W, device=device)
    gate_channel = torch.rand(N, 2, C)
    gate_spatial = torch.rand(N, 2, H, W, device=device)
    for op, call in _call_all(x, gate_channel, gate_spatial, device):
        with pytest.raises(RuntimeError, match=op + ": gate_channel must be on " + device):
            call()
