"""One learned domain as a plain PyTorch inference model: what export writes.

Training needs da2ext's kernels (they keep the packed masks and descriptors);
inference needs none of it. inference_model() copies the adapted network with
the domain's tensors in place and swaps every lean part for standard ops, so
that any runtime can run the result (ONNX Runtime, TensorRT, TorchScript)
without da2ext:

- a FrozenConvBNAct becomes FoldedConvAct: one conv whose weight holds the
  folded BN and whose bias holds the folded BN and the domain's shift,
  then ReLU / ReLU6 (TensorFlow "SAME" padding as an explicit pad);
- a ResidualAttentionAdaptor becomes InferenceAdaptor: the same maths in
  standard ops, the rank-k sum of gate products as one batched matrix product
  (N x C x k by N x k x H*W) instead of k broadcast products, and at rank 1 the
  one product as a broadcast (two fewer nodes in an exported graph);
- a LowRankConvBranch becomes FoldedLowRankBranch: its output BN folded into the
  last 1x1 conv, and on inputs of even height and width its 2 x 2 mean pool
  folded into the first (one 2 x 2 stride-2 conv: a runtime runs one op, not a
  pool and a conv);
- the lean max pool, the frozen blocks, the head and a trainable tail run as
  they do without autograd (plain conv, max_pool2d, add, clamp, linear).

Nothing in it requires a gradient, and its state is exactly the domain's.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lean.adapt import remove_memory_order_hook
from ..lean.frozen_conv import FrozenConvBNAct, pad_same
from ..lean.input_grad_only import InputGradOnlyBatchNorm2d, InputGradOnlyConv2d
from ..lean.recomputed_block import RecomputedBlock
from ..nn.low_rank_branch import LowRankConvBranch
from ..ops.attention_branch import AttentionBranch

__all__ = ["FoldedConvAct", "FoldedLowRankBranch", "InferenceAdaptor", "inference_model"]


def _clamp(y, upper):
    if upper is None:
        return y
    if math.isinf(upper):
        return torch.relu(y)
    return torch.clamp(y, 0.0, upper)


class FoldedConvAct(nn.Module):
    """conv(x, folded weight) + folded bias + shift, then clamp(., 0, upper): a
    FrozenConvBNAct's inference in one conv (its shift baked into the bias)."""

    def __init__(self, frozen):
        super(FoldedConvAct, self).__init__()
        with torch.no_grad():
            bias = (frozen.frozen_bias + frozen.shift).to(frozen.weight.dtype)
        self.register_buffer("weight", frozen.weight.detach().contiguous())
        self.register_buffer("bias", bias.detach().clone())
        self.stride, self.padding, self.dilation = frozen.stride, frozen.padding, frozen.dilation
        self.groups, self.tf_same, self.upper = frozen.groups, frozen.tf_same, frozen.upper

    def _conv(self, x):
        if self.tf_same:
            x, _ = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        return _clamp(self._conv(x.to(self.weight.dtype)), self.upper)

    def forward_add_activation(self, x, residual, upper):
        """clamp(conv(x) + residual, 0, upper): how a frozen block calls its last conv."""
        return _clamp(self._conv(x.to(self.weight.dtype)) + residual, upper)


class InferenceAdaptor(nn.Module):
    """A residual attention adaptor's forward in standard ops (docs/design.md §2):
    y = F + gamma*A (mode add) or F * (1 + gamma*A) (mode mul), with gamma*A
    the sum over the rank's terms of channel gate x spatial map."""

    def __init__(self, adaptor):
        super(InferenceAdaptor, self).__init__()
        if not isinstance(adaptor, AttentionBranch):
            raise TypeError("expected a residual attention adaptor, got {}".format(type(adaptor).__name__))
        names = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "spatial_weight", "spatial_bias")
        for name, tensor in zip(names, adaptor.branch_parameters()):
            self.register_buffer(name, tensor.detach().clone())
        self.register_buffer("gamma", adaptor.gamma.detach().reshape(-1, adaptor.gamma.shape[-1]).clone())  # k x C
        self.multiplicative = adaptor.mode == "mul"

    def forward(self, x):
        n, c, h, w = x.shape
        rank = self.gamma.shape[0]
        z = x.to(self.gamma.dtype)
        channel_mean = z.mean(dim=(2, 3))
        spatial = torch.cat([z.mean(dim=1, keepdim=True), z.amax(dim=1, keepdim=True)], dim=1)
        channel_logits = F.linear(F.relu(F.linear(channel_mean, self.fc1_weight, self.fc1_bias)), self.fc2_weight,
                                  self.fc2_bias)
        padding = self.spatial_weight.shape[-1] // 2
        spatial_logits = F.conv2d(spatial, self.spatial_weight, self.spatial_bias, padding=padding)  # N x k x H x W
        if rank == 1:  # one product: broadcast N x C x 1 x 1 by N x 1 x H x W, no reshapes of the maps
            scaled = (self.gamma * torch.sigmoid(channel_logits)).reshape(n, c, 1, 1) * torch.sigmoid(spatial_logits)
        else:
            gate_channel = self.gamma * torch.sigmoid(channel_logits).reshape(n, rank, c)           # N x k x C
            gate_spatial = torch.sigmoid(spatial_logits).reshape(n, rank, h * w)                     # N x k x HW
            scaled = torch.matmul(gate_channel.transpose(1, 2), gate_spatial).reshape(n, c, h, w)   # sum over k
        y = z + scaled if not self.multiplicative else z * (1 + scaled)
        return y.to(x.dtype)


