"""Where adaptors go: after the blocks whose output stride is at most a bound
(adapt(..., adaptor_max_stride=s); docs/design.md §2, "Rank and placement").

The stride of a block is how many times smaller its output map is than the
model's input (2, 4, 8, 16, 32 in an ImageNet CNN). It is what "early" means
across architectures: stride <= 8 is ResNet-50's layer1 and layer2 (7 blocks),
MobileNetV2's first 6 inverted residuals and EfficientNet-Lite0's first 5
blocks, at any input size. It is traced, not inferred from the modules: one
forward pass without autograd at TRACE_SIDE x TRACE_SIDE records each adapted
block's output size.
"""
import torch

from .insert_adaptors import feature_map_io_shapes

__all__ = ["TRACE_SIDE", "block_io_shapes", "block_strides", "keep_adaptors_up_to_stride", "output_stride"]

# The trace's input side: divisible by every stride an ImageNet CNN has (up to 32), and a size every such
# model accepts.
TRACE_SIDE = 224


def block_io_shapes(model, named_blocks, in_channels, option="adaptor_max_stride"):
    """{name: (input shape, output shape)} of the (name, module) pairs named_blocks of
    `model`, from one forward pass on a 1 x in_channels x TRACE_SIDE x TRACE_SIDE input
    without autograd, in eval mode (feature_map_io_shapes). option: the adapt()
    argument that needs the trace, named in its errors."""
    device = next(model.parameters()).device  # an adapted model has parameters: its head
    try:
        shapes = feature_map_io_shapes(model, named_blocks, torch.zeros(1, in_channels, TRACE_SIDE, TRACE_SIDE,
                                                                        device=device))
    except Exception as error:  # a model that cannot take this input: say which placement needed it
        raise ValueError("adapt: {} traces each block's output stride with one forward pass on a 1x{}x{}x{} input, "
                         "and the model failed on it: {}".format(option, in_channels, TRACE_SIDE, TRACE_SIDE, error))
    missing = [name for name, _ in named_blocks if name not in shapes or shapes[name][0] is None]
    if missing:
        raise ValueError("adapt: {}: {} adapted block(s) did not run in the model's forward pass (or did not map "
                         "an N x C x H x W input to one), so their stride is unknown".format(option, len(missing)))
    return shapes


def output_stride(shape):
    """How many times smaller than the TRACE_SIDE x TRACE_SIDE input an N x C x H x W map is."""
    return max(1, TRACE_SIDE // shape[-1])


def block_strides(model, named_blocks, in_channels):
    """{name: output stride} for the (name, module) pairs named_blocks of `model`
    (block_io_shapes)."""
    return dict((name, output_stride(io[1])) for name, io in block_io_shapes(model, named_blocks, in_channels).items())


def keep_adaptors_up_to_stride(model, named_blocks, max_stride, in_channels):
    """Remove the adaptor of every block in named_blocks ((name, module with an
    .adaptor) pairs, each with an adaptor) whose output stride exceeds max_stride.
    Returns {name: stride} of the blocks that keep theirs (the model's record of
    the placement)."""
    strides = block_strides(model, named_blocks, in_channels)
    for name, block in named_blocks:
        if strides[name] > max_stride:
            block.adaptor = None
    return dict((name, stride) for name, stride in strides.items() if stride <= max_stride)
