"""Bad input gets a clear error naming the argument, or a correct result; never a crash."""
import pytest
import torch

import da2ext
from helpers import adaptor_pair, all_devices, kernel_devices, relative_error


@pytest.fixture
def adaptor():
    fused, _ = adaptor_pair(8)
    return fused


def test_wrong_rank(adaptor):
    with pytest.raises(ValueError, match=r"4-D tensor \(N, C, H, W\), got 3-D"):
        adaptor(torch.randn(8, 4, 4))


def test_wrong_channels(adaptor):
    with pytest.raises(ValueError, match="must have 8 channels"):
        adaptor(torch.randn(2, 7, 4, 4))


def test_empty_spatial_size(adaptor):
    with pytest.raises(ValueError, match="non-empty spatial size"):
        adaptor(torch.randn(2, 8, 0, 4))


def test_dtype_mismatch_with_parameters(adaptor):
    with pytest.raises(TypeError, match=r"input dtype torch.float64 does not match .*torch.float32"):
        adaptor(torch.randn(2, 8, 4, 4, dtype=torch.float64))


def test_integer_input(adaptor):
    with pytest.raises(TypeError, match="floating-point"):
        adaptor(torch.ones(2, 8, 4, 4, dtype=torch.int64))


def test_not_a_tensor(adaptor):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        adaptor([[1.0]])


def test_device_mismatch(adaptor):
    # the meta device stands in for "another device" on machines without a GPU
    with pytest.raises(ValueError, match="input is on meta but the adaptor's parameters are on cpu"):
        adaptor(torch.empty(2, 8, 4, 4, device="meta"))


@pytest.mark.skipif("cuda" not in kernel_devices(), reason="needs a CUDA GPU")
def test_cpu_input_cuda_adaptor(adaptor):
    with pytest.raises(ValueError, match="input is on cpu but the adaptor's parameters are on cuda"):
        adaptor.cuda()(torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=0), "channels must be a positive integer"),
    (dict(channels=8, reduction=0), "reduction must be a positive integer"),
    (dict(channels=8, spatial_kernel=4), "spatial_kernel must be a positive odd integer"),
    (dict(channels=8, mode="sum"), "mode must be one of"),
    (dict(channels=8, mode="add", saved_input_dtype=torch.float16), 'only applies to mode "mul"'),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        da2ext.ResidualAttentionAdaptor(**kwargs)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_strided_input_gives_correct_result(layout, mode, device):
    fused, reference = adaptor_pair(8, mode=mode)
    fused.double().to(device)
    reference.double().to(device)
    base = torch.randn(2, 8, 6, 10, dtype=torch.float64, device=device)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(2, 3)
    else:
        x = base[:, :, :, ::2]
    assert not x.is_contiguous()
    x = x.requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64, device=device)
    y = fused(x)
    y.backward(g)
    grad = x.grad
    x.grad = None
    y_ref = reference(x)
    y_ref.backward(g)
    assert relative_error(y, y_ref) < 1e-12
    assert relative_error(grad, x.grad) < 1e-12


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("mode", ["add", "mul"])
def test_empty_batch(mode, device):
    fused, _ = adaptor_pair(8, mode=mode)
    fused.to(device)
    x = torch.randn(0, 8, 5, 5, device=device, requires_grad=True)
    y = fused(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in fused.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("device", all_devices())
def test_op_level_errors_name_the_argument(device):
    x = torch.randn(2, 4, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="descriptor_pool: input must be contiguous in NCHW"):
        torch.ops.da2ext.descriptor_pool(x.transpose(2, 3))
    channels_last = x.contiguous(memory_format=torch.channels_last)
    if device == "cuda":  # the CUDA kernels read NCHW alone
        with pytest.raises(RuntimeError, match="input must be contiguous in NCHW order on cuda"):
            torch.ops.da2ext.descriptor_pool(channels_last)
    else:  # the CPU kernels read channels_last too, and the big operands must agree
        gate_c, gate_s = torch.rand(2, 4), torch.rand(2, 3, 3)
        with pytest.raises(RuntimeError, match=r"input must be contiguous in the same memory order as the feature "
                                               r"map \(channels_last\)"):
            torch.ops.da2ext.attention_backward_reduce(channels_last, x, gate_c, gate_s, True)
    with pytest.raises(RuntimeError, match="input must be a 4-D tensor"):
        torch.ops.da2ext.descriptor_pool(x[0])
    with pytest.raises(RuntimeError, match="must be float16, float32 or float64"):
        torch.ops.da2ext.descriptor_pool(x.int())
    gate_c, gate_s = torch.rand(2, 4, device=device), torch.rand(2, 3, 3, device=device)
    with pytest.raises(RuntimeError, match=r"gate_channel must have shape \[N, C\]"):
        torch.ops.da2ext.attention_apply(x, gate_c[:, :3].contiguous(), gate_s, False)
    with pytest.raises(RuntimeError, match="gate_spatial must be Float"):
        torch.ops.da2ext.attention_apply(x, gate_c, gate_s.double(), False)
    with pytest.raises(RuntimeError, match='input is required in mode "mul"'):
        torch.ops.da2ext.attention_backward_reduce(x, None, gate_c, gate_s, True)
    with pytest.raises(RuntimeError, match="argmax must be Int"):
        torch.ops.da2ext.attention_input_grad(x, gate_c, gate_s, torch.zeros(2, 4, device=device),
                                              torch.zeros(2, 2, 3, 3, device=device),
                                              torch.zeros(2, 3, 3, dtype=torch.int64, device=device), False)


def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(_available_memory_bytes() < 14 * 2 ** 30, reason="needs about 13 GiB of free memory")
def test_past_32_bit_indexing_cpu():
    """2^31 + 65536 float16 elements: every offset past 2^31 is reached and right."""
    N, C, H, W = 1, 2, 32768, 32769
    assert N * C * H * W > 2 ** 31
    x = torch.empty(N, C, H, W, dtype=torch.float16)
    x[0, 0].fill_(1.0)
    x[0, 1].fill_(2.0)
    x[0, 0, -1, -1] = 3.0  # the last position's max sits in channel 0, past 2^31 elements in
    channel_mean, spatial, argmax = torch.ops.da2ext.descriptor_pool(x)
    assert abs(channel_mean[0, 1].item() - 2.0) < 1e-3
    assert spatial[0, 1, -1, -1].item() == 3.0 and argmax[0, -1, -1].item() == 0
    assert spatial[0, 1, -1, -2].item() == 2.0 and argmax[0, -1, -2].item() == 1
    del channel_mean, spatial, argmax
    gate_channel = torch.tensor([[0.5, 0.25]])
    gate_spatial = torch.full((N, H, W), 2.0)
    gate_spatial[0, -1, -1] = 4.0
    y = torch.ops.da2ext.attention_apply(x, gate_channel, gate_spatial, False)
    assert y[0, 1, -1, -1].item() == 3.0 and y[0, 1, -1, -2].item() == 2.5 and y[0, 0, -1, -1].item() == 5.0
