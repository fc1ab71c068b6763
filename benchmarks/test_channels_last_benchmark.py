"""The lean backbone's two CPU memory orders side by side (pytest-benchmark):
NCHW against channels_last, the order adapt() runs the CPU backbone in
(da2ext/ops/memory_order.py), for the two kinds of layer a lean ResNet-50 is made of.

    pytest benchmarks/test_channels_last_benchmark.py --benchmark-only
    DA2EXT_BENCH_ROUNDS=30 pytest benchmarks/test_channels_last_benchmark.py --benchmark-only -k conv

- adaptor: one training step of a fused adaptor (y = m(x); y.backward(g)) with
  x in each order, and the eager reference on the channels_last x;
- frozen conv: one frozen conv-BN-ReLU layer's forward and backward (the
  input gradient and the BN shift's; never a weight gradient) with x in each
  order, at ResNet-50's 1x1 and 3x3 shapes at batch 8;
- max pool: ResNet-50's stem pool (3x3, stride 2, at batch 8) forward and
  input gradient, LeanMaxPool2d (a uint8 window offset kept) against torch's
  max_pool2d (int64 indices kept), in each order.

Each benchmark group holds one shape's variants, so pytest-benchmark prints
them side by side. float32, torch's default thread count.
"""
import pytest
import torch
from torch import nn

import da2ext
from bench_settings import device_name, pedantic_settings, shape_id, training_step
from da2ext import reference
from da2ext.lean.frozen_conv import FrozenConvBNAct
from da2ext.lean.lean_max_pool import LeanMaxPool2d

pytestmark = pytest.mark.skipif(da2ext.backend("cpu") != "cpu", reason="the channels_last loops are CPU kernels")

ORDERS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
ADAPTOR_SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7)]
# (in channels, out channels, kernel, stride, input H = W): ResNet-50 bottleneck convs at batch 8.
CONVS = [(256, 64, 1, 1, 56), (64, 64, 3, 1, 56), (64, 256, 1, 1, 56), (128, 128, 3, 2, 56),
         (1024, 256, 1, 1, 14), (256, 256, 3, 1, 14), (512, 512, 3, 1, 7)]


def _info(benchmark, kind, variant, shape):
    benchmark.extra_info.update(kind=kind, variant=variant, shape=list(shape), device_name=device_name("cpu"),
                                torch_threads=torch.get_num_threads())
    benchmark.group = "cpu-float32-{}-{}".format(kind, shape_id(shape))


@pytest.mark.parametrize("shape", ADAPTOR_SHAPES, ids=shape_id)
@pytest.mark.parametrize("variant", ["fused-nchw", "fused-channels_last", "reference-channels_last"])
def test_adaptor_step(benchmark, variant, shape):
    implementation, order = variant.split("-")
    torch.manual_seed(0)
    module = (da2ext.ResidualAttentionAdaptor if implementation == "fused" else reference.ResidualAttentionAdaptor)(
        shape[1])
    nn.init.normal_(module.gamma, std=0.1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=ORDERS[order]).requires_grad_()
    g = torch.randn(shape, generator=generator).contiguous(memory_format=ORDERS[order])

    _info(benchmark, "adaptor", variant, shape)
    y = benchmark.pedantic(training_step(module, x, g), **pedantic_settings("cpu"))
    assert y.is_contiguous(memory_format=ORDERS[order])


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: "{}to{}_k{}_s{}_{}px".format(*c))
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_frozen_conv_layer(benchmark, order, conv):
    c_in, c_out, kernel, stride, size = conv
    torch.manual_seed(0)
    layer = FrozenConvBNAct.fold(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                                 nn.BatchNorm2d(c_out).eval(), nn.ReLU())
    generator = torch.Generator().manual_seed(1)
    shape = (8, c_in, size, size)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=ORDERS[order]).requires_grad_()
    with torch.no_grad():
        out_shape = layer(x).shape
    g = torch.randn(out_shape, generator=generator).contiguous(memory_format=ORDERS[order])

    _info(benchmark, "frozen_conv", order, shape + (c_out, kernel, stride))
    y = benchmark.pedantic(training_step(layer, x, g), **pedantic_settings("cpu"))
    assert y.is_contiguous(memory_format=ORDERS[order]) and x.grad.is_contiguous(memory_format=ORDERS[order])


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("pool", ["lean", "torch"])
def test_stem_max_pool(benchmark, pool, order):
    shape = (8, 64, 112, 112)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=ORDERS[order]).requires_grad_()
    g = torch.randn(8, 64, 56, 56, generator=generator).contiguous(memory_format=ORDERS[order])
    module = LeanMaxPool2d(3, 2, 1) if pool == "lean" else nn.MaxPool2d(3, 2, 1)

    def step():
        y = module(x)
        grad, = torch.autograd.grad(y, x, g)
        return grad

    _info(benchmark, "max_pool", "{}-{}".format(pool, order), shape)
    grad = benchmark.pedantic(step, **pedantic_settings("cpu"))
    assert grad.is_contiguous(memory_format=ORDERS[order])
