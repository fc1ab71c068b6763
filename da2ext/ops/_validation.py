"""Input checks with messages that name the argument and what was expected."""
import torch


def check_feature_map(x, channels, parameter, owner):
    """Check that `x` is an (N, C, H, W) feature map fit for an adaptor of `channels`
    channels whose parameters look like `parameter` (same dtype and device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError("{}: input must be a torch.Tensor, got {}".format(owner, type(x).__name__))
    if x.dim() != 4:
        raise ValueError(
            "{}: input must be a 4-D tensor (N, C, H, W), got {}-D with shape {}".format(
                owner, x.dim(), tuple(x.shape)))
    if x.shape[1] != channels:
        raise ValueError("{}: input must have {} channels, got shape {}".format(owner, channels, tuple(x.shape)))
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError("{}: input must have a non-empty spatial size, got shape {}".format(owner, tuple(x.shape)))
    if not x.is_floating_point():
        raise TypeError("{}: input must be a floating-point tensor, got {}".format(owner, x.dtype))
    if x.dtype != parameter.dtype:
        raise TypeError(
            "{}: input dtype {} does not match the adaptor's parameters ({}); convert one to the "
            "other (e.g. adaptor.to({}))".format(owner, x.dtype, parameter.dtype, x.dtype))
    if x.device != parameter.device:
        raise ValueError(
            "{}: input is on {} but the adaptor's parameters are on {}; move one to the other".format(
                owner, x.device, parameter.device))
