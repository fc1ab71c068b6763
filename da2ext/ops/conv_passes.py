"""The two passes of a frozen conv: the forward and the input gradient, with no
weight gradient ever. Each picks the fastest way the platform offers for the
shape, with the same arithmetic meaning (tests compare them with F.conv2d and
autograd in float64):

- A pointwise conv (1x1, stride 1, no padding, one group) on the CPU is a
  matrix product, W (Cout x Cin) @ x[n] (Cin x H*W): batched GEMM skips oneDNN's
  layout reorders. Two thirds of ResNet-50's convs are of this kind. It pays
  from 8x8 maps up (measured on the development VM, one batched GEMM against
  oneDNN: 15 vs 49 ms for 64 -> 256 at 8x56x56, 1.3 vs 3.3 ms for 240 -> 40 at
  64x8x8) and loses below (9.6 vs 9.0 ms at 8x7x7, 12 vs 1.2 ms at 64x2x2, where
  the batch of tiny products is all overhead), so smaller maps stay on oneDNN.
- A strided 1x1 conv (ResNet's downsampling shortcut) reads only the pixels
  x[:, :, ::s, ::s], so its input gradient is that GEMM's at those pixels and 0
  elsewhere: 16.8 vs 46.5 ms for 256 -> 512 at 8x56x56, stride 2, against the
  transposed conv (benchmarks/test_conv_passes_benchmark.py). Its forward
  gains nothing from a strided slice, and stays on oneDNN.
- Every other input gradient is a transposed conv of the output gradient with
  the same weight, which on the CPU beats aten::convolution_backward with only
  the input gradient asked (that also copies a dummy input to make it
  contiguous): 8.9 against 32 ms for a 256 -> 64 1x1 conv at 8x56x56.

In channels_last (the lean backbone's CPU order, memory_order.py) oneDNN needs
no reorders and runs every conv, 1x1 included: a whole frozen 1x1 layer's
forward and backward took 16.2 ms against 19.2 ms (1024 -> 256 at 8x14x14) and
22.1 against 25.0 ms (64 -> 256 at 8x56x56) in NCHW with the GEMMs above
(benchmarks/test_channels_last_benchmark.py). Only the strided 1x1 conv's input
gradient stays a GEMM at the pixels it read, which in that order is one matrix
product over all images.
"""
import torch
import torch.nn.functional as F

from .memory_order import CHANNELS_LAST, memory_order, memory_view

__all__ = ["conv2d_forward", "conv2d_input_grad", "is_pointwise"]


def is_pointwise(weight, stride, padding, dilation, groups, any_stride=False):
    """Whether the conv is 1x1 with no padding and one group, at stride 1 (or any
    stride with `any_stride`): a matrix product per image."""
    return (tuple(weight.shape[-2:]) == (1, 1) and (any_stride or tuple(stride) == (1, 1))
            and tuple(padding) == (0, 0) and groups == 1)


_GEMM_MIN_PIXELS = 64  # H * W from which batched GEMM beats oneDNN (see above)


def _use_gemm(x, weight, stride, padding, dilation, groups, any_stride=False):
    # `x`: the GEMM's right-hand side (the input, or the output gradient).
    # cuDNN handles 1x1 convs well, and keeps the CUDA path to one library.
    return (x.device.type == "cpu" and x.is_contiguous() and x.shape[-1] * x.shape[-2] >= _GEMM_MIN_PIXELS
            and is_pointwise(weight, stride, padding, dilation, groups, any_stride))


def conv2d_forward(x, weight, bias, stride, padding, dilation, groups):
    """F.conv2d(x, weight, bias, ...) for an N x C x H x W x, contiguous or
    channels_last; the result is in x's memory order."""
    if not _use_gemm(x, weight, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    n, c_in, height, width = x.shape
    c_out = weight.shape[0]
    flat = x.reshape(n, c_in, height * width)
    w = weight.reshape(c_out, c_in)
    # The product is written into a 4-D tensor of its own (not returned as a view of
    # a 3-D one), so that callers may modify the result in place under autograd.
    y = x.new_empty(n, c_out, height, width)
    out = y.view(n, c_out, height * width)
    if bias is None:
        torch.bmm(w.expand(n, c_out, c_in), flat, out=out)
    else:
        torch.baddbmm(bias.view(1, c_out, 1).expand(n, c_out, height * width), w.expand(n, c_out, c_in), flat,
                      out=out)
    return y


def conv2d_input_grad(grad_output, input_shape, weight, stride, padding, dilation, groups):
    """The gradient of conv2d with respect to its input, alone, in grad_output's
    memory order (contiguous or channels_last)."""
    if memory_order(grad_output) == CHANNELS_LAST and grad_output.device.type == "cpu" and is_pointwise(
            weight, stride, padding, dilation, groups, any_stride=True) and tuple(stride) != (1, 1):
        return _strided_pointwise_input_grad_channels_last(grad_output, input_shape, weight, stride)
    if _use_gemm(grad_output, weight, stride, padding, dilation, groups, any_stride=True):
        n, c_out, height, width = grad_output.shape
        w = weight.reshape(c_out, weight.shape[1])
        product = torch.matmul(w.t(), grad_output.reshape(n, c_out, height * width))
        if tuple(stride) == (1, 1):
            return product.view(input_shape)
        # Strided: the conv read x[:, :, ::s, ::s] alone (no padding, so exactly
        # `height` x `width` pixels); the other pixels get no gradient.
        grad_input = grad_output.new_zeros(input_shape)
        grad_input[:, :, ::stride[0], ::stride[1]] = product.view(n, -1, height, width)
        return grad_input
    # output_padding restores the input size a strided conv lost.
    output_padding = []
    for i in range(2):
        covered = ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                   + dilation[i] * (weight.shape[2 + i] - 1) + 1)
        output_padding.append(input_shape[2 + i] - covered)
    return F.conv_transpose2d(grad_output, weight, None, stride, padding, output_padding, groups, dilation)


def _strided_pointwise_input_grad_channels_last(grad_output, input_shape, weight, stride):
    """A strided 1x1 conv's input gradient in channels_last: the GEMM of the
    (N*H_out*W_out) x C_out gradient with the weight, at the pixels the conv
    read; 0 elsewhere."""
    n, c_out, height, width = grad_output.shape
    product = torch.mm(memory_view(grad_output, CHANNELS_LAST).reshape(-1, c_out), weight.reshape(c_out, -1))
    grad_input = torch.empty(input_shape, dtype=grad_output.dtype, device=grad_output.device,
                             memory_format=torch.channels_last).zero_()
    memory_view(grad_input, CHANNELS_LAST)[:, ::stride[0], ::stride[1], :] = product.view(n, height, width, -1)
    return grad_input
