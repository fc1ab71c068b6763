"""The low-rank branch beside a late block (da2ext/nn/low_rank_branch.py) and its
placement by adapt(..., branch_width=w, branch_min_stride=s)
(da2ext/lean/late_branches.py): the pool that keeps nothing, the branch's maths and
gradients in float64, what it keeps for backward, where adapt() puts branches,
that a fresh branch changes nothing, the "branches" group, bad values
refused by name, and the branch's folded inference twin."""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import da2ext
from da2ext.deploy.inference_model import FoldedLowRankBranch
from da2ext.lean.adapt import AdaptedBlock
from da2ext.lean.kept_bytes import kept_bytes_by_part
from da2ext.lean.trainable import parameter_groups, trainable_parameters
from da2ext.models import backbones
from da2ext.nn.low_rank_branch import LowRankConvBranch, pool_and_project, project_and_normalise

from helpers import all_devices, randomize_bn

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("height, width", [(8, 6), (7, 7), (5, 4), (1, 1), (2, 3), (14, 13)])
def test_pool_and_project_is_pool_then_1x1_conv_keeping_only_the_pooled_input(height, width):
    torch.manual_seed(0)
    x = torch.randn(2, 3, height, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(F.avg_pool2d(x, 2, 2, ceil_mode=True), weight)
    out = pool_and_project(x, weight)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(expected)
    for ours, theirs in zip(torch.autograd.grad(out, (x, weight), grad), torch.autograd.grad(expected, (x, weight), grad)):
        torch.testing.assert_close(ours, theirs)
    assert torch.autograd.gradcheck(pool_and_project, (x, weight))
    pooled = 2 * 3 * ((height + 1) // 2) * ((width + 1) // 2)
    # the pooled input and the weight: never x itself (autograd's avg_pool2d keeps it)
    assert da2ext.saved_bytes(lambda t: pool_and_project(t, weight), x) == (pooled + weight.numel()) * 8
    half = da2ext.saved_bytes(lambda t: pool_and_project(t, weight.float(), torch.float16), x.float())
    assert half == pooled * 2 + weight.numel() * 4


def test_a_float16_copy_of_the_pooled_input_rounds_only_the_weight_gradient():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 7, 7, requires_grad=True)
    weight = torch.randn(16, 64, 1, 1, requires_grad=True)
    grad = torch.randn(8, 16, 4, 4)
    exact = torch.autograd.grad(pool_and_project(x, weight), (x, weight), grad)
    rounded = torch.autograd.grad(pool_and_project(x, weight, torch.float16), (x, weight), grad)
    torch.testing.assert_close(rounded[0], exact[0])  # the input gradient does not use the copy
    error = float((rounded[1] - exact[1]).norm() / exact[1].norm())
    assert 0 < error < 1e-3, error  # float16's resolution, about 5e-4


def _branch(in_channels=6, out_channels=5, stride=1, width=4, dtype=torch.float64):
    torch.manual_seed(0)
    branch = LowRankConvBranch(in_channels, out_channels, stride=stride, width=width).to(dtype)
    return branch


def test_a_fresh_branch_adds_exactly_zero():
    branch = _branch(dtype=torch.float32)
    assert torch.equal(branch(torch.randn(2, 6, 7, 7), (7, 7)), torch.zeros(2, 5, 7, 7))


def _formula(branch, x, out_size):
    """The branch as docs/design.md writes it, in plain PyTorch (its BN on batch statistics)."""
    pooled = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    h = torch.relu(F.conv2d(torch.relu(F.conv2d(pooled, branch.down.weight)), branch.conv.weight,
                            stride=branch.stride, padding=1))
    z = F.batch_norm(F.conv2d(h, branch.up.weight), None, None, branch.bn.weight, branch.bn.bias, training=True,
                     eps=branch.bn.eps)
    return F.interpolate(z, size=(out_size, out_size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("stride, size, out_size", [(1, 7, 7), (2, 8, 4), (2, 7, 4), (1, 2, 2), (2, 4, 2)])
def test_the_branch_computes_its_formula_and_gradchecks(stride, size, out_size):
    branch = _branch(stride=stride)
    with torch.no_grad():
        branch.bn.weight.normal_()
        branch.bn.bias.normal_()
    x = torch.randn(3, 6, size, size, dtype=torch.float64, requires_grad=True)
    out = branch(x, (out_size, out_size))
    expected = _formula(branch, x, out_size)
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(lambda t: branch(t, (out_size, out_size)), (x,))
    grad = torch.randn_like(out)
    parameters = [x] + list(branch.parameters())
    for ours, theirs in zip(torch.autograd.grad(out, parameters, grad), torch.autograd.grad(expected, parameters, grad)):
        torch.testing.assert_close(ours, theirs)


def test_project_and_normalise_gradchecks_keeps_h_and_moves_the_running_statistics_as_bn():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    ours, theirs = torch.nn.BatchNorm2d(5).double(), torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())

    def normalised(t, w, scale, shift):  # batch statistics only: running statistics are not differentiable
        return project_and_normalise(t, w, types.SimpleNamespace(weight=scale, bias=shift, eps=1e-5,
                                                                 track_running_stats=False, running_mean=None))
    assert torch.autograd.gradcheck(normalised, (h, weight, ours.weight, ours.bias))
    for step in range(2):
        out = project_and_normalise(h, weight, ours)
        torch.testing.assert_close(out, theirs(F.conv2d(h, weight)))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    kept = da2ext.saved_bytes(lambda t: project_and_normalise(t, weight, ours), h)
    # h, the weights, and a mean and an inverse deviation per channel: not the 5-channel projection
    assert kept == h.numel() * 8 + weight.numel() * 8 + ours.weight.numel() * 8 + 2 * 5 * 8, kept


def test_a_fresh_branch_trains_its_bn_scale_first():
    branch = _branch()
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    branch(x, (7, 7)).sum().backward()
    assert branch.bn.weight.grad is not None and branch.bn.bias.grad.abs().sum() > 0
    assert branch.up.weight.grad.abs().sum() == 0 and branch.down.weight.grad.abs().sum() == 0  # bn scale = 0


@pytest.mark.parametrize("stride, size", [(1, 14), (2, 14)])
def test_the_branch_keeps_its_pooled_input_in_float16_not_the_block_input(stride, size):
    branch = _branch(256, 512, stride=stride, width=16, dtype=torch.float32)
    x = torch.randn(4, 256, size, size, requires_grad=True)
    out_size = size // stride
    weights = sum(p.numel() * 4 for p in branch.parameters())
    kept = da2ext.saved_bytes(lambda t: branch(t, (out_size, out_size)), x) - weights
    pooled = 4 * 256 * ((size + 1) // 2) ** 2 * 2  # float16
    width_maps = 4 * 4 * 16 * ((size + 1) // 2) ** 2 * 4  # the 1x1 and 3x3 convs' outputs through their ReLUs
    statistics = 2 * 512 * 4  # the output BN's batch mean and inverse deviation
    assert kept <= pooled + width_maps + statistics, kept
    assert kept < x.numel() * 4 / 4  # nothing of the block's input or output at full size


@pytest.mark.parametrize("bad, message", [
    (dict(in_channels=0), "in_channels"), (dict(width=True), "width"), (dict(stride=1.5), "stride"),
    (dict(keep_dtype=torch.int8), "keep_dtype")])
def test_bad_branch_arguments_are_named(bad, message):
    arguments = dict(in_channels=4, out_channels=4, stride=1, width=2)
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        LowRankConvBranch(**arguments)


def test_a_wrong_input_is_named():
    with pytest.raises(ValueError, match="N x 6 x H x W"):
        _branch()(torch.randn(2, 5, 4, 4, dtype=torch.float64), (4, 4))


def _with_branch(model):
    return [name for name, m in model.named_modules() if isinstance(m, AdaptedBlock) and m.branch is not None]


def test_resnet18_branches_beside_its_stride_32_blocks_and_nothing_changes_at_first():
    torch.manual_seed(0)
    plain = da2ext.adapt(torchvision.models.resnet18(), 10, rank=4, adaptor_max_stride=8)
    torch.manual_seed(0)
    branched = da2ext.adapt(torchvision.models.resnet18(), 10, rank=4, adaptor_max_stride=8, branch_width=16)
    assert _with_branch(branched) == ["layer4.0", "layer4.1"]
    assert branched.da2ext_branch_strides == {"layer4.0": 32, "layer4.1": 32}
    assert plain.da2ext_branch_strides is None
    first = dict(branched.named_modules())["layer4.0"].branch
    assert (first.in_channels, first.out_channels, first.stride, first.width) == (256, 512, 2, 16)
    x = torch.randn(2, 3, 64, 64)
    plain.eval()
    branched.eval()
    with torch.no_grad():
        torch.testing.assert_close(branched(x), plain(x))
    wider = da2ext.adapt(torchvision.models.resnet18(), 10, branch_width=8, branch_min_stride=16)
    assert _with_branch(wider) == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def test_branches_train_in_their_own_group():
    model = da2ext.adapt(backbones.create("efficientnet_lite0", pretrained=False), 10, rank=4, adaptor_max_stride=8,
                         branch_width=64)
    assert _with_branch(model) == ["blocks.5.0", "blocks.5.1", "blocks.5.2", "blocks.5.3", "blocks.6.0"]
    groups = parameter_groups(model)
    branch_parameters = [p for name, p in model.named_parameters() if ".branch." in name]
    assert set(map(id, groups["branches"])) == set(map(id, branch_parameters))
    assert trainable_parameters(model)["branches"] == sum(p.numel() for p in branch_parameters)
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None for p in branch_parameters)
    assert all(m.branch.bn.weight.grad.abs().sum() > 0 for m in model.modules()
               if isinstance(m, AdaptedBlock) and m.branch is not None)  # the BN scales learn first


def test_kept_bytes_by_part_names_the_branches():
    model = da2ext.adapt(torchvision.models.resnet18(), 10, branch_width=8)
    rows = dict((row["part"], row) for row in kept_bytes_by_part(model, torch.randn(2, 3, 64, 64)))
    assert rows["layer4.1.branch"]["treatment"] == "branch" and rows["layer4.1.branch"]["kept_bytes"] > 0


@pytest.mark.parametrize("bad, message", [
    (dict(branch_width=0), "branch_width"), (dict(branch_width=True), "branch_width"),
    (dict(branch_width=8, branch_min_stride=0), "branch_min_stride"),
    (dict(branch_width=8, branch_min_stride=None), "branch_min_stride")])
def test_bad_branch_options_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        da2ext.adapt(torchvision.models.resnet18(), 10, **bad)


def test_a_model_adapted_generically_takes_no_branch():
    with pytest.raises(ValueError, match="branch_width needs a model whose blocks adapt"):
        da2ext.adapt(torchvision.models.regnet_x_400mf(), 10, branch_width=8)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs torch >= 2.0")
def test_a_model_with_branches_compiles_fullgraph_and_trains_a_step_as_eager():
    torch.manual_seed(0)
    eager = da2ext.adapt(torchvision.models.resnet18(), 10, adaptor_max_stride=8, branch_width=8).train()
    with torch.no_grad():
        for module in eager.modules():
            if isinstance(module, LowRankConvBranch):
                module.bn.weight.normal_()  # the scale starts at 0; non-zero exercises the whole branch
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(10, (4,))
    eager_loss = F.cross_entropy(eager(x), y)
    eager_loss.backward()
    compiled_loss = F.cross_entropy(compiled(x), y)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        if p.requires_grad and ".branch." in name:
            error = float((q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
            # conv_down's weight gradient comes from a float16 copy of the pooled input, which the two
            # graphs may round from float32 values a few ulps apart
            assert error < (2e-3 if name.endswith("down.weight") else 1e-4), (name, error)


@pytest.mark.parametrize("device", all_devices())
@pytest.mark.parametrize("stride, size, out_size", [(1, 7, 7), (2, 14, 7)])
def test_the_float32_branch_matches_its_float64_formula(device, stride, size, out_size):
    """The branch as it trains (float32, the pooled input kept in float16) against its formula
    in float64: forward to float32 rounding, gradients within the float16 copy's resolution."""
    branch = _branch(64, 96, stride=stride, width=16)
    with torch.no_grad():
        branch.bn.weight.normal_()
    x64 = torch.randn(8, 64, size, size, dtype=torch.float64)
    grad = torch.randn(8, 96, out_size, out_size, dtype=torch.float64)
    expected = _formula(branch, x64.requires_grad_(), out_size)
    expected_grads = torch.autograd.grad(expected, [x64] + list(branch.parameters()), grad)
    ours = copy.deepcopy(branch).float().to(device)
    x = x64.detach().float().to(device).requires_grad_()
    out = ours(x, (out_size, out_size))
    torch.testing.assert_close(out.double().cpu(), expected.detach(), rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out, [x] + list(ours.parameters()), grad.float().to(device))
    for name, got, want in zip(["x"] + [n for n, _ in ours.named_parameters()], grads, expected_grads):
        error = float((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-12))
        assert error < (2e-3 if name == "down.weight" else 1e-4), (name, error)


def _trained_looking_branch(stride, seed=0):
    """A branch whose BN scale, shift and running statistics are not their fresh values (eval mode)."""
    torch.manual_seed(seed)
    return randomize_bn(LowRankConvBranch(12, 20, stride, width=8).double(), seed)


@pytest.mark.parametrize("stride, size", [(1, 4), (1, 2), (2, 4), (1, 7), (2, 7), (1, 1), (2, 6)])
def test_the_folded_branch_computes_what_the_branch_infers(stride, size):
    branch = _trained_looking_branch(stride)
    folded = FoldedLowRankBranch(branch)
    x = torch.randn(3, 12, size, size + (size % 2), dtype=torch.float64)  # even and odd heights; widths even
    with torch.no_grad():
        torch.testing.assert_close(folded(x), branch(x), rtol=1e-10, atol=1e-10)
    assert not any(p.requires_grad for p in folded.parameters())
    with pytest.raises(TypeError, match="LowRankConvBranch"):
        FoldedLowRankBranch(torch.nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("block_stride, size", [(1, 2), (2, 2), (1, 4), (2, 7)])
def test_a_one_by_one_branch_output_is_added_as_its_upsampling_would_add_it(block_stride, size):
    """AdaptedBlock adds a 1 x 1 branch output by broadcasting (no Resize in an exported
    graph): the same output and gradients as bilinear upsampling, which gives the one
    value everywhere."""
    branch = _trained_looking_branch(block_stride).train()
    block = torch.nn.Conv2d(12, 20, 3, block_stride, 1).double().requires_grad_(False)
    adapted = AdaptedBlock(block, None, branch)
    x = torch.randn(2, 12, size, size, dtype=torch.float64, requires_grad=True)

    def upsampled(t):
        return block(t) + branch.upsample(branch(t), block(t).shape[-2:])

    torch.testing.assert_close(adapted(x), upsampled(x))
    assert torch.autograd.gradcheck(adapted, (x,))
    grads = [torch.autograd.grad(f(x).square().sum(), [x] + list(branch.parameters())) for f in (adapted, upsampled)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
