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
from .recomputed_block import RecomputedBlock
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
    """({name: C} for the modules among `names` whose output is an N x C x H x W
    tensor, the input size that showed it), from one forward without autograd
    (64 px, else 224 px)."""
    modules = dict(model.named_modules())
    chosen = [(name, modules[name]) for name in names]
    parameter = next(model.parameters())
    last_error = None
    for size in _EXAMPLE_SIZES:
        example = torch.zeros(1, 3, size, size, dtype=parameter.dtype, device=parameter.device)
        try:
            return feature_map_channels(model, chosen, example), size
        except RuntimeError as error:  # too small an input for this model: try the next size
            last_error = error
    raise ValueError("adapt: a forward of a 1 x 3 x {} x {} batch through {} failed, so its stages' outputs are "
                     "unknown: {}".format(_EXAMPLE_SIZES[-1], _EXAMPLE_SIZES[-1], type(model).__name__, last_error))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _recompute_stems(model, keep_dtype, size):
    """Make each top-level conv followed by a BN (timm's conv_stem, bn1) one
    RecomputedBlock, which keeps the conv's input (the image: 3 channels) instead of
    the BN's (the stem's width), where a forward of a random 1 x 3 x size x size
    batch shows the swap computes exactly the same (the BN reads the conv's output
    and nothing else does). Returns the fused pairs' class names."""
    children = list(model.named_children())
    pairs = [(conv, norm) for (conv, conv_module), (norm, norm_module) in zip(children, children[1:])
             if type(conv_module) is nn.Conv2d and isinstance(norm_module, nn.modules.batchnorm._BatchNorm)]
    if not pairs:
        return []
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, size, size, generator=generator).to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        before = model(example)
    fused = []
    for conv, norm in pairs:
        conv_module, norm_module = getattr(model, conv), getattr(model, norm)
        setattr(model, conv, RecomputedBlock(nn.Sequential(conv_module, norm_module), keep_dtype=keep_dtype))
        setattr(model, norm, nn.Identity())
        with torch.no_grad():
            after = model(example)
        if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and torch.equal(before, after):
            fused.append("{}+{}".format(type(conv_module).__name__, type(norm_module).__name__))
        else:  # the model does something between them, or with the conv's output: leave them apart
            setattr(model, conv, conv_module)
            setattr(model, norm, norm_module)
    return fused


def _holds_blocks(module):
    """Whether `module` holds a list of blocks: a module (itself or below it) with two
    or more children of one class that are blocks, that is, not containers and with
    weights in children of their own (a Bottleneck, an inverted residual; not a
    BatchNormAct2d, whose children are its activation and dropout)."""
    def is_block(m):
        return not isinstance(m, _CONTAINERS) and any(any(True for _ in c.parameters()) for c in m.children())

    for m in module.modules():
        kinds = [type(c) for c in m.children() if is_block(c)]
        if any(kinds.count(kind) >= 2 for kind in set(kinds)):
            return True
    return False


def _is_recompute_unit(module, head_class):
    """Whether `module` is one frozen block to keep its input for and recompute in
    backward (RecomputedBlock): it has weights, holds nothing da2ext trains or
    already made lean, and is one block, not a list of them: a Sequential of
    layers (a conv-norm-activation, a downsample), or a module that holds no list
    of blocks (an inverted residual, a ConvNeXt block, a squeeze-excitation). A
    single layer is not: recomputing it would keep the input plain autograd keeps."""
    if not any(True for _ in module.children()) or not any(True for _ in module.parameters()):
        return False
    kept_apart = (AttentionBranch, FrozenBlock, RecomputedBlock, AdaptorAfter, head_class)
    if any(isinstance(m, kept_apart) for m in module.modules()):
        return False
    if isinstance(module, nn.Sequential):
        return all(not any(True for _ in child.children()) for child in module.children())
    if isinstance(module, _CONTAINERS):  # a ModuleList or ModuleDict has no forward of its own
        return False
    return not _holds_blocks(module)


