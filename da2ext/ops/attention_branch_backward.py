"""Backward of the adaptor's small branch (the channel MLP and the spatial conv),
written out so the fused op's backward needs neither a second forward of the
branch nor an autograd graph for it: from the saved descriptors, the MLP's
hidden pre-activation and the gradients of the two logits, it returns the
gradients of the descriptors and of the six branch parameters.
"""
import torch

from .attention_branch import IM2COL_CONV2D_BACKWARD, aten_op, uses_im2col_conv

# aten::convolution_backward (torch >= 1.11; None on the Jetson's 1.10) computes the input,
# weight and bias gradients in one call, picking the same backend as autograd would.
_convolution_backward = aten_op("convolution_backward")


def _conv2d_backward(grad_output, spatial, weight, needs_input, needs_weight, needs_bias):
    size, padding = weight.shape[-1], weight.shape[-1] // 2
    if IM2COL_CONV2D_BACKWARD is not None and uses_im2col_conv(spatial):  # the forward's kernel, by name
        return IM2COL_CONV2D_BACKWARD(grad_output, spatial, weight, [size, size], [1, 1], [padding, padding],
                                      [needs_input, needs_weight, needs_bias])
    return _conv2d_backward_any_backend(grad_output, spatial, weight, padding, needs_input, needs_weight, needs_bias)


def _conv2d_backward_any_backend(grad_output, spatial, weight, padding, needs_input, needs_weight, needs_bias):
    if _convolution_backward is not None:
        return _convolution_backward(grad_output, spatial, weight, [weight.shape[0]], [1, 1], [padding, padding],
                                     [1, 1], False, [0, 0], 1, [needs_input, needs_weight, needs_bias])
    grad_input = torch.nn.grad.conv2d_input(spatial.shape, weight, grad_output, padding=padding) \
        if needs_input else None
    grad_weight = torch.nn.grad.conv2d_weight(spatial, weight.shape, grad_output, padding=padding) \
        if needs_weight else None
    grad_bias = grad_output.sum(dim=(0, 2, 3)) if needs_bias else None
    return grad_input, grad_weight, grad_bias


def attention_logits_backward(grad_channel_logits, grad_spatial_logits, channel_mean, spatial, hidden_pre,
                              fc1_weight, fc2_weight, spatial_weight, needs):
    """Gradients of (channel_mean, spatial, fc1.weight, fc1.bias, fc2.weight,
    fc2.bias, spatial.weight, spatial.bias); `needs` says which are wanted, the
    others come back as None. Arithmetic in the dtype of the tensors passed in."""
    (needs_channel_mean, needs_spatial, needs_fc1_weight, needs_fc1_bias, needs_fc2_weight, needs_fc2_bias,
     needs_spatial_weight, needs_spatial_bias) = needs
    grads = [None] * 8
    if needs_fc2_weight:
        grads[4] = grad_channel_logits.t().mm(torch.relu(hidden_pre))
    if needs_fc2_bias:
        grads[5] = grad_channel_logits.sum(0)
    if needs_channel_mean or needs_fc1_weight or needs_fc1_bias:
        # relu' = 1 where the pre-activation is positive, as autograd's relu backward
        grad_hidden = grad_channel_logits.mm(fc2_weight) * (hidden_pre > 0).to(hidden_pre.dtype)
        if needs_fc1_weight:
            grads[2] = grad_hidden.t().mm(channel_mean)
        if needs_fc1_bias:
            grads[3] = grad_hidden.sum(0)
        if needs_channel_mean:
            grads[0] = grad_hidden.mm(fc1_weight)
    if needs_spatial or needs_spatial_weight or needs_spatial_bias:
        grads[1], grads[6], grads[7] = _conv2d_backward(grad_spatial_logits, spatial, spatial_weight, needs_spatial,
                                                        needs_spatial_weight, needs_spatial_bias)
    return grads
