"""adapt(): turn a pretrained CNN into a DA2 model (docs/design.md §3, §3a).

The backbone is frozen and rewritten in place so that backward through it keeps
only packed activation bits (frozen_conv.py, frozen_blocks.py); a residual
attention adaptor goes after every block; a new head replaces the classifier.
Trainable: the adaptors, the frozen BNs' shifts and the head, each switchable.
The model keeps its own class and forward, so everything that worked on it
(torch.save of its state_dict, hooks, timm's forward_features) still does.
"""
import collections
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.adaptor import ResidualAttentionAdaptor
from ..ops.attention_branch import MAX_RANK
from ..ops.reference import ResidualAttentionAdaptor as ReferenceResidualAttentionAdaptor
from .adaptor_placement import keep_adaptors_up_to_stride
from .late_branches import add_late_branches
from .frozen_blocks import InferenceOnly, block_out_channels, freeze_block, freeze_conv_bn_act
from .frozen_conv import FrozenConvBNAct
from .generic_adapt import adapt_generic, classifier_name
from .lean_max_pool import LeanMaxPool2d
from .recomputed_block import KEEP_DTYPES, RecomputedBlock
from .submodules import replace_submodule
from .trainable_tail import TAIL_STATISTICS, TrainableTail, largest_tail_within_budget

__all__ = ["AdaptedBlock", "Head", "adapt", "head_in_features", "replace_head", "supported_family"]

_BACKBONE_DTYPES = (torch.float32, torch.float16, torch.float64)


class Head(nn.Linear):
    """The new classifier: a Linear that casts its input to its own dtype (a float16
    backbone feeds a float32 head)."""

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class AdaptedBlock(nn.Module):
    """A frozen block followed by its residual attention adaptor, and beside it,
    where adapt() puts one (branch_width), a low-rank branch on the block's input
    added to its output. The block always computes its inference behaviour,
    whatever model.train() says, unless it is part of a trainable tail (which
    decides for itself); adaptor and branch run in their own dtype (float32 after a
    float16 backbone)."""

    def __init__(self, block, adaptor, branch=None):
        super(AdaptedBlock, self).__init__()
        self.block = block
        self.adaptor = adaptor
        self.branch = branch

    def train(self, mode=True):
        super(AdaptedBlock, self).train(mode)
        if isinstance(self.block, TrainableTail):
            self.block.train(mode)
        else:
            self.block.eval()
        return self

    def forward(self, x):
        if self.branch is None:
            y = self.block(x)
        else:  # the branch reads x before the block runs, so that nothing the block does to x can change it
            side = self.branch(x.to(self.branch.up.weight.dtype))
            y = self.block(x)
            # A 1 x 1 side (the last stage at small inputs) is added by broadcasting: bilinear
            # resizing of one value gives it everywhere, and an exported graph then needs no
            # Resize and no shape arithmetic for it.
            if tuple(side.shape[-2:]) not in (tuple(y.shape[-2:]), (1, 1)):
                side = self.branch.upsample(side, y.shape[-2:])
            y = y + side.to(y.dtype)
        if self.adaptor is None:
            return y
        dtype = self.adaptor.gamma.dtype
        if y.dtype == dtype:
            return self.adaptor(y)
        return self.adaptor(y.to(dtype)).to(y.dtype)  # casts keep nothing for backward


def _input_in_backbone_order(cpu_channels_last, module, inputs):
    """Forward pre-hook of a lean model: puts a 4-D image batch in the memory order
    the lean backbone keeps from there on (ops/memory_order.py). On the CPU that is
    channels_last where `cpu_channels_last` (oneDNN's frozen convs then need no
    reorders; NCHW inputs are fine too otherwise). On CUDA it is NCHW: cuDNN would
    carry a channels_last batch through, and the CUDA adaptor kernels take NCHW."""
    if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() != 4:
        return None
    x = inputs[0]
    if x.device.type == "cpu":
        if not cpu_channels_last:
            return None
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()
    return (x,) + tuple(inputs[1:])


