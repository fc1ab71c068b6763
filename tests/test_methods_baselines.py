"""The baseline methods of docs/design.md §5 built here (bn_train, tinytl,
series_adapter, parallel_adapter): each starts from the pretrained network,
trains exactly its own parameter set, and its domains save and load like da2's."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from da2ext import MultiDomainModel, methods
from da2ext.lean.adapt import Head, replace_head
from da2ext.profiling import SavedTensorCounter, model_state
from da2ext.methods.lite_residual import LiteResidual
from da2ext.methods.residual_adapters import ParallelAdapterConv, SeriesAdapterConv

NEW_METHODS = ("bn_train", "tinytl", "series_adapter", "parallel_adapter")


def _timm_lite0():
    timm = pytest.importorskip("timm")
    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


BACKBONES = {
    "resnet18": torchvision.models.resnet18,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "tf_efficientnet_lite0": _timm_lite0,
}


def backbone(name, seed=0):
    torch.manual_seed(seed)
    model = BACKBONES[name]()
    # Non-trivial BN statistics, so that a wrong eval/train mode shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def inputs():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(BACKBONES))
@pytest.mark.parametrize("method", NEW_METHODS)
def test_a_new_method_starts_from_the_pretrained_network(method, family, inputs):
    original = backbone(family)
    model = methods.get(method).build(copy.deepcopy(original), 10)
    head = [m for m in model.modules() if isinstance(m, Head)]
    assert len(head) == 1
    replace_head(original, 10).load_state_dict(head[0].state_dict())
    with torch.no_grad():
        expected = original.eval()(inputs)
        got = model.eval()(inputs)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def _names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_each_method_trains_its_own_parameters(family):
    bn_train = methods.get("bn_train").build(backbone(family), 10)
    bn_params = set(id(p) for m in bn_train.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    head_params = set(id(p) for m in bn_train.modules() if isinstance(m, Head) for p in m.parameters())
    assert set(id(p) for p in bn_train.parameters() if p.requires_grad) == bn_params | head_params
    assert all(m.momentum == 0.1 for m in bn_train.modules() if isinstance(m, nn.BatchNorm2d))

    for method, wrapper in (("series_adapter", SeriesAdapterConv), ("parallel_adapter", ParallelAdapterConv)):
        model = methods.get(method).build(backbone(family), 10)
        adapters = [m for m in model.modules() if isinstance(m, wrapper)]
        assert adapters
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert ".adapter." in name or "bn" in name or isinstance(
                    model.get_submodule(name.rpartition(".")[0]), (nn.BatchNorm2d, Head)), name
            else:
                assert ".adapter." not in name
        for adapter in adapters:
            assert not adapter.conv.weight.requires_grad and adapter.adapter.weight.requires_grad

    tinytl = methods.get("tinytl").build(backbone(family), 10)
    lites = [m for m in tinytl.modules() if isinstance(m, LiteResidual)]
    assert lites
    trainable = _names(tinytl)
    assert all(".lite." in n or "shift" in n or ".bias" in n or n.startswith(("fc.", "classifier")) for n in trainable)
    assert sum(p.numel() for l in lites for p in l.parameters()) == sum(
        p.numel() for n, p in tinytl.named_parameters() if p.requires_grad and ".lite." in n)


def test_residual_adapters_sit_where_the_papers_put_them():
    resnet = methods.get("series_adapter").build(backbone("resnet18"), 10)
    # BasicBlock: both 3x3 convs
    assert isinstance(resnet.layer1[0].conv1, SeriesAdapterConv) and isinstance(resnet.layer1[0].conv2,
                                                                                 SeriesAdapterConv)
    resnet50 = methods.get("parallel_adapter").build(torchvision.models.resnet50(), 10)
    block = resnet50.layer2[0]  # Bottleneck: the 3x3 conv only, stride 2 beside it
    assert isinstance(block.conv2, ParallelAdapterConv) and block.conv2.adapter.stride == (2, 2)
    assert not isinstance(block.conv1, ParallelAdapterConv) and not isinstance(block.conv3, ParallelAdapterConv)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_a_training_step_moves_only_the_active_domain_and_files_round_trip(method, inputs, tmp_path):
    model = MultiDomainModel(backbone("tf_efficientnet_lite0" if method == "tinytl" else "resnet18"), method=method)
    model.add_domain("a", 10)
    model.add_domain("b", 4)
    model.set_domain("b")
    before_a = [t.clone() for t in model.domain_tensors("a").values()]
    before_b = [t.clone() for t in model.domain_tensors("b").values()]
    model.train()
    optimizer = torch.optim.Adam(model.param_groups())
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), torch.tensor([0, 3])).backward()
        optimizer.step()
    assert all(torch.equal(x, y) for x, y in zip(before_a, model.domain_tensors("a").values()))
    moved = [not torch.equal(x, y) for x, y in zip(before_b, model.domain_tensors("b").values())]
    assert all(moved[:-2]) or sum(moved) > len(moved) // 2  # nearly every slot moves (a zero grad may not)

    path = str(tmp_path / "b.safetensors")
    model.save_domain("b", path)
    other = MultiDomainModel(backbone("tf_efficientnet_lite0" if method == "tinytl" else "resnet18"), method=method)
    other.load_domain(path, name="b")
    model.eval()
    other.eval()
    with torch.no_grad(), model.domain("b"), other.domain("b"):
        assert torch.equal(model(inputs), other(inputs))


def test_tinytl_keeps_far_less_than_bn_train_for_backward(inputs):
    kept = {}
    for method in ("bn_train", "tinytl", "bias"):
        model = methods.get(method).build(backbone("resnet18"), 10).train()
        with SavedTensorCounter(exclude=model_state(model)) as counter:
            model(inputs).sum()
        kept[method] = counter.saved_bytes
    # The lite branches keep their own (4x downsampled) activations on top of masks.
    assert kept["tinytl"] < 0.5 * kept["bias"] < kept["bn_train"]
