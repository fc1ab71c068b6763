"""adapt(..., train_last=k) and adapt(..., memory_budget_mib=M): the last blocks
trained in full (their BNs on batch statistics that each domain keeps, or on the
frozen pretrained ones), everything before lean (docs/design.md §3a)."""
import copy
import os

import pytest
import torch
from torch import nn

import da2ext
from da2ext import methods
from helpers import (FAMILY_NAMES, adapt_quietly, bn_buffers, forward_backward, make_original, named_trainable,
                     randomize_common_trainable, relative_error, shift_parameters)
from da2ext.lean.adapt import supported_family
from da2ext.lean.trainable import parameter_groups
from da2ext.lean.trainable_tail import TrainableTail, training_bytes

TOLERANCE = 1e-10


def _tail_modules(model):
    return [m for m in model.modules() if isinstance(m, TrainableTail)]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tail_gradients_match_plain_autograd(family):
    """float64: the lean model with a 2-block tail against the eager one with the same tail."""
    original, shape = make_original(family, dtype=torch.float64)
    lean = adapt_quietly(copy.deepcopy(original), 10, backbone_dtype=torch.float64, train_last=2).double()
    eager = adapt_quietly(copy.deepcopy(original), 10, lean=False, train_last=2).double()
    common = randomize_common_trainable(lean, eager)
    assert any(name.endswith("gamma") for name in common)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y_lean, gx_lean = forward_backward(lean, x)
    y_eager, gx_eager = forward_backward(eager, x)
    assert relative_error(y_lean, y_eager) < TOLERANCE
    assert relative_error(gx_lean, gx_eager) < TOLERANCE
    lean_params, eager_params = named_trainable(lean), named_trainable(eager)
    tail_names = [name for name in common if ".module." in name]  # inside a TrainableTail
    assert tail_names
    for name in common:
        assert eager_params[name].grad is not None, name
        assert relative_error(lean_params[name].grad, eager_params[name].grad) < TOLERANCE, name
    assert any(eager_params[name].grad.abs().max() > 0 for name in tail_names)
    lean_shifts, eager_shifts = shift_parameters(lean), shift_parameters(eager)
    assert len(lean_shifts) == len(eager_shifts) > 0
    for a, b in zip(lean_shifts, eager_shifts):
        assert relative_error(a.grad, b.grad) < TOLERANCE


@pytest.mark.parametrize("statistics", ["final", "batch", "frozen"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_tail_is_the_last_blocks_and_the_final_conv(family, statistics):
    original, shape = make_original(family)
    blocks = da2ext.adapt(copy.deepcopy(original), 10, train_last=0)
    tailed = adapt_quietly(copy.deepcopy(original), 10, train_last=3, tail_statistics=statistics)
    tails = _tail_modules(tailed)
    has_final_conv = supported_family(original) not in ("resnet", "timm_resnet")
    assert len(tails) == 3 + has_final_conv
    assert not _tail_modules(blocks)
    groups = parameter_groups(tailed)
    tail_params = sum(p.numel() for m in tails for p in m.parameters())
    assert sum(p.numel() for p in groups["tail"]) == tail_params
    assert all(p.requires_grad for m in tails for p in m.parameters())
    # the other groups are those of the model without a tail, less what the tail now owns
    assert sum(p.numel() for p in groups["adaptors"]) == sum(p.numel() for p in parameter_groups(blocks)["adaptors"])
    assert tailed.da2ext_tail == {"train_last": 3}
    # A training step moves the tail's weights; of the BN statistics only those on batch statistics move:
    # every one of the tail's ("batch"), the last one's ("final": the one nearest the head) or none.
    before = bn_buffers(tailed)
    tail_buffers = [name for name, _ in tailed.named_buffers() if name in before and ".module." in name]
    assert tail_buffers
    last_bn = tail_buffers[-1].rpartition(".")[0]
    expected = {"batch": set(tail_buffers), "frozen": set(),
                "final": set(name for name in tail_buffers if name.rpartition(".")[0] == last_bn)}[statistics]
    assert len(expected) == {"batch": len(tail_buffers), "frozen": 0, "final": 3}[statistics]
    weights = [p.detach().clone() for m in tails for p in m.parameters()]
    optimizer = torch.optim.SGD([p for p in tailed.parameters() if p.requires_grad], lr=0.1)
    tailed.train()
    tailed(torch.randn(*shape)).logsumexp(1).sum().backward()
    optimizer.step()
    after = bn_buffers(tailed)
    moved = set(name for name in before if not torch.equal(before[name], after[name]))
    assert moved == expected
    assert any(not torch.equal(w, p) for w, p in zip(weights, (p for m in tails for p in m.parameters())))
    tailed.eval()
    assert not any(m.training for tail in tails for m in tail.modules())


def test_the_tail_costs_its_gradients_and_adam_state_and_little_activation():
    original, _ = make_original("tf_efficientnet_lite0")
    shape = (2, 3, 64, 64)
    lean = da2ext.adapt(copy.deepcopy(original), 10)
    tailed = da2ext.adapt(copy.deepcopy(original), 10, train_last=1)
    eager = da2ext.adapt(copy.deepcopy(original), 10, lean=False)
    lean_bytes, lean_profile = training_bytes(lean, shape)
    tail_bytes, tail_profile = training_bytes(tailed, shape)
    eager_profile = training_bytes(eager, shape)[1]
    tail_params = sum(p.numel() for p in parameter_groups(tailed)["tail"])
    # gradients and Adam's two moments of every tail weight, in float32
    assert tail_bytes - lean_bytes >= 3 * 4 * tail_params
    # the tail's own activations (2x2 maps at 64 px) add little to what the lean model keeps
    assert tail_profile["saved_bytes"] < lean_profile["saved_bytes"] + 0.2 * eager_profile["saved_bytes"]


def test_a_memory_budget_picks_the_largest_tail_that_fits():
    original, _ = make_original("mobilenet_v2")
    shape = (2, 3, 64, 64)
    costs = [training_bytes(da2ext.adapt(copy.deepcopy(original), 10, train_last=k), shape)[0] for k in (0, 1, 2)]
    assert costs[0] < costs[1] < costs[2]
    budget = (costs[1] + costs[2]) / 2.0 / 2 ** 20
    model = da2ext.adapt(copy.deepcopy(original), 10, memory_budget_mib=budget, budget_input_shape=shape)
    assert model.da2ext_tail["train_last"] == 1 and model.da2ext_tail["fits"]
    assert model.da2ext_tail["training_bytes"] == costs[1]
    assert len(_tail_modules(model)) == 2  # the last block and the final conv
    small = da2ext.adapt(copy.deepcopy(original), 10, memory_budget_mib=costs[0] / 2.0 / 2 ** 20,
                         budget_input_shape=shape)
    assert small.da2ext_tail["train_last"] == 0 and not small.da2ext_tail["fits"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_last=-1), "train_last must be an int >= 0"),
    (dict(train_last=1.5), "train_last must be an int >= 0"),
    (dict(train_last=99), "train_last=99 but the model has 17 blocks"),
    (dict(train_last=1, memory_budget_mib=10), "not both"),
    (dict(memory_budget_mib=0), "memory_budget_mib must be a positive number"),
    (dict(memory_budget_mib=float("nan")), "memory_budget_mib must be a positive number"),
    (dict(memory_budget_mib=10, budget_input_shape=(1, 3, 64)), "budget_input_shape must be 4 positive ints"),
    (dict(train_last=1, backbone_dtype=torch.float16), "needs backbone_dtype float32 \\(or float64\\)"),
    (dict(train_last=1, tail_statistics="running"), 'tail_statistics must be one of "final", "batch", "frozen"'),
])
def test_bad_tail_arguments_are_refused_by_name(kwargs, message):
    original, _ = make_original("mobilenet_v2")
    with pytest.raises(ValueError, match=message):
        da2ext.adapt(original, 10, **kwargs)


