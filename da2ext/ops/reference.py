"""Pure-PyTorch reference of the residual attention adaptor (docs/design.md §2).

Eager maths, exactly as written in the design: the ground truth the fused
kernels are tested against and the baseline they are benchmarked against. It
keeps full-size tensors for backward (the broadcast attention map, F for the
channel max, ...), which is what the fused op exists to avoid.
"""
import torch

from ._validation import check_feature_map
from .attention_branch import AttentionBranch, attention_logits

__all__ = ["ResidualAttentionAdaptor", "reference_attention_logits", "residual_attention_reference"]


def reference_attention_logits(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias):
    """The branch's logits on F = x, eager: the descriptors of §2 (channel mean;
    spatial mean and max over the channels) through the MLP and the spatial conv.
    Returns (channel logits N x k*C, spatial logits N x k x H x W)."""
    channel_mean = x.mean(dim=(2, 3))
    spatial_mean = x.mean(dim=1, keepdim=True)
    # torch.max (not amax): its gradient goes to the one argmax channel, as in §2
    spatial_max = x.max(dim=1, keepdim=True)[0]
    return attention_logits(channel_mean, torch.cat([spatial_mean, spatial_max], dim=1), fc1_weight, fc1_bias,
                            fc2_weight, fc2_bias, spatial_weight, spatial_bias)


def residual_attention_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias,
                                 gamma, mode="add"):
    channel_logits, spatial_logits = reference_attention_logits(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                                spatial_weight, spatial_bias)
    rank = spatial_logits.shape[1]
    if rank == 1:
        attention = torch.sigmoid(channel_logits)[:, :, None, None] * torch.sigmoid(spatial_logits)
        scaled = gamma.view(1, -1, 1, 1) * attention
    else:  # gamma (k, C), the logits N x k*C and N x k x H x W: the sum of k rank-1 terms
        n, c = x.shape[0], x.shape[1]
        channel_gate = gamma.reshape(1, rank, c) * torch.sigmoid(channel_logits).reshape(n, rank, c)
        scaled = (channel_gate[:, :, :, None, None] * torch.sigmoid(spatial_logits)[:, :, None]).sum(1)
    return x + scaled if mode == "add" else x * (1 + scaled)


class ResidualAttentionAdaptor(AttentionBranch):
    """Reference twin of da2ext.ResidualAttentionAdaptor: same constructor, same
    state_dict keys, eager PyTorch maths."""

    def forward(self, x):
        check_feature_map(x, self.channels, self.gamma, type(self).__name__)
        return residual_attention_reference(x, *self.branch_parameters(), gamma=self.gamma, mode=self.mode)
