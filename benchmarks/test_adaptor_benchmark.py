"""Forward + backward benchmark of the fused residual attention adaptor against
the eager pure-PyTorch reference (pytest-benchmark).

    pytest benchmarks/ --benchmark-only                      # everything this machine can run
    pytest benchmarks/ --benchmark-only -k cpu               # one device
    DA2EXT_BENCH_ROUNDS=20 pytest benchmarks/ --benchmark-only
    python benchmarks/adaptor_table.py                       # runs this and writes benchmarks/results/

One timed call is a training step of one adaptor: y = m(x); y.backward(g), with
x requiring grad (so dF is computed, as for an adaptor behind another one) and
all adaptor parameters requiring grad. Shapes are the outputs of ResNet-50's
four stages at batch 8. Both implementations of one (device, dtype, mode,
shape) share a benchmark group, so pytest-benchmark prints them side by side.

extra_info of every benchmark:
    saved_bytes     bytes autograd keeps for backward (da2ext.saved_bytes, an untimed call)
    input_bytes     bytes of F (the adaptor's input)
    saved_fraction  saved_bytes / input_bytes
    param_bytes     bytes of the adaptor's parameters (saved_bytes includes those autograd saves)
    device_name     GPU name, or the CPU model
    backend         which code ran: "cpu" / "cuda" kernels, or "reference"
    model_bytes, achieved_gbps (CUDA only): see TRAFFIC_MODEL below.

Rounds and threads: the environment variables of bench_settings.py.
"""
import pytest
import torch
from torch import nn

import da2ext
from bench_settings import DEVICE_DTYPES, device_name, pedantic_settings, shape_id, training_step
from da2ext import reference

# ResNet-50 stage outputs (conv2_x .. conv5_x) at batch 8.
SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]
MODES = ["add", "mul"]
IMPLEMENTATIONS = ["fused", "reference"]

# Minimal DRAM traffic of the fused forward + backward, in units of F's bytes
# (the small branch - MLP, 2->1 conv, descriptors of O(N*(C+H*W)) numbers - is ignored):
#   forward:  descriptor_pool reads F (1), attention_apply reads F and writes y (2)
#   backward: attention_backward_reduce reads g (1), attention_input_grad reads g and writes dF (2)
#   add: 1 + 2 + 1 + 2 = 6 x F bytes
#   mul: the backward reduce also reads the kept F (+1) = 7 x F bytes
# achieved_gbps = TRAFFIC_MODEL[mode] * input_bytes / median time. The same number is
# recorded for the reference as an "effective" bandwidth (it moves far more than this).
TRAFFIC_MODEL = {"add": 6, "mul": 7}

def make_modules(channels, mode, device, dtype):
    """The fused and the reference adaptor with one random state_dict (gamma != 0)."""
    torch.manual_seed(0)
    ref = reference.ResidualAttentionAdaptor(channels, mode=mode)
    nn.init.normal_(ref.gamma, std=0.1)
    fused = da2ext.ResidualAttentionAdaptor(channels, mode=mode)
    fused.load_state_dict(ref.state_dict())
    return fused.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_adaptor_forward_backward(benchmark, implementation, mode, shape, device, dtype):
    if implementation == "fused" and da2ext.backend(device) != device:
        pytest.skip("no fused kernels for {} (da2ext.backend({!r}) == {!r}): the fused module would run "
                    "the reference".format(device, device, da2ext.backend(device)))
    torch_dtype = getattr(torch, dtype)
    fused, ref = make_modules(shape[1], mode, device, torch_dtype)
    module = fused if implementation == "fused" else ref

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=torch_dtype).requires_grad_()
    g = torch.randn(shape, generator=generator).to(device=device, dtype=torch_dtype)
    cuda = device == "cuda"

    # Untimed: what autograd keeps for backward (the graph is dropped right away).
    saved = da2ext.saved_bytes(module, x)
    input_bytes = x.numel() * x.element_size()

    step = training_step(module, x, g)

    benchmark.group = "{}-{}-{}-{}".format(device, dtype, mode, shape_id(shape))
    info = benchmark.extra_info
    info["implementation"] = implementation
    info["backend"] = da2ext.backend(device) if implementation == "fused" else "reference"
    info["device"] = device
    info["dtype"] = dtype
    info["mode"] = mode
    info["shape"] = list(shape)
    info["device_name"] = device_name(device)
    info["torch_version"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["saved_bytes"] = saved
    info["input_bytes"] = input_bytes
    info["saved_fraction"] = saved / float(input_bytes)
    # saved_bytes counts the parameter storages autograd saves too (2 MiB of MLP weights at C=2048):
    # memory that exists anyway, listed so tables can tell it apart from activations.
    info["param_bytes"] = sum(p.numel() * p.element_size() for p in module.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    settings = pedantic_settings(device)
    info["warmup_rounds"] = settings["warmup_rounds"]
    benchmark.pedantic(step, **settings)
    # What the timed step computed: finite gradients, and the fused module's memory claim
    # (mode add keeps no tensor of F's size: descriptors, logits and the MLP's weights only).
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    if implementation == "fused" and mode == "add":
        assert saved - info["param_bytes"] < 0.1 * input_bytes

    if cuda:
        info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            info["model_bytes"] = TRAFFIC_MODEL[mode] * input_bytes
            info["achieved_gbps"] = info["model_bytes"] / median / 1e9 if median > 0 else None