@pytest.mark.parametrize("method", ["da2_tail1", "da2_tail1_batch_stats", "da2_tail1_frozen_stats"])
def test_domains_carry_their_tail_and_earlier_domains_stay_unchanged(tmp_path, method):
    original, shape = make_original("mobilenet_v2")
    model = da2ext.MultiDomainModel(copy.deepcopy(original), method=method)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))

    def train(name, steps=2):
        model.set_domain(name)
        model.train()
        optimizer = torch.optim.Adam(model.param_groups())
        assert "tail" in [g["name"] for g in optimizer.param_groups]
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
            optimizer.step()

    model.add_domain("a", 3)
    train("a")
    model.eval()
    with model.domain("a"), torch.no_grad():
        logits_a = model(x)
    path = str(tmp_path / "a.safetensors")
    model.save_domain("a", path)
    tail_slots = [s for s in model.domain_tensors("a") if ".module." in s]
    assert tail_slots  # the tail's weights belong to the domain
    statistics = [s for s in tail_slots if s.endswith(("running_mean", "running_var"))]
    # and those of its BNs on batch statistics: the last BN's running mean and variance, every BN's, or none
    if method == "da2_tail1":
        assert len(statistics) == 2
    elif method == "da2_tail1_batch_stats":
        assert len(statistics) > 2
    else:
        assert not statistics
    if statistics:  # learned: no longer those every new domain starts from
        assert any(not torch.equal(model.domain_tensors("a")[s], model._template[s]) for s in statistics)
    model.add_domain("b", 5)
    train("b")
    model.eval()
    with model.domain("a"), torch.no_grad():
        assert torch.equal(model(x), logits_a)  # bit-identical after learning b
    other = da2ext.MultiDomainModel(copy.deepcopy(original), method=method)
    other.load_domain(path)
    other.eval()
    with other.domain("a"), torch.no_grad():
        assert torch.equal(other(x), logits_a)
    assert os.path.getsize(path) > 4 * sum(model.domain_tensors("a")[s].numel() for s in tail_slots)


def test_cli_tail_flags_spell_the_tail_methods():
    from da2ext.cli import CommandError, _resolve_tail, build_parser
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--train-last", "2"])
    _resolve_tail(args)
    assert args.method == "da2_tail2"
    args = parser.parse_args(["train", "--data", "d", "--memory-budget-mib", "64"])
    _resolve_tail(args)
    assert args.method == "da2_budget64"
    args = parser.parse_args(["train", "--data", "d", "--method", "bias", "--train-last", "2"])
    with pytest.raises(CommandError, match="apply to --method da2"):
        _resolve_tail(args)
    args = parser.parse_args(["train", "--data", "d", "--train-last", "1", "--memory-budget-mib", "9"])
    with pytest.raises(CommandError, match="contradict"):
        _resolve_tail(args)
    assert methods.get("da2_tail3").name == "da2_tail3"
    assert methods.get("da2_tail3_frozen_stats").name == "da2_tail3_frozen_stats"
    assert methods.get("da2_tail3_batch_stats").name == "da2_tail3_batch_stats"
    with pytest.raises(ValueError, match="unknown method"):
        methods.get("da2_tail3_running_stats")
    with pytest.raises(ValueError, match="unknown method"):
        methods.get("da2_tail0")
