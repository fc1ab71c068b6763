"""Forward + backward benchmark of the packed activation (ReLU / ReLU6 keeping one
bit per element for backward) against torch's own (pytest-benchmark).

    pytest benchmarks/test_packed_activation_benchmark.py --benchmark-only
    pytest benchmarks/test_packed_activation_benchmark.py --benchmark-only -k "cpu and relu6"

One timed call is what a frozen layer's activation does in a training step:
h = x * 1 (a temporary, as a conv's result is), y = act(h), y.backward(g). The
implementations, side by side in one benchmark group per (device, dtype,
activation, shape):

    packed          da2ext.packed_activation(h, upper): a new output and the mask
    packed_inplace  the same with inplace=True (how the lean backbone calls it)
    torch           torch.relu / F.relu6 (keeps its output for backward)
    torch_inplace   torch.relu_ / F.relu6(inplace=True)

Shapes: ResNet-50's stem output and first-stage block output at batch 8.
extra_info: saved_bytes (what autograd keeps for backward, an untimed call),
input_bytes, saved_fraction, device_name, backend. Rounds and threads: the
environment variables of bench_settings.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import da2ext
from bench_settings import DEVICE_DTYPES, device_name, pedantic_settings, shape_id

SHAPES = [(8, 64, 112, 112), (8, 256, 56, 56)]
ACTIVATIONS = {"relu": float("inf"), "relu6": 6.0}


def _torch_activation(upper, inplace):
    if math.isinf(upper):
        return torch.relu_ if inplace else torch.relu
    return lambda t: F.relu6(t, inplace=inplace)


IMPLEMENTATIONS = {
    "packed": lambda upper: (lambda t: da2ext.packed_activation(t, upper)),
    "packed_inplace": lambda upper: (lambda t: da2ext.packed_activation(t, upper, inplace=True)),
    "torch": lambda upper: _torch_activation(upper, False),
    "torch_inplace": lambda upper: _torch_activation(upper, True),
}


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_packed_activation_forward_backward(benchmark, implementation, activation, shape, device, dtype):
    packed = implementation.startswith("packed")
    if packed and da2ext.backend(device) != device:
        pytest.skip("no kernels for {} (da2ext.backend({!r}) == {!r}): the packed activation would run "
                    "torch's".format(device, device, da2ext.backend(device)))
    act = IMPLEMENTATIONS[implementation](ACTIVATIONS[activation])
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=torch_dtype).requires_grad_()
    g = torch.randn(shape, generator=generator).to(device=device, dtype=torch_dtype)
    cuda = device == "cuda"

    def step():
        x.grad = None
        act(x * 1).backward(g)
        if cuda:
            torch.cuda.synchronize()

    # Untimed: what autograd keeps for the activation (x * 1 keeps nothing: a scalar product).
    with da2ext.SavedTensorCounter() as counter:
        act(x * 1)
    info = benchmark.extra_info
    info.update(implementation=implementation, activation=activation, device=device, dtype=dtype,
                shape=list(shape), device_name=device_name(device), torch_version=torch.__version__,
                torch_threads=torch.get_num_threads(), saved_bytes=counter.saved_bytes,
                input_bytes=x.numel() * x.element_size(),
                backend=da2ext.backend(device) if packed else "torch")
    info["saved_fraction"] = info["saved_bytes"] / float(info["input_bytes"])
    benchmark.group = "{}-{}-{}-{}".format(device, dtype, activation, shape_id(shape))
    benchmark.pedantic(step, **pedantic_settings(device))
    expected_saved = 4 * math.ceil(x.numel() / 32.0) if packed else x.numel() * x.element_size()
    assert counter.saved_bytes == expected_saved