class FoldedLowRankBranch(nn.Module):
    """A LowRankConvBranch's inference (its BN's running statistics) in three convs:

        h = relu(conv_3x3,s(relu(down(x))))    down = mean_pool_2 then the 1x1 conv
        z = up(h)                              the 1x1 conv with the BN folded in

    down is one 2 x 2 stride-2 conv holding the 1x1 weight / 4 in each tap where x's
    height and width are even (each window then holds 4 positions); otherwise the
    ceil-mode pool's edge windows average fewer, and down stays the pool and the
    1x1 conv. `up` is a FoldedConvAct (the BN folded as the backbone's are, by
    FrozenConvBNAct.fold) whose `weight` gives AdaptedBlock the branch's dtype, and
    upsample() the branch's own, as AdaptedBlock calls them."""

    def __init__(self, branch):
        super(FoldedLowRankBranch, self).__init__()
        if not isinstance(branch, LowRankConvBranch):
            raise TypeError("expected a LowRankConvBranch, got {}".format(type(branch).__name__))
        with torch.no_grad():
            self.register_buffer("down_weight", branch.down.weight.detach().clone())
            self.register_buffer("pooled_down_weight", branch.down.weight.detach().repeat(1, 1, 2, 2) / 4.0)
            self.register_buffer("conv_weight", branch.conv.weight.detach().clone())
        self.up = FoldedConvAct(FrozenConvBNAct.fold(branch.up, branch.bn, train_shift=False,
                                                     dtype=branch.up.weight.dtype))
        self.stride = branch.stride

    upsample = staticmethod(LowRankConvBranch.upsample)

    def forward(self, x):
        height, width = x.shape[-2:]
        if height % 2 == 0 and width % 2 == 0:
            pooled_down = F.conv2d(x, self.pooled_down_weight, stride=2)
        else:
            pooled_down = F.conv2d(F.avg_pool2d(x, 2, 2, ceil_mode=True), self.down_weight)
        h = torch.relu(F.conv2d(torch.relu(pooled_down), self.conv_weight, stride=self.stride, padding=1))
        return self.up(h)


def _swap(network, kind, build):
    """Replace every submodule of type `kind` by build(it), in place."""
    for module in list(network.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, kind):
                setattr(module, child_name, build(child))


def inference_model(model, domain, dtype=None):
    """A standalone nn.Module computing `domain`'s logits with standard ops only.

    model: a MultiDomainModel holding `domain` (the model is not changed).
    dtype: the dtype to hold weights and compute in (e.g. torch.float16 for a
    GPU runtime); default: as trained. The result is in eval mode, on the CPU,
    and takes N x 3 x H x W images prepared as the domain records
    (model.domain_info(domain)["preprocessing"])."""
    with model.domain(domain):
        network = copy.deepcopy(model.model).cpu()
    _swap(network, FrozenConvBNAct, FoldedConvAct)
    # A block kept as its input for backward is, at inference, the original block.
    _swap(network, InputGradOnlyConv2d, lambda m: m.conv)
    _swap(network, InputGradOnlyBatchNorm2d, lambda m: m.bn)
    _swap(network, RecomputedBlock, lambda m: m.module)
    _swap(network, AttentionBranch, InferenceAdaptor)  # the fused adaptor and its reference twin (lean=False)
    _swap(network, LowRankConvBranch, FoldedLowRankBranch)
    # The lean model's memory-order hook serves its kernels' layouts; standard ops take any
    # order, and an export of a channels_last batch would end in a strided gather before the head.
    remove_memory_order_hook(network)
    network.requires_grad_(False)
    if dtype is not None:
        network = network.to(dtype)
    return network.eval()