def remove_memory_order_hook(model):
    """Take _input_in_backbone_order off `model` (a copy of a lean model that will run
    standard ops only: they take either order). Returns how many hooks were removed."""
    hooks = model._forward_pre_hooks
    found = [key for key, hook in hooks.items()
             if isinstance(hook, functools.partial) and hook.func is _input_in_backbone_order]
    for key in found:
        del hooks[key]
    return len(found)


def supported_family(model):
    """"resnet", "mobilenet_v2" (torchvision), "timm_efficientnet" (timm's
    EfficientNet class: tf_efficientnet_lite*, mobilenetv2_*, ...), "timm_resnet"
    (timm's ResNet class: resnet18..152, resnext*, ...) or None."""
    import torchvision
    if isinstance(model, torchvision.models.ResNet):
        return "resnet"
    if isinstance(model, torchvision.models.MobileNetV2):
        return "mobilenet_v2"
    cls = type(model)
    if cls.__name__ == "EfficientNet" and cls.__module__.startswith("timm."):
        return "timm_efficientnet"
    if cls.__name__ == "ResNet" and cls.__module__.startswith("timm."):
        return "timm_resnet"
    return None


class _Rewriter(object):
    """Carries adapt()'s settings through one model's rewrite."""

    def __init__(self, mode, reduction, adaptors, shifts, backbone_dtype, lean, rank=1, tail_start=None,
                 tail_statistics="final", recompute_dtype=None):
        self.mode = mode
        self.recompute_dtype = recompute_dtype
        # Blocks from index tail_start on (counted in forward order) train in full; None: no tail.
        self.tail_start = tail_start
        # "final" starts every tail module frozen; adapt() then gives the last one's last BN batch statistics
        self.tail_module_statistics = "batch" if tail_statistics == "batch" else "frozen"
        self.blocks_seen = 0
        self.reduction = reduction
        self.rank = rank
        self.adaptors = adaptors
        self.shifts = shifts
        self.dtype = backbone_dtype
        self.lean = lean
        self.unchanged = []  # (name, reason)

    def _train_bn_shifts(self, module):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and m.bias is not None:
                m.bias.requires_grad_(self.shifts)

    def _unchanged(self, name, module, reason=None):
        if reason is not None:
            self.unchanged.append((name, "{}: {}".format(type(module).__name__, reason)))
        self._train_bn_shifts(module)
        return InferenceOnly(module)

    def _recomputed(self, module):
        """A frozen module with no packed-bit form (SiLU, hardswish, squeeze-excitation,
        ...): it keeps its input and runs again in backward (RecomputedBlock)."""
        self._train_bn_shifts(module)
        return RecomputedBlock(module, keep_dtype=self.recompute_dtype)

    def conv_bn_act(self, conv, bn, activation, layers):
        """A stem or head conv-BN-activation, lean: the module replacing `conv` (the
        caller replaces bn and activation by Identity). `layers`: the three as one
        module, which keeps the conv's input and recomputes where the activation has
        no packed-bit form (a SiLU, a hardswish)."""
        try:
            return freeze_conv_bn_act(conv, bn, activation, self.shifts, self.dtype)
        except NotImplementedError:
            return self._recomputed(layers)

    def conv_norm_activation(self, name, seq):
        """torchvision's Conv2dNormActivation as a unit."""
        if not self.lean:
            return self._unchanged(name, seq)
        try:
            return freeze_block(seq, self.shifts, self.dtype)
        except NotImplementedError:
            return self._recomputed(seq)

    def in_tail(self):
        """Whether the final conv (after every block) is part of a trainable tail."""
        return self.tail_start is not None

    def tail(self, module):
        """`module` trained in full, as part of the tail."""
        return TrainableTail(module, statistics=self.tail_module_statistics)

    def block(self, name, block):
        channels = None
        try:
            channels = block_out_channels(block)
        except NotImplementedError:
            pass
        index, self.blocks_seen = self.blocks_seen, self.blocks_seen + 1
        if self.tail_start is not None and index >= self.tail_start:
            frozen = self.tail(block)
        elif not self.lean:
            frozen = self._unchanged(name, block)
        else:
            try:
                frozen = freeze_block(block, self.shifts, self.dtype)
            except NotImplementedError:
                frozen = self._recomputed(block)
        adaptor = None
        if self.adaptors and channels is not None:
            adaptor_class = ResidualAttentionAdaptor if self.lean else ReferenceResidualAttentionAdaptor
            adaptor = adaptor_class(channels, reduction=self.reduction, mode=self.mode, rank=self.rank)
        elif self.adaptors:
            self.unchanged.append((name, "no adaptor after it: its output channels are unknown"))
        return AdaptedBlock(frozen, adaptor)


