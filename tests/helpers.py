"""Shared helpers of the test suite, in one place: no test file imports another.

Test files import them with `from helpers import ...` (pytest puts tests/ on
sys.path, as it has no __init__.py); tools/cuda_determinism_check.py too.

- devices to test on, matched fused/reference adaptor pairs, relative errors;
- the model families adapt() supports, and what the adapt, trainable-tail and
  channels_last tests build and compare;
- values and the documented bit layout of the packed activation;
- a tiny ImageFolder of shapes for the training and CLI tests;
- the adapted ResNet-18, batches and eager steps of the CUDA graph tests.
"""
import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import da2ext
from da2ext.lean.adapt import adapt, supported_family
from da2ext.lean.frozen_conv import FrozenConvBNAct

# ------------------------------------------------------------------------------------------
# Devices, adaptor pairs, errors


def kernel_devices():
    """Devices whose fused kernels are built and usable here (CUDA tests skip without a GPU)."""
    devices = ["cpu"]
    if torch.cuda.is_available() and da2ext.backend("cuda") == "cuda":
        devices.append("cuda")
    return devices


def all_devices():
    """cpu always; cuda as a skipped parameter where no GPU (or no CUDA build) is present."""
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(
        "cuda" not in kernel_devices(), reason="needs a CUDA GPU and a CUDA build of da2ext"))
    return ["cpu", cuda]


def adaptor_pair(channels, mode="add", spatial_kernel=3, reduction=16, seed=0, gamma_std=0.5):
    """A fused adaptor and a reference adaptor with the same random state, gamma non-zero."""
    torch.manual_seed(seed)
    fused = da2ext.ResidualAttentionAdaptor(channels, reduction=reduction, spatial_kernel=spatial_kernel, mode=mode)
    with torch.no_grad():
        nn.init.normal_(fused.gamma, std=gamma_std)
    reference = da2ext.reference.ResidualAttentionAdaptor(channels, reduction=reduction,
                                                          spatial_kernel=spatial_kernel, mode=mode)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


# ------------------------------------------------------------------------------------------
# The model families adapt() supports; adapted models built, randomised and compared

# family name -> (constructor, small input shape, needs timm)
FAMILIES = {
    "resnet18": (lambda: _torchvision().models.resnet18(), (2, 3, 67, 61), False),
    "mobilenet_v2": (lambda: _torchvision().models.mobilenet_v2(), (2, 3, 67, 61), False),
    "tf_efficientnet_lite0": (lambda: import_timm().create_model("tf_efficientnet_lite0"), (2, 3, 67, 61), True),
    "mobilenetv2_100": (lambda: import_timm().create_model("mobilenetv2_100"), (2, 3, 64, 64), True),
    "timm_resnet18": (lambda: import_timm().create_model("resnet18"), (2, 3, 67, 61), True),    # BasicBlock
    "timm_resnet26": (lambda: import_timm().create_model("resnet26"), (2, 3, 67, 61), True),    # Bottleneck
}
FAMILY_NAMES = sorted(FAMILIES)


def import_timm():
    """timm, or skip the test where it is not installed."""
    return pytest.importorskip("timm")


def _torchvision():
    return pytest.importorskip("torchvision")


def randomize_bn(model, seed=0):
    """Random running statistics, scales and shifts in every BN (so folding matters); eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                uniform(module.running_mean, -0.5, 0.5)
                uniform(module.running_var, 0.5, 2.0)
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.3, 0.3)
    return model.eval()


def make_original(family, seed=0, dtype=torch.float32):
    """A freshly built (random-weight) model of `family` with random BN state, eval mode,
    and its small input shape. Skips timm families without timm."""
    constructor, shape, needs_timm = FAMILIES[family]
    if needs_timm:
        import_timm()
    torch.manual_seed(seed)
    model = randomize_bn(constructor(), seed).to(dtype)
    return model, shape


def head_of(model):
    """The classifier Linear (the original's or the adapted model's Head)."""
    family = supported_family(model)
    if family in ("resnet", "timm_resnet"):
        return model.fc
    if family == "mobilenet_v2":
        return model.classifier[-1]
    return model.classifier


def features_module(model):
    """The module whose input is the pooled feature vector (before any dropout)."""
    if supported_family(model) == "mobilenet_v2":
        return model.classifier  # Sequential(Dropout, Linear)
    return head_of(model)


def kept_for_backward(model, x):
    """Bytes one forward of `model` on `x` keeps for backward, the model's own parameters and buffers excluded."""
    with da2ext.SavedTensorCounter(exclude=da2ext.profiling.model_state(model)) as counter:
        model(x)
    return counter.saved_bytes


def bias_baseline(model, num_classes=10):
    """The `bias` method (the model frozen as it is in plain PyTorch, BN shifts and biases
    trainable) on a copy of `model`, the generic path's warning silenced."""
    from da2ext import methods
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return methods.get("bias").build(copy.deepcopy(model), num_classes)