def _make_lean(module, train_shift, dtype, head_class, keep_dtype, made, recomputed):
    """Replace, below `module`, every block freeze_block knows (a ResNet or RegNet-X
    block, a conv-BN-ReLU Sequential, ...) by its lean FrozenBlock, which computes
    the same, and every other frozen block (_is_recompute_unit) by a RecomputedBlock;
    descend into the rest. `made`, `recomputed`: the replaced blocks' class names, appended to."""
    for name, child in list(module.named_children()):
        if isinstance(child, (AttentionBranch, FrozenBlock, RecomputedBlock)):
            continue
        try:
            frozen = freeze_block(child, train_shift=train_shift, dtype=dtype)
        except NotImplementedError:
            if _is_recompute_unit(child, head_class):
                setattr(module, name, RecomputedBlock(child, keep_dtype=keep_dtype))
                recomputed.append(type(child).__name__)
            else:
                _make_lean(child, train_shift, dtype, head_class, keep_dtype, made, recomputed)
            continue
        setattr(module, name, frozen)
        made.append(type(child).__name__)


def adapt_generic(model, num_classes, head_class, mode, reduction, adaptors, shifts, lean, rank, recompute_dtype=None):
    """Freeze `model`, make lean what freeze_block knows (where `lean`), put an
    adaptor after each of its stages and a new head_class(in_features,
    num_classes) in place of its classifier, in place. Returns (model, the stages
    that got an adaptor, [(stage, its AdaptorAfter)], the notes adapt() warns with)."""
    classifier = classifier_name(model)
    if classifier is None:
        raise TypeError("adapt: {} is not a model adapt() knows (torchvision ResNet or MobileNetV2, timm ResNet or "
                        "EfficientNet), and it has no nn.Linear classifier to replace, so it cannot be adapted "
                        "generically either".format(type(model).__name__))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    candidates = stage_names(model, classifier)
    channels, example_size = _feature_map_channels(model, candidates)
    stages = [name for name in candidates if name in channels]
    parameter = next(model.parameters())
    device = parameter.device
    # The adaptors and head compute in the model's precision (float64 for gradient checks), float32 under it.
    dtype = parameter.dtype if parameter.dtype in (torch.float32, torch.float64) else torch.float32
    placed = []
    if adaptors:
        adaptor_class = ResidualAttentionAdaptor if lean else ReferenceResidualAttentionAdaptor
        for name in stages:
            adaptor = adaptor_class(channels[name], reduction=reduction, mode=mode, rank=rank)
            adaptor = adaptor.to(device=device, dtype=dtype)
            placed.append((name, AdaptorAfter(model.get_submodule(name), adaptor)))
            replace_submodule(model, name, placed[-1][1])
    in_features = model.get_submodule(classifier).in_features
    replace_submodule(model, classifier, head_class(in_features, num_classes).to(device=device, dtype=dtype))
    made_lean, recomputed = [], []
    if lean:
        recomputed.extend(_recompute_stems(model, recompute_dtype, example_size))
        _make_lean(model, shifts, dtype, head_class, recompute_dtype, made_lean, recomputed)
    parts = []
    for kinds, how in ((made_lean, "made lean"), (recomputed, "keeping only their inputs (recomputed in backward)")):
        if kinds:
            parts.append("{} block(s) {} ({})".format(len(kinds), how, ", ".join(sorted(set(kinds)))))
    notes = ["{} is not a family adapt() knows: {} runs frozen in plain autograd (keeping its activations for "
             "backward; da2ext.kept_bytes_by_part says how much)".format(
                 type(model).__name__, "; ".join(parts) + "; every other module" if parts else "every module")]
    if not stages:
        notes.append("no adaptor: none of {} gives an N x C x H x W feature map".format(", ".join(candidates)))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None:
            m.bias.requires_grad_(shifts)
    # Frozen BNs, dropouts and drop-paths anywhere must keep their inference behaviour in model.train().
    for name, child in list(model.named_children()):
        setattr(model, name, InferenceOnly(child))
    return model, stages, placed, notes