def _count_blocks(model, family):
    """How many blocks get an adaptor, in forward order (what train_last counts)."""
    if family in ("resnet", "timm_resnet"):
        return sum(len(getattr(model, name)) for name in ("layer1", "layer2", "layer3", "layer4"))
    if family == "mobilenet_v2":
        from torchvision.models.mobilenetv2 import InvertedResidual
        return sum(isinstance(unit, InvertedResidual) for unit in model.features)
    return sum(len(stage) for stage in model.blocks)


def _named_sequential(**layers):
    """nn.Sequential of the layers, in the order given (conv, bn, act), under those names."""
    order = ("stem", "conv", "bn", "act")
    return nn.Sequential(collections.OrderedDict((name, layers[name]) for name in order if name in layers))


def _adapt_resnet(model, rewriter, activation_name="relu"):
    """torchvision's ResNet (stem activation `relu`) or timm's (`act1`; a deep stem,
    conv1 a Sequential, is recomputed from the image)."""
    if rewriter.lean:
        activation = getattr(model, activation_name)
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = rewriter.conv_bn_act(model.conv1, model.bn1, activation,
                                               _named_sequential(conv=model.conv1, bn=model.bn1, act=activation))
        else:  # a deep stem (a Sequential of conv-BN-activations): it keeps only the image
            model.conv1 = rewriter._recomputed(_named_sequential(stem=model.conv1, bn=model.bn1, act=activation))
        model.bn1 = nn.Identity()
        setattr(model, activation_name, nn.Identity())
        if isinstance(model.maxpool, nn.MaxPool2d) and not model.maxpool.return_indices:
            model.maxpool = LeanMaxPool2d.from_module(model.maxpool)
    else:
        if not isinstance(model.conv1, nn.Conv2d):  # a deep stem's BNs: eval mode, shifts trained, as lean
            model.conv1 = rewriter._unchanged("conv1", model.conv1)
        model.bn1 = rewriter._unchanged("bn1", model.bn1)
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, layer_name)
        for i in range(len(layer)):
            layer[i] = rewriter.block("{}.{}".format(layer_name, i), layer[i])
    return model.fc.in_features


def _adapt_torchvision_mobilenet_v2(model, rewriter):
    from torchvision.models.mobilenetv2 import InvertedResidual
    for i in range(len(model.features)):
        unit = model.features[i]
        name = "features.{}".format(i)
        if isinstance(unit, InvertedResidual):
            model.features[i] = rewriter.block(name, unit)
        elif i == len(model.features) - 1 and rewriter.in_tail():  # the final 1x1 conv
            model.features[i] = rewriter.tail(unit)
        else:
            model.features[i] = rewriter.conv_norm_activation(name, unit)
    return model.classifier[-1].in_features


def _adapt_timm_efficientnet(model, rewriter):
    for conv_name, bn_name in (("conv_stem", "bn1"), ("conv_head", "bn2")):
        conv, bn = getattr(model, conv_name), getattr(model, bn_name)
        if conv_name == "conv_head" and rewriter.in_tail():
            model.conv_head, model.bn2 = rewriter.tail(nn.Sequential(conv, bn)), nn.Identity()
            continue
        if not rewriter.lean:
            setattr(model, bn_name, rewriter._unchanged(bn_name, bn))
            continue
        # timm's BatchNormAct2d applies the activation itself
        setattr(model, conv_name, rewriter.conv_bn_act(conv, bn, getattr(bn, "act", None),
                                                       _named_sequential(conv=conv, bn=bn)))
        setattr(model, bn_name, nn.Identity())
    for i, stage in enumerate(model.blocks):
        for j in range(len(stage)):
            stage[j] = rewriter.block("blocks.{}.{}".format(i, j), stage[j])
    return model.num_features


