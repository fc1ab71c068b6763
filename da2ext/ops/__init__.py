"""The kernels' Python side, as torchvision.ops is torchvision's: each op of the
extension (da2ext._C, which registers torch.ops.da2ext.*) as a function with
autograd and a fallback where no kernels exist, and the pure-PyTorch references
they are tested against.

    residual_attention.py         the fused residual attention op (the adaptor's forward and backward;
                                  on the CPU one C++ op each way, op by op elsewhere)
    attention_branch.py           its small branch (channel MLP, spatial conv) in PyTorch, and the
                                  parameters it shares with the reference (AttentionBranch)
    attention_branch_backward.py  that branch's backward, written out on small tensors
    packed_activation.py          ReLU/ReLU6 keeping one bit per element for backward
    conv_passes.py                the frozen conv's forward and input-gradient passes
    memory_order.py               NCHW and channels_last as the kernels see them
    reference.py                  the pure-PyTorch reference of the adaptor
    _extension.py                 loads da2ext._C; which backend runs (backend()); what the build
                                  recorded (recorded_build_info, build_mismatch)
    _validation.py                the checks of a feature map against the adaptor's parameters
    fake_kernels.py               what each op returns, for torch.compile and torch.export

The modules built on these ops are in da2ext.nn and da2ext.lean.
"""
from ._extension import REBUILD_COMMAND, backend, build_mismatch, kernels_available, recorded_build_info, warn_fallback
from .packed_activation import packed_activation, packed_relu, packed_relu6
from .residual_attention import residual_attention

__all__ = ["REBUILD_COMMAND", "backend", "build_mismatch", "kernels_available", "packed_activation", "packed_relu",
           "packed_relu6", "recorded_build_info", "residual_attention", "warn_fallback"]
