"""What the lean frozen backbone keeps for backward (docs/design.md §1, §3, §4): a frozen
block keeps exactly one packed bit per ReLU/ReLU6 element of the original block, and
the adapted model keeps exactly its masks, the max pool's uint8 offsets, the adaptors'
small tensors and the head's input."""
import copy

import pytest
import torch
from torch import nn

from helpers import (adapt_quietly, features_module, make_original, packed_bytes, randomize_bn, relative_error,
                     relu_output_numels)
from da2ext.lean.adapt import AdaptedBlock
from da2ext.lean.frozen_blocks import FrozenBlock, freeze_block
from da2ext.lean.lean_max_pool import LeanMaxPool2d
from da2ext.profiling import SavedTensorCounter, model_state

torchvision = pytest.importorskip("torchvision")
from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionInvertedResidual  # noqa: E402
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1  # noqa: E402


def _projection(inplanes, planes, stride):
    return nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))


def _torchvision_blocks():
    return {
        "basic": (lambda: BasicBlock(16, 16), 16),
        "basic_projection": (lambda: BasicBlock(16, 32, stride=2, downsample=_projection(16, 32, 2)), 16),
        "bottleneck": (lambda: Bottleneck(32, 8), 32),
        "bottleneck_projection": (lambda: Bottleneck(16, 8, stride=2, downsample=_projection(16, 32, 2)), 16),
        "inverted_residual_e1_residual": (lambda: TorchvisionInvertedResidual(16, 16, 1, 1), 16),
        "inverted_residual_e1": (lambda: TorchvisionInvertedResidual(16, 24, 1, 1), 16),
        "inverted_residual_e6_residual": (lambda: TorchvisionInvertedResidual(16, 16, 1, 6), 16),
        "inverted_residual_e6_stride2": (lambda: TorchvisionInvertedResidual(16, 24, 2, 6), 16),
    }


def _timm_blocks():
    timm = pytest.importorskip("timm")
    from timm.models import resnet as timm_resnet
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    lite0 = timm.create_model("tf_efficientnet_lite0")
    return {
        # tf_efficientnet_lite0's own blocks: ReLU6 in BatchNormAct2d, Conv2dSame when strided
        "lite0_depthwise_separable": (lambda: lite0.blocks[0][0], 32),
        "lite0_inverted_residual_stride2": (lambda: lite0.blocks[1][0], 16),
        "lite0_inverted_residual_residual": (lambda: lite0.blocks[1][1], 24),
        "depthwise_separable_residual": (lambda: DepthwiseSeparableConv(16, 16, act_layer=nn.ReLU), 16),
        "depthwise_separable_pw_act": (lambda: DepthwiseSeparableConv(16, 24, stride=2, pw_act=True,
                                                                       act_layer=nn.ReLU6), 16),
        "inverted_residual_residual": (lambda: InvertedResidual(16, 16, exp_ratio=4.0, act_layer=nn.ReLU), 16),
        "timm_basic": (lambda: timm_resnet.BasicBlock(16, 16), 16),
        "timm_bottleneck_projection": (lambda: timm_resnet.Bottleneck(
            16, 8, stride=2, downsample=nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False),
                                                      nn.BatchNorm2d(32))), 16),
    }


TORCHVISION_BLOCKS = sorted(_torchvision_blocks())
TIMM_BLOCKS = ["lite0_depthwise_separable", "lite0_inverted_residual_stride2", "lite0_inverted_residual_residual",
               "depthwise_separable_residual", "depthwise_separable_pw_act", "inverted_residual_residual",
               "timm_basic", "timm_bottleneck_projection"]


def _check_block_keeps_packed_bits(block, channels):
    torch.manual_seed(0)
    block = randomize_bn(block)
    x = torch.randn(2, channels, 13, 11)  # odd sizes: no ReLU output is a multiple of 32 elements
    numels = relu_output_numels(block, x)
    with torch.no_grad():
        expected = block(x)
    frozen = freeze_block(copy.deepcopy(block))
    assert isinstance(frozen, FrozenBlock)
    xi = x.clone().requires_grad_(True)
    with SavedTensorCounter(exclude=model_state(frozen)) as counter:
        y = frozen(xi)
    assert relative_error(y, expected) < 1e-5
    assert y.requires_grad
    assert counter.saved_bytes == packed_bytes(numels), numels
    assert counter.saved_tensors == len(numels)  # one mask per activation, nothing else
    # and the eager frozen block keeps at least 32x that
    plain = copy.deepcopy(block).requires_grad_(False)
    with SavedTensorCounter(exclude=model_state(plain)) as eager_counter:
        plain(x.clone().requires_grad_(True))
    assert eager_counter.saved_bytes > 32 * counter.saved_bytes
    # the backward runs on what was kept
    y.backward(torch.randn_like(y))
    assert xi.grad is not None and torch.isfinite(xi.grad).all()


@pytest.mark.parametrize("name", TORCHVISION_BLOCKS)
def test_frozen_torchvision_block_keeps_one_bit_per_activation(name):
    constructor, channels = _torchvision_blocks()[name]
    _check_block_keeps_packed_bits(constructor(), channels)


@pytest.mark.parametrize("name", TIMM_BLOCKS)
def test_frozen_timm_block_keeps_one_bit_per_activation(name):
    constructor, channels = _timm_blocks()[name]
    _check_block_keeps_packed_bits(constructor(), channels)