def head_in_features(model):
    """Width of the features the classifier of a model reads (for a model of
    unknown blocks, its last nn.Linear's in_features)."""
    family = supported_family(model)
    if family is None:
        return _generic_classifier(model)[1].in_features
    if family in ("resnet", "timm_resnet"):
        return model.fc.in_features
    if family == "mobilenet_v2":
        return model.classifier[-1].in_features
    if family == "timm_efficientnet":
        return model.num_features
    raise TypeError("unsupported model {}".format(type(model).__name__))


def _generic_classifier(model):
    """(name, module) of the classifier of a model of unknown blocks: its last nn.Linear."""
    name = classifier_name(model)
    if name is None:
        raise TypeError("{} has no nn.Linear classifier to replace".format(type(model).__name__))
    return name, model.get_submodule(name)


def replace_head(model, num_classes):
    """Put a new, trainable Head of `num_classes` in place of the classifier of a
    model (a supported family's, or any other model's last nn.Linear); returns it."""
    family = supported_family(model)
    head = Head(head_in_features(model), num_classes).to(next(model.parameters()).device)
    if family is None:
        replace_submodule(model, _generic_classifier(model)[0], head)
    else:
        _set_head(model, family, head)
    return head


def _set_head(model, family, head):
    if family == "resnet":
        model.fc = head
    elif family == "timm_resnet":
        model.fc = head
        model.num_classes = head.out_features
    elif family == "mobilenet_v2":
        model.classifier[-1] = head
    else:
        model.classifier = head
        model.num_classes = head.out_features


