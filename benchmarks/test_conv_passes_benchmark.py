"""The frozen conv's input gradient (da2ext.ops.conv_passes.conv2d_input_grad) against
what plain PyTorch would run for it (pytest-benchmark), CPU float32.

    pytest benchmarks/test_conv_passes_benchmark.py --benchmark-only

Shapes: ResNet-50's convs at batch 8 where the lean backbone takes its own path:
a 1x1 conv (GEMM), the three strided 1x1 downsampling shortcuts (GEMM at the
pixels the conv read, zeros elsewhere) and a 3x3 conv (transposed conv). The
implementations, one benchmark group per shape:

    lean                    conv2d_input_grad
    convolution_backward    aten::convolution_backward asked for the input gradient only
    conv_transpose2d        F.conv_transpose2d of the output gradient (the general path)
"""
import pytest
import torch
import torch.nn.functional as F

from bench_settings import device_name, pedantic_settings
from da2ext.ops.conv_passes import conv2d_input_grad

# (C_in, C_out, H, kernel, stride, padding): ResNet-50 at batch 8.
CONVS = {
    "1x1-256to64-56": (256, 64, 56, 1, 1, 0),
    "1x1s2-256to512-56": (256, 512, 56, 1, 2, 0),
    "1x1s2-512to1024-28": (512, 1024, 28, 1, 2, 0),
    "1x1s2-1024to2048-14": (1024, 2048, 14, 1, 2, 0),
    "3x3-128to128-28": (128, 128, 28, 3, 1, 1),
}
BATCH = 8


def _output_padding(input_size, output_size, kernel, stride, padding):
    return input_size - ((output_size - 1) * stride - 2 * padding + kernel)


IMPLEMENTATIONS = {
    "lean": lambda g, shape, w, s, p: conv2d_input_grad(g, shape, w, (s, s), (p, p), (1, 1), 1),
    "convolution_backward": lambda g, shape, w, s, p: torch.ops.aten.convolution_backward(
        g, torch.empty(shape), w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, False, False])[0],
    "conv_transpose2d": lambda g, shape, w, s, p: F.conv_transpose2d(
        g, w, None, s, p, _output_padding(shape[-1], g.shape[-1], w.shape[-1], s, p)),
}


@pytest.mark.parametrize("conv", sorted(CONVS))
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_conv_input_grad(benchmark, implementation, conv):
    c_in, c_out, size, kernel, stride, padding = CONVS[conv]
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH, c_in, size, size)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=generator)
    out_size = (size + 2 * padding - kernel) // stride + 1
    grad = torch.randn(BATCH, c_out, out_size, out_size, generator=generator)
    run = IMPLEMENTATIONS[implementation]
    # The reference: autograd's input gradient of the convolution itself (no implementation above).
    x = torch.zeros(shape, requires_grad=True)
    expected = torch.autograd.grad(F.conv2d(x, weight, None, stride, padding), x, grad)[0]
    torch.testing.assert_close(run(grad, shape, weight, stride, padding), expected, rtol=1e-4, atol=1e-3)
    benchmark.group = "input-grad-" + conv
    benchmark.extra_info.update(implementation=implementation, conv=conv, device_name=device_name("cpu"),
                                torch_threads=torch.get_num_threads())
    benchmark.pedantic(lambda: run(grad, shape, weight, stride, padding), **pedantic_settings("cpu"))
