"""The residual attention adaptor module, running the fused kernels."""
from ..ops.attention_branch import AttentionBranch
from ..ops.residual_attention import residual_attention

__all__ = ["ResidualAttentionAdaptor"]


class ResidualAttentionAdaptor(AttentionBranch):
    """Residual attention after a frozen block (docs/design.md §2):

        y = F + gamma * A         (mode "add", the default)
        y = F * (1 + gamma * A)   (mode "mul")

    with A = sigmoid(MLP(mean_hw F)) * sigmoid(conv([mean_c F; max_c F])) never
    materialised. gamma starts at 0, so a fresh adaptor returns its input exactly.
    At rank k, gamma * A is a sum of k such terms, each with its own channel
    logits, spatial map and gamma row (gamma has shape (k, C)); what backward
    keeps grows to O(N*k*(C+H*W)) numbers, still nothing of size N*C*H*W.

    Args:
        channels: C, the channels of the block output it follows.
        reduction: the channel MLP is C -> max(C // reduction, 8) -> C.
        spatial_kernel: odd size k of the 2 -> 1 spatial conv (padding k // 2);
            see da2ext.spatial_kernel_size for small maps.
        mode: "add" (keeps O(N*(C+H*W)) numbers for backward) or "mul" (also keeps F).
        saved_input_dtype: mode "mul" only; e.g. torch.float16 keeps F in half precision.
        rank: k, the number of channel-gate x spatial-map products summed (1 to 16).
    """

    def __init__(self, channels, reduction=16, spatial_kernel=7, mode="add", saved_input_dtype=None, rank=1):
        super(ResidualAttentionAdaptor, self).__init__(channels, reduction, spatial_kernel, mode, rank)
        if saved_input_dtype is not None and mode != "mul":
            raise ValueError('saved_input_dtype only applies to mode "mul" (mode "add" keeps no input)')
        self.saved_input_dtype = saved_input_dtype

    def forward(self, x):
        # residual_attention checks x (shape, dtype and device against gamma)
        return residual_attention(x, *self.adaptor_tensors(), mode=self.mode, saved_input_dtype=self.saved_input_dtype)