def test_resnet_block_relu_is_counted_once_per_use():
    """A ResNet block runs its one ReLU module two (BasicBlock) or three (Bottleneck) times."""
    assert len(relu_output_numels(randomize_bn(BasicBlock(8, 8)), torch.randn(1, 8, 5, 5))) == 2
    assert len(relu_output_numels(randomize_bn(Bottleneck(16, 4)), torch.randn(1, 16, 5, 5))) == 3


def _adaptor_saved_bytes(model, x):
    """What each adaptor keeps when run alone on the output of the block before it, and
    what the head keeps when run alone on the last feature map."""
    block_outputs = []
    hooks = [m.block.register_forward_hook(lambda module, inputs, output: block_outputs.append(output.detach()))
             for m in model.modules() if isinstance(m, AdaptedBlock)]
    last = {}
    hooks.append(model.avgpool.register_forward_pre_hook(lambda module, inputs: last.__setitem__("x", inputs[0])))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    adaptors = [m.adaptor for m in model.modules() if isinstance(m, AdaptedBlock)]
    assert len(adaptors) == len(block_outputs) == 8
    total = 0
    for adaptor, output in zip(adaptors, block_outputs):
        with SavedTensorCounter(exclude=model_state(adaptor)) as counter:
            adaptor(output.clone().requires_grad_(True))
        assert 0 < counter.saved_bytes < output.numel() * output.element_size()
        total += counter.saved_bytes
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        model.fc(torch.flatten(model.avgpool(last["x"].detach().clone().requires_grad_(True)), 1))
    head = counter.saved_bytes
    assert head == x.shape[0] * model.fc.in_features * 4  # the head's input
    return total, head


def test_adapted_resnet18_keeps_masks_pool_offsets_and_adaptor_descriptors():
    original, _ = make_original("resnet18")
    x = torch.randn(2, 3, 64, 64)
    relu_numels = relu_output_numels(original, x)  # stem + 2 per BasicBlock
    assert len(relu_numels) == 1 + 2 * 8
    masks = packed_bytes(relu_numels)
    pool_bytes = relu_numels[0] // 4  # one uint8 per max-pool output (3x3, stride 2 halves each side)
    model = adapt_quietly(copy.deepcopy(original), 10)
    assert isinstance(model.maxpool, LeanMaxPool2d)
    adaptors, head = _adaptor_saved_bytes(model, x)
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        model(x)
    assert counter.saved_bytes == masks + pool_bytes + adaptors + head
    # a bound from the packed-bit count alone: the rest (pool offsets, the adaptors'
    # O(N*(C+H*W)) descriptors, the head's input) stays below twice the masks here
    assert counter.saved_bytes < 3 * masks

    frozen = copy.deepcopy(original).requires_grad_(False)
    with SavedTensorCounter(exclude=model_state(frozen)) as eager_counter:
        frozen(x.clone().requires_grad_(True))
    assert counter.saved_bytes * 20 < eager_counter.saved_bytes
    eager = adapt_quietly(copy.deepcopy(original), 10, lean=False)
    with SavedTensorCounter(exclude=model_state(eager)) as da2_eager_counter:
        eager(x)
    assert counter.saved_bytes * 20 < da2_eager_counter.saved_bytes


def test_adapted_resnet18_without_adaptors_keeps_masks_pool_offsets_and_head_input():
    original, _ = make_original("resnet18")
    x = torch.randn(2, 3, 64, 64)
    relu_numels = relu_output_numels(original, x)
    model = adapt_quietly(copy.deepcopy(original), 10, adaptors=False)
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        model(x)
    assert counter.saved_bytes == packed_bytes(relu_numels) + relu_numels[0] // 4 + 2 * 512 * 4


@pytest.mark.parametrize("family", ["mobilenet_v2", "tf_efficientnet_lite0"])
def test_adapted_mobile_networks_keep_the_packed_bit_floor(family):
    original, shape = make_original(family)
    x = torch.randn(*shape)
    masks = packed_bytes(relu_output_numels(original, x))
    model = adapt_quietly(copy.deepcopy(original), 10, adaptors=False)
    # the classifier alone on the pooled features: the head's input, and for torchvision's
    # MobileNetV2 the float mask of its Dropout (train mode)
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        features_module(model)(torch.randn(shape[0], 1280, requires_grad=True))
    head = counter.saved_bytes
    assert head == shape[0] * 1280 * 4 * (2 if family == "mobilenet_v2" else 1)
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        model(x)
    assert counter.saved_bytes == masks + head
    model = adapt_quietly(copy.deepcopy(original), 10)
    with SavedTensorCounter(exclude=model_state(model)) as counter:
        model(x)
    assert masks + head < counter.saved_bytes < 3 * (masks + head)


@pytest.mark.parametrize("depth", [18, 50])
def test_a_timm_resnet_keeps_what_the_torchvision_resnet_keeps(depth):
    timm = pytest.importorskip("timm")
    kept = []
    name = "resnet{}".format(depth)
    for original in (getattr(torchvision.models, name)(), timm.create_model(name)):
        model = adapt_quietly(original, 10, rank=4)
        with SavedTensorCounter(exclude=model_state(model)) as counter:
            model(torch.randn(2, 3, 64, 64))
        kept.append(counter.saved_bytes)
    assert kept[0] == kept[1] > 0