def _input_channels(model):
    """The channels of the model's input: its first conv's (3 where it has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def _place_adaptors(model, adaptor_max_stride, in_channels, named=None):
    """adapt()'s placement: every adaptor stays (None), or those after blocks of output
    stride <= adaptor_max_stride (adaptor_placement.py). named: (name, module with an
    .adaptor) pairs, by default the model's AdaptedBlocks. Records
    model.da2ext_adaptor_strides, {block name: stride} of the blocks that keep an adaptor
    (None: no placement asked)."""
    if named is None:
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedBlock)]
    named = [(name, m) for name, m in named if m.adaptor is not None]
    if adaptor_max_stride is None or not named:
        model.da2ext_adaptor_strides = None if adaptor_max_stride is None else {}
        return
    model.da2ext_adaptor_strides = keep_adaptors_up_to_stride(model, named, adaptor_max_stride, in_channels)


def _adapt_unknown_family(model, num_classes, mode, reduction, adaptors, shifts, backbone_dtype, lean, rank,
                          train_last, memory_budget_mib, recompute_dtype, adaptor_max_stride, in_channels):
    """adapt() for a model of blocks it does not know: generic_adapt.py."""
    if train_last or memory_budget_mib is not None:
        raise ValueError("adapt: a trainable tail (train_last, memory_budget_mib) needs a model whose blocks adapt() "
                         "knows (torchvision ResNet or MobileNetV2, timm ResNet or EfficientNet), got {}".format(
                             type(model).__name__))
    if backbone_dtype != torch.float32:
        raise ValueError("adapt: backbone_dtype {} needs a model whose blocks adapt() knows; {} is adapted "
                         "generically, in its own dtype".format(backbone_dtype, type(model).__name__))
    model, stages, placed, notes = adapt_generic(model, num_classes, Head, mode, reduction, adaptors, shifts, lean,
                                                 rank, recompute_dtype)
    _place_adaptors(model, adaptor_max_stride, in_channels, placed)
    if model.da2ext_adaptor_strides is not None:
        stages = [name for name in stages if name in model.da2ext_adaptor_strides]
    model._da2ext_adapted = True
    model.da2ext_tail = {"train_last": 0}
    model.da2ext_stages = stages
    warnings.warn("da2ext.adapt: {}; adaptors after {} stage(s): {}".format(
        "; ".join(notes), len(stages) if adaptors else 0, ", ".join(stages) if adaptors else "none"), stacklevel=3)
    return model.train()


def adapt(model, num_classes, mode="add", reduction=16, adaptors=True, shifts=True, backbone_dtype=torch.float32,
          lean=True, cpu_channels_last=True, rank=1, train_last=0, memory_budget_mib=None,
          budget_input_shape=(8, 3, 224, 224), tail_statistics="final", recompute_dtype=None,
          adaptor_max_stride=None, branch_width=None, branch_min_stride=32):
    """Freeze `model` and rewrite it for DA2, in place; returns it.

    model: torchvision ResNet (18..152, wide, ResNeXt) or MobileNetV2, or timm's
        ResNet class (resnet18..152, resnext*) or EfficientNet class
        (tf_efficientnet_lite0..4, efficientnet_b*, mobilenetv2_*), with whatever
        weights the user has. Its BN layers' running statistics are used (eval
        mode), folded into the convs once, here. ReLU blocks keep packed bits; a
        block with SiLU, squeeze-excitation or a deep stem keeps its input and is
        recomputed in backward (RecomputedBlock). Any other CNN with an nn.Linear
        classifier is adapted generically (lean/generic_adapt.py): the blocks it
        knows lean, the others recomputed, adaptors after its stages
        (model.da2ext_stages), a warning; no trainable tail or float16 there.
    num_classes: the new head's size.
    mode, reduction, rank: the adaptors' (see ResidualAttentionAdaptor); rank k
        sums k channel-gate x spatial-map products (DA2's method uses 1).
    adaptors: put an adaptor after every block (False: none, for ablations).
    adaptor_max_stride: None puts one after every block; an int s only after the
        blocks whose output map is at most s times smaller than the input (the
        early, high-resolution stages; strides traced by one forward pass at
        224 x 224, recorded in model.da2ext_adaptor_strides). DA2's method uses 8:
        late adaptors fit a small domain's training images without generalising
        (docs/design.md §2, "Rank and placement").
    branch_width: None adds no branch; an int w puts a low-rank convolution branch
        of w inner channels (da2ext.nn.LowRankConvBranch, parameter group
        "branches") beside every block whose output stride is at least
        branch_min_stride (traced as for adaptor_max_stride; recorded in
        model.da2ext_branch_strides). DA2's method uses w = 64 beside the blocks of
        stride 32: the frozen deep stages cap a far domain, and their maps are small
        (docs/design.md §2, "Late branches"). Models whose blocks adapt() knows only.
    shifts: train the frozen BNs' shifts (beta), the §3a recipe.
    backbone_dtype: float32, or float16 to hold the frozen backbone in half
        precision (Jetson) while adaptors, shifts and head stay float32;
        float64 for gradient checks.
    lean: False keeps the original (plainly frozen, eval-mode BN) modules and uses
        the eager reference adaptor: the da2_eager baseline, same maths, plain
        autograd memory.
    cpu_channels_last: with `lean`, run the backbone in channels_last on the
        CPU (a forward pre-hook converts the model's input; every lean module
        keeps its input's memory order). oneDNN's frozen convolutions need no
        layout reorders there, which makes the CPU step faster (README, "What a
        training step keeps"). Same values either way. CUDA runs NCHW (a
        channels_last batch is made NCHW there).

    train_last: k > 0 trains the last k blocks (and the final 1x1 conv of
        MobileNetV2 and EfficientNet) in full: convs, BN scales and shifts, in
        plain autograd (parameter group "tail"). Everything before stays lean.
        Their activations are small (deep maps); their gradients and Adam state
        are what they cost.
    tail_statistics: which of the tail's BNs normalise with batch statistics
        in training, each domain keeping its own running statistics (saved in
        its file): "final" (the last BN of the tail, the one nearest the head;
        the others keep the pretrained statistics), "batch" (every BN of the
        tail, as fine-tuning does) or "frozen" (none). "final" learned most in
        benchmarks/results/training_recipe.md; see da2ext.lean.trainable_tail.
    memory_budget_mib: instead of train_last, the largest tail whose training
        memory (kept for backward + gradients + Adam state, measured by one
        profile_step on random data of `budget_input_shape`, (N, C, H, W))
        fits in this many MiB; the choice is in model.da2ext_tail.

    recompute_dtype: a block whose nonlinearities need more than a sign bit for
        backward (SiLU, hardswish, GELU, squeeze-excitation, LayerNorm) keeps only
        its input and runs again in backward (RecomputedBlock): None keeps that
        input as it is (gradients plain autograd's, to float rounding), torch.float16 or
        torch.bfloat16 in half the bytes (gradients with that rounding,
        docs/design.md §3 measures it).

    A module it can neither rewrite nor recompute runs unchanged (frozen, eval
    mode, plain autograd). Trainable afterwards: exactly the adaptors, the shifts
    (if `shifts`) and the head; see da2ext.trainable_parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("adapt: model must be an nn.Module, got {}".format(type(model).__name__))
    family = supported_family(model)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError("adapt: num_classes must be a positive int, got {!r}".format(num_classes))
    if mode not in ("add", "mul"):
        raise ValueError('adapt: mode must be "add" or "mul", got {!r}'.format(mode))
    if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
        raise ValueError("adapt: reduction must be a positive int, got {!r}".format(reduction))
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise ValueError("adapt: rank must be an int from 1 to {}, got {!r}".format(MAX_RANK, rank))
    for switch, value in (("adaptors", adaptors), ("shifts", shifts), ("lean", lean),
                          ("cpu_channels_last", cpu_channels_last)):
        if not isinstance(value, bool):
            raise TypeError("adapt: {} must be True or False, got {!r}".format(switch, value))
    if backbone_dtype not in _BACKBONE_DTYPES:
        raise ValueError("adapt: backbone_dtype must be one of {}, got {}".format(_BACKBONE_DTYPES, backbone_dtype))
    if not lean and backbone_dtype != torch.float32:
        raise ValueError("adapt: backbone_dtype {} needs lean=True".format(backbone_dtype))
    if getattr(model, "_da2ext_adapted", False):
        raise ValueError("adapt: this model was adapted already")
    if tail_statistics not in TAIL_STATISTICS:
        raise ValueError("adapt: tail_statistics must be one of {}, got {!r}".format(
            ", ".join('"{}"'.format(v) for v in TAIL_STATISTICS), tail_statistics))
    if not isinstance(train_last, int) or isinstance(train_last, bool) or train_last < 0:
        raise ValueError("adapt: train_last must be an int >= 0, got {!r}".format(train_last))
    if recompute_dtype not in KEEP_DTYPES:
        raise ValueError("adapt: recompute_dtype must be one of {}, got {!r}".format(KEEP_DTYPES, recompute_dtype))
    if recompute_dtype is not None and not lean:
        raise ValueError("adapt: recompute_dtype {} needs lean=True".format(recompute_dtype))
    if adaptor_max_stride is not None and (isinstance(adaptor_max_stride, bool) or
                                           not isinstance(adaptor_max_stride, int) or adaptor_max_stride < 1):
        raise ValueError("adapt: adaptor_max_stride must be None or an int >= 1, got {!r}".format(adaptor_max_stride))
    for option, value in (("branch_width", branch_width), ("branch_min_stride", branch_min_stride)):
        if (value is not None or option == "branch_min_stride") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError("adapt: {} must be {}an int >= 1, got {!r}".format(
                option, "None or " if option == "branch_width" else "", value))
    in_channels = _input_channels(model)
    if family is None and branch_width is not None:
        raise ValueError("adapt: branch_width needs a model whose blocks adapt() knows (torchvision ResNet or "
                         "MobileNetV2, timm ResNet or EfficientNet), got {}".format(type(model).__name__))
    if family is None:
        return _adapt_unknown_family(model, num_classes, mode, reduction, adaptors, shifts, backbone_dtype, lean,
                                     rank, train_last, memory_budget_mib, recompute_dtype, adaptor_max_stride,
                                     in_channels)
    blocks = _count_blocks(model, family)
    if train_last > blocks:
        raise ValueError("adapt: train_last={} but the model has {} blocks".format(train_last, blocks))
    if (train_last or memory_budget_mib is not None) and backbone_dtype == torch.float16:
        # Adam on float16 weights loses its small updates; the tail trains in the model's own dtype
        raise ValueError("adapt: a trainable tail needs backbone_dtype float32 (or float64), got {}".format(
            backbone_dtype))
    if memory_budget_mib is not None:
        if train_last:
            raise ValueError("adapt: give train_last or memory_budget_mib, not both")
        if isinstance(memory_budget_mib, bool) or not isinstance(memory_budget_mib, (int, float)) or \
                not 0 < memory_budget_mib < float("inf"):
            raise ValueError("adapt: memory_budget_mib must be a positive number, got {!r}".format(memory_budget_mib))
        shape = tuple(budget_input_shape)
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError("adapt: budget_input_shape must be 4 positive ints (N, C, H, W), got {!r}".format(
                budget_input_shape))
        settings = dict(num_classes=num_classes, mode=mode, reduction=reduction, adaptors=adaptors, shifts=shifts,
                        lean=lean, cpu_channels_last=cpu_channels_last, rank=rank,
                        tail_statistics=tail_statistics, recompute_dtype=recompute_dtype,
                        adaptor_max_stride=adaptor_max_stride, branch_width=branch_width,
                        branch_min_stride=branch_min_stride)
        train_last, measured = largest_tail_within_budget(
            model, lambda m, k: adapt(m, train_last=k, **settings), blocks, memory_budget_mib, shape)
        model = adapt(model, train_last=train_last, **settings)
        model.da2ext_tail = {"train_last": train_last, "memory_budget_mib": memory_budget_mib,
                             "budget_input_shape": list(shape), "training_bytes": measured[train_last],
                             "fits": measured[train_last] <= memory_budget_mib * 2.0 ** 20,
                             "measured": dict((str(k), v) for k, v in sorted(measured.items()))}
        return model

    device = next(model.parameters()).device
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rewriter = _Rewriter(mode, reduction, adaptors, shifts, backbone_dtype, lean, rank,
                         tail_start=blocks - train_last if train_last else None,
                         tail_statistics=tail_statistics, recompute_dtype=recompute_dtype)
    with torch.no_grad():
        in_features = {"resnet": _adapt_resnet, "mobilenet_v2": _adapt_torchvision_mobilenet_v2,
                       "timm_efficientnet": _adapt_timm_efficientnet,
                       "timm_resnet": functools.partial(_adapt_resnet, activation_name="act1")}[family](model, rewriter)
    tails = [m for m in model.modules() if isinstance(m, TrainableTail)]  # in forward order
    if tails and tail_statistics == "final":
        tails[-1].statistics = "last"  # applied by the model.train() below
    _set_head(model, family, Head(in_features, num_classes))
    model.to(device)
    model._da2ext_adapted = True
    model.da2ext_tail = {"train_last": train_last}
    if lean:
        model.register_forward_pre_hook(functools.partial(_input_in_backbone_order, cpu_channels_last))
        if cpu_channels_last and device.type == "cpu":
            for module in model.modules():
                if isinstance(module, FrozenConvBNAct):
                    module.hold_weight_in(torch.channels_last)
    _place_adaptors(model, adaptor_max_stride, in_channels)
    model.da2ext_branch_strides = None
    if branch_width is not None:
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaptedBlock)]
        head_dtype = next(m for m in model.modules() if isinstance(m, Head)).weight.dtype  # as the adaptors'
        model.da2ext_branch_strides = add_late_branches(model, named, branch_width, branch_min_stride, in_channels,
                                                        head_dtype)
    if rewriter.unchanged:
        warnings.warn("da2ext.adapt: {} module(s) run unchanged (frozen, eval mode, plain autograd: they keep "
                      "their activations for backward): {}".format(
                          len(rewriter.unchanged), "; ".join("{} ({})".format(n, r) for n, r in rewriter.unchanged)),
                      stacklevel=2)
    return model.train()
