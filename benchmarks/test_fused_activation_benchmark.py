"""The packed activation fused with its neighbouring passes (CPU kernels) against
the same work as separate passes (pytest-benchmark).

    pytest benchmarks/test_fused_activation_benchmark.py --benchmark-only
    DA2EXT_BENCH_ROUNDS=30 pytest benchmarks/test_fused_activation_benchmark.py --benchmark-only -k forward

Forward, at the end of a ResNet block (y: the last 1x1 conv's plain product,
b: its folded BN bias, r: the shortcut):
    separate  y += b; y += r; packed_activation_(y)       (three passes)
    fused     packed_bias_activation_(y, b, r)            (one pass)
Backward, at a layer whose BN shift trains (g: the incoming gradient):
    separate  packed_activation_backward(g, mask), then its sum over n, h, w
    fused     packed_activation_backward_channel_sums(g, mask)

Shapes: ResNet-50's block outputs at batch 8, 56x56 down to 7x7; the fused
kernels walk 32-element mask words, so the planes (H*W) that are not whole
words (28x28 and smaller) take their slower per-element paths at the plane
edges. da2ext/lean/frozen_conv.py uses each fused kernel only on the maps where this
benchmark found it faster. float32, one thread count (torch's default).

The backward also runs channels_last (the lean backbone's CPU order): there the
kernel walks rows of C channels, whole words when C is a multiple of 32
(ResNet-50's widths), element by element otherwise (MobileNetV2's 24 and 144
below), where frozen_conv.py keeps the separate passes.
"""
import pytest
import torch

import da2ext
from bench_settings import device_name, pedantic_settings, shape_id

SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]
RELU = float("inf")

pytestmark = pytest.mark.skipif(da2ext.backend("cpu") != "cpu", reason="the fused kernels are CPU kernels")


CHANNELS_LAST_SHAPES = SHAPES + [(8, 24, 56, 56), (8, 144, 28, 28)]


def _info(benchmark, pass_name, implementation, shape, memory_format="nchw"):
    benchmark.extra_info.update(pass_name=pass_name, implementation=implementation, shape=list(shape),
                                memory_format=memory_format, device_name=device_name("cpu"),
                                torch_threads=torch.get_num_threads())
    benchmark.group = "cpu-float32-{}-{}-{}".format(pass_name, memory_format, shape_id(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("implementation", ["separate", "fused"])
def test_forward_bias_residual_activation(benchmark, implementation, shape):
    generator = torch.Generator().manual_seed(0)
    product = torch.randn(shape, generator=generator)
    bias = torch.randn(shape[1], generator=generator)
    residual = torch.randn(shape, generator=generator)
    y = product.clone()
    expected = torch.relu(product + bias.view(1, -1, 1, 1) + residual)

    def separate():
        y.copy_(product)  # the same fresh start for both, inside the timing
        y.add_(bias.view(1, -1, 1, 1)).add_(residual)
        return torch.ops.da2ext.packed_activation_(y, RELU)

    def fused():
        y.copy_(product)
        return torch.ops.da2ext.packed_bias_activation_(y, bias, residual, RELU)

    _info(benchmark, "forward", implementation, shape)
    benchmark.pedantic(separate if implementation == "separate" else fused, **pedantic_settings("cpu"))
    assert torch.allclose(y, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("memory_format,shape", [("nchw", s) for s in SHAPES]
                         + [("channels_last", s) for s in CHANNELS_LAST_SHAPES],
                         ids=lambda v: shape_id(v) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("implementation", ["separate", "fused"])
def test_backward_mask_and_channel_sums(benchmark, implementation, memory_format, shape):
    order = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=order)
    _, mask = torch.ops.da2ext.packed_activation(x, RELU)  # bits in x's memory order
    grad = torch.randn(shape, generator=generator).contiguous(memory_format=order)

    def separate():
        masked = torch.ops.da2ext.packed_activation_backward(grad, mask)
        return masked, masked.sum(dim=(0, 2, 3), dtype=torch.float32)

    def fused():
        return torch.ops.da2ext.packed_activation_backward_channel_sums(grad, mask)

    _info(benchmark, "backward", implementation, shape, memory_format)
    masked, sums = benchmark.pedantic(separate if implementation == "separate" else fused,
                                      **pedantic_settings("cpu"))
    assert torch.equal(masked, torch.ops.da2ext.packed_activation_backward(grad, mask))
    assert torch.allclose(sums, masked.sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-3)