def adapt_quietly(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model must adapt without any warning
        return adapt(model, *args, **kwargs)


def shift_parameters(model):
    """The BN shifts in module order: FrozenConvBNAct.shift (lean) or BatchNorm2d.bias (eager)."""
    shifts = []
    for module in model.modules():
        if isinstance(module, FrozenConvBNAct):
            shifts.append(module.shift)
        elif isinstance(module, nn.BatchNorm2d):
            shifts.append(module.bias)
    return shifts


def named_trainable(model):
    return dict((name, p) for name, p in model.named_parameters() if p.requires_grad)


def randomize_common_trainable(lean, eager, seed=1, std=0.3):
    """Give the trainable parameters the lean and eager models share by name (adaptors,
    head, BN biases of unchanged modules) identical random values (gamma non-zero)."""
    lean_params, eager_params = named_trainable(lean), named_trainable(eager)
    common = sorted(set(lean_params) & set(eager_params))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in common:
            value = torch.randn(lean_params[name].shape, generator=generator, dtype=torch.float64) * std
            lean_params[name].copy_(value)
            eager_params[name].copy_(value)
    return common


def forward_backward(model, x, output_grad_seed=2, forward_seed=5):
    """Output, input gradient and every parameter's gradient of <model(x), w> for a random w.
    The RNG is seeded before the forward (MobileNetV2's Dropout in train mode)."""
    model.zero_grad()
    torch.manual_seed(forward_seed)
    xi = x.detach().clone().requires_grad_(True)
    y = model(xi)
    # drawn in float64 whatever y's dtype (randn's stream depends on the dtype), so that
    # runs in different dtypes and on different devices get the same w
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(output_grad_seed), dtype=torch.float64)
    (y * w.to(device=y.device, dtype=y.dtype)).sum().backward()
    return y.detach(), xi.grad


def relu_output_numels(model, x):
    """numel of every ReLU/ReLU6 output of `model(x)` (a module reused three times fires thrice)."""
    numels = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: numels.append(output.numel()))
             for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert numels, "no ReLU/ReLU6 ran"
    return numels


def packed_bytes(numels):
    """Bytes of the packed masks: ceil(numel / 32) int32 words each."""
    return sum(4 * int(math.ceil(n / 32.0)) for n in numels)


def bn_buffers(model):
    """Clones of every BN buffer (running_mean, running_var, num_batches_tracked) by name."""
    return dict((name, b.detach().clone()) for name, b in model.named_buffers()
                if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"))


# ------------------------------------------------------------------------------------------
# The packed activation: values with its special cases, and its documented bit layout


def special_values(shape, device, dtype, seed=0, nan=True):
    """Random values in [-8, 8] with exact 0, 6, +-inf (and NaN) sprinkled in."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator, dtype=torch.float64) * 16 - 8
    flat = x.view(-1)
    if flat.numel() >= 8:
        specials = [0.0, 6.0, -0.0, float("inf"), float("-inf"), 5.999, 1e-3]
        if nan:
            specials.append(float("nan"))
        picks = torch.randperm(flat.numel(), generator=generator)[:3 * len(specials)]
        for k, index in enumerate(picks.tolist()):
            flat[index] = specials[k % len(specials)]
    return x.to(device=device, dtype=dtype)


def python_mask(x, upper):
    """The documented layout: bit i % 32 of int32 word i // 32 set where the gradient passes."""
    flat = x.detach().double().cpu().reshape(-1)
    passes = flat > 0
    if not math.isinf(upper):
        passes &= flat < upper
    words = (flat.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:flat.numel()] = passes.to(torch.int64)
    values = (bits.view(words, 32) << torch.arange(32, dtype=torch.int64)).sum(1)
    values = torch.where(values >= 2 ** 31, values - 2 ** 32, values)  # as two's-complement int32
    return values.to(torch.int32)


# ------------------------------------------------------------------------------------------
# A tiny ImageFolder of four shape classes (the training and CLI tests)

IMAGE_SIZE = 32
CLASSES = ("circle", "cross", "square", "stripes")


def _draw(kind, rng):
    """A 32x32 RGB uint8 image of a shape class, with random colour, position and noise."""
    image = rng.randint(0, 60, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.int64)
    colour = rng.randint(120, 256, size=3)
    cy, cx = rng.randint(10, 22, size=2)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 49
    elif kind == "cross":
        mask = (np.abs(yy - cy) < 2) | (np.abs(xx - cx) < 2)
    elif kind == "square":
        mask = (np.abs(yy - cy) < 6) & (np.abs(xx - cx) < 6)
    else:
        mask = (xx // 3) % 2 == 0
    image[mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image_folder(root, train_per_class=8, val_per_class=4, seed=0):
    """root/{train,val}/<class>/<i>.png for the four shape classes."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for kind in CLASSES:
            directory = os.path.join(root, split, kind)
            os.makedirs(directory)
            for i in range(count):
                Image.fromarray(_draw(kind, rng)).save(os.path.join(directory, "{:03d}.png".format(i)))
    return root


# ------------------------------------------------------------------------------------------
# CUDA graph steps against eager ones (test_cuda_graph_step.py, tools/cuda_determinism_check.py)


def adapted_resnet18(device, branch_width=None):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = da2ext.adapt(torchvision.models.resnet18(), 10, branch_width=branch_width).to(device).train()
    with torch.no_grad():
        for adaptor in (m for m in model.modules() if isinstance(m, da2ext.ResidualAttentionAdaptor)):
            adaptor.gamma.normal_(std=0.5)  # gamma starts at 0; non-zero exercises the whole adaptor
        for branch in (m for m in model.modules() if isinstance(m, da2ext.LowRankConvBranch)):
            branch.bn.weight.normal_(std=0.5)  # the same for a branch's BN scale
    return model


def batches(device, count=3, batch_size=4):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch_size, 3, 64, 64, generator=generator).to(device),
             torch.randint(0, 10, (batch_size,), generator=generator).to(device)) for _ in range(count)]


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)


def eager_steps(model, optimizer, data):
    losses = []
    for inputs, targets in data:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# The command line (python -m da2ext ...) in-process, on a tiny random ResNet-18.
CLI_TINY = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "32", "--batch-size", "16", "--no-progress"]
CLI_TINY_EVAL = [a for a in CLI_TINY if a != "--no-progress"]  # eval shows no progress


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of da2ext's CLI main(argv), captured by pytest's capsys."""
    from da2ext.cli import main
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err
