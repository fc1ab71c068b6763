"""Where low-rank branches go: beside the blocks whose output stride is at least a
bound (adapt(..., branch_width=w, branch_min_stride=s); docs/design.md §2, "Late
branches").

The late blocks are where the frozen backbone caps a far domain, and where the
maps are small: a branch there (da2ext.nn.LowRankConvBranch) keeps little for
backward at any input size. Each branch is sized from one traced forward pass
(adaptor_placement.block_io_shapes): the block's input and output channels, and
its own stride (input side over output side).
"""
from ..nn.low_rank_branch import LowRankConvBranch
from .adaptor_placement import block_io_shapes, output_stride

__all__ = ["add_late_branches"]


def add_late_branches(model, named_blocks, width, min_stride, in_channels, dtype):
    """Give every block of named_blocks ((name, AdaptedBlock) pairs) whose output
    stride is at least min_stride a LowRankConvBranch of `width` inner channels in
    `dtype`, on the model's device. Returns {name: output stride} of those blocks
    (the model's record of the placement)."""
    shapes = block_io_shapes(model, named_blocks, in_channels, option="branch_width")
    device = next(model.parameters()).device
    placed = {}
    for name, block in named_blocks:
        (_, c_in, h_in, _), (_, c_out, h_out, _) = shapes[name]
        stride = output_stride(shapes[name][1])
        if stride < min_stride:
            continue
        block.branch = LowRankConvBranch(c_in, c_out, stride=max(1, (h_in + h_out - 1) // h_out),
                                         width=width).to(device=device, dtype=dtype)
        placed[name] = stride
    return placed
