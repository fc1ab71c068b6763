"""adapt() for a model whose blocks it does not know (docs/design.md §3, "Models of
unknown blocks").

adapt() rewrites the blocks of the families it knows so that backward keeps only
packed bits. For any other CNN (a RegNet, a ConvNeXt, a MobileNetV3, a model of
one's own) it does what it can without knowing the blocks:

- everything is frozen as it is and runs in eval mode whatever model.train()
  says (each top-level module wrapped in InferenceOnly), in plain autograd: the
  frozen modules keep their activations for backward, as PyTorch keeps them;
- a residual attention adaptor follows each stage: the children of the model's
  main trunk (the Sequential or ModuleList, outside the classifier, that holds
  most of the weights), or else its top-level modules that have weights and
  give a feature map; the adaptors are the fused op and keep little;
- a new Head replaces the classifier (the model's last nn.Linear);
- the BN shifts train, as in the DA2 recipe (a LayerNorm's are left frozen).

kept_bytes_by_part() then says, part by part, what one training step keeps for
backward, which is what a user needs to see where the memory goes.
"""
import torch
from torch import nn

from ..nn.adaptor import ResidualAttentionAdaptor
from ..ops.attention_branch import AttentionBranch
from ..ops.reference import ResidualAttentionAdaptor as ReferenceResidualAttentionAdaptor
from .frozen_blocks import FrozenBlock, InferenceOnly, freeze_block
from .insert_adaptors import AdaptorAfter, feature_map_channels
from .submodules import replace_submodule

__all__ = ["adapt_generic", "classifier_name", "stage_names"]

# The example inputs a forward tries to learn the stages' output shapes (a model may need more than 64 px).
_EXAMPLE_SIZES = (64, 224)


def _parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def classifier_name(model):
    """The name of the model's last nn.Linear (its classifier), or None."""
    names = [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _inside(name, parent):
    return name == parent or name.startswith(parent + ".")


def stage_names(model, classifier):
    """The modules an adaptor follows: the children with weights of the model's
    trunk (the top-level Sequential or ModuleList of at least 3 modules, not
    holding the classifier, with at least half of the weights outside the
    classifier), or else the top-level modules with weights that do not hold the
    classifier."""
    top = [(name, m) for name, m in model.named_children() if not _inside(classifier, name)]
    weights = sum(_parameter_count(m) for _, m in top)
    trunks = [(name, m) for name, m in top if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 3]
    if trunks:
        name, trunk = max(trunks, key=lambda item: _parameter_count(item[1]))
        if 2 * _parameter_count(trunk) >= weights:
            # Modules without weights (an activation, a pool) compute nothing to adapt.
            return ["{}.{}".format(name, child) for child, m in trunk.named_children() if _parameter_count(m) > 0]
    return [name for name, m in top if _parameter_count(m) > 0]


def _feature_map_channels(model, names):
    """{name: C} for the modules among `names` whose output is an N x C x H x W
    tensor, from one forward without autograd (64 px, else 224 px)."""
    modules = dict(model.named_modules())
    chosen = [(name, modules[name]) for name in names]
    parameter = next(model.parameters())
    last_error = None
    for size in _EXAMPLE_SIZES:
        example = torch.zeros(1, 3, size, size, dtype=parameter.dtype, device=parameter.device)
        try:
            return feature_map_channels(model, chosen, example)
        except RuntimeError as error:  # too small an input for this model: try the next size
            last_error = error
    raise ValueError("adapt: a forward of a 1 x 3 x {} x {} batch through {} failed, so its stages' outputs are "
                     "unknown: {}".format(_EXAMPLE_SIZES[-1], _EXAMPLE_SIZES[-1], type(model).__name__, last_error))


def _make_lean(module, train_shift, dtype, made):
    """Replace, below `module`, every block freeze_block knows (a ResNet or RegNet-X
    block, a conv-BN-ReLU Sequential, ...) by its lean FrozenBlock, which computes
    the same; descend into the others. `made`: the replaced blocks' class names, appended to."""
    for name, child in list(module.named_children()):
        if isinstance(child, (AttentionBranch, FrozenBlock)):
            continue
        try:
            frozen = freeze_block(child, train_shift=train_shift, dtype=dtype)
        except NotImplementedError:
            _make_lean(child, train_shift, dtype, made)
            continue
        setattr(module, name, frozen)
        made.append(type(child).__name__)


def adapt_generic(model, num_classes, head_class, mode, reduction, adaptors, shifts, lean, rank):
    """Freeze `model`, make lean what freeze_block knows (where `lean`), put an
    adaptor after each of its stages and a new head_class(in_features,
    num_classes) in place of its classifier, in place. Returns (model, the stages
    that got an adaptor, the notes adapt() warns with)."""
    classifier = classifier_name(model)
    if classifier is None:
        raise TypeError("adapt: {} is not a model adapt() knows (torchvision ResNet or MobileNetV2, timm ResNet or "
                        "EfficientNet), and it has no nn.Linear classifier to replace, so it cannot be adapted "
                        "generically either".format(type(model).__name__))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = stage_names(model, classifier)
    channels = _feature_map_channels(model, candidates)
    stages = [name for name in candidates if name in channels]
    parameter = next(model.parameters())
    device = parameter.device
    # The adaptors and head compute in the model's precision (float64 for gradient checks), float32 under it.
    dtype = parameter.dtype if parameter.dtype in (torch.float32, torch.float64) else torch.float32
    if adaptors:
        adaptor_class = ResidualAttentionAdaptor if lean else ReferenceResidualAttentionAdaptor
        for name in stages:
            adaptor = adaptor_class(channels[name], reduction=reduction, mode=mode, rank=rank)
            adaptor = adaptor.to(device=device, dtype=dtype)
            replace_submodule(model, name, AdaptorAfter(model.get_submodule(name), adaptor))
    made_lean = []
    if lean:
        _make_lean(model, shifts, dtype, made_lean)
    lean_part = "{} block(s) made lean ({}), every other module".format(
        len(made_lean), ", ".join(sorted(set(made_lean)))) if made_lean else "every module"
    notes = ["{} is not a family adapt() knows: {} runs frozen in plain autograd (keeping its activations for "
             "backward; da2ext.kept_bytes_by_part says how much)".format(type(model).__name__, lean_part)]
    if not stages:
        notes.append("no adaptor: none of {} gives an N x C x H x W feature map".format(", ".join(candidates)))
    in_features = model.get_submodule(classifier).in_features
    replace_submodule(model, classifier, head_class(in_features, num_classes).to(device=device, dtype=dtype))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None:
            m.bias.requires_grad_(shifts)
    # Frozen BNs, dropouts and drop-paths anywhere must keep their inference behaviour in model.train().
    for name, child in list(model.named_children()):
        setattr(model, name, InferenceOnly(child))
    return model, stages, notes
