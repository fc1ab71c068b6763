"""torch.compile(..., fullgraph=True) traces the fused ops (their fake kernels,
da2ext/ops/fake_kernels.py) and the autograd Functions around them without a
graph break, and the compiled model trains as the eager one does: the same
loss, gradients and updated parameters within float tolerance, with the
da2ext kernels running inside the compiled step."""
import copy
import importlib

import pytest
import torch

import da2ext
from da2ext.ops.fake_kernels import has_op
from da2ext.ops import _extension
from helpers import adapted_resnet18, batches, eager_steps, relative_error, sgd

residual_attention_module = importlib.import_module("da2ext.ops.residual_attention")

pytestmark = [
    pytest.mark.skipif(da2ext.backend("cpu") != "cpu", reason="needs the compiled extension (da2ext._C)"),
    pytest.mark.skipif(not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
                       reason="torch.compile needs torch >= 2.0 on a Python it supports"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("order", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("rank", [1, 4])
def test_compiled_adaptor_matches_eager(rank, mode, order):
    torch.manual_seed(0)
    adaptor = da2ext.ResidualAttentionAdaptor(16, reduction=4, mode=mode, rank=rank)
    with torch.no_grad():
        adaptor.gamma.normal_(std=0.5)
    compiled_adaptor = copy.deepcopy(adaptor)
    compiled = torch.compile(compiled_adaptor, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 16, 9, 7)
    if order == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    outputs = []
    for module in (adaptor, compiled):
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        outputs.append((y, leaf.grad))
    assert relative_error(outputs[1][0], outputs[0][0]) < 1e-6
    assert relative_error(outputs[1][1], outputs[0][1]) < 1e-5
    for (name, p), q in zip(adaptor.named_parameters(), compiled_adaptor.parameters()):
        assert relative_error(q.grad, p.grad) < 1e-5, name


def test_a_compiled_adaptor_takes_a_dynamic_batch_and_map_size():
    # dynamic=True traces symbolic sizes: a last batch of another size or another
    # input resolution reuses the graph (fake kernels and the branch's conv take SymInts).
    torch.manual_seed(0)
    adaptor = da2ext.ResidualAttentionAdaptor(16, reduction=4, rank=4)
    with torch.no_grad():
        adaptor.gamma.normal_(std=0.5)
    compiled = torch.compile(adaptor, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(3, 16, 9, 7), (5, 16, 12, 12), (1, 16, 30, 30)]:
        x = torch.randn(shape, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        leaf = x.detach().clone().requires_grad_()
        expected = adaptor(leaf)
        expected.sum().backward()
        assert relative_error(y, expected) < 1e-6
        assert relative_error(x.grad, leaf.grad) < 1e-5


def da2ext_ops_run(step):
    """The da2ext kernels that ran in `step()`, counted by torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    counts = {}
    for event in profile.events():
        if event.name.startswith("da2ext::"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def test_compiled_adapted_resnet18_trains_a_step_as_eager():
    # The default backend (inductor): the graph it generates calls the kernels.
    eager_model = adapted_resnet18("cpu")
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    data = batches("cpu", count=1)
    eager_loss = eager_steps(eager_model, sgd(eager_model), data)
    compiled_optimizer = sgd(compiled_model)
    compiled_loss = []
    ran = da2ext_ops_run(lambda: compiled_loss.extend(eager_steps(compiled, compiled_optimizer, data)))
    assert abs(compiled_loss[0] - eager_loss[0]) <= 1e-5 * abs(eager_loss[0])
    # On the CPU the adaptor's passes run inside its forward and backward ops (the one-op adaptor, whose
    # C++ autograd node AOTAutograd traces through); op by op (older torch), as ops of their own.
    adaptor_ops = ({"da2ext::residual_attention_forward", "da2ext::residual_attention_backward"}
                   if has_op("residual_attention") else
                   {"da2ext::descriptor_pool", "da2ext::attention_apply", "da2ext::attention_backward_reduce",
                    "da2ext::attention_input_grad"})
    expected = adaptor_ops | {"da2ext::packed_activation_backward_channel_sums"}
    assert expected <= set(ran), "the compiled step did not run the kernels: {}".format(ran)
    compared = 0
    for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
        if p.requires_grad:
            assert relative_error(q.grad, p.grad) < 1e-4, name
            assert relative_error(q, p) < 1e-5, name  # after the SGD step
            compared += 1
    assert compared == sum(1 for p in eager_model.parameters() if p.requires_grad) > 0


def test_a_compiled_adaptor_refuses_bad_input_as_eager_does():
    compiled = torch.compile(da2ext.ResidualAttentionAdaptor(8), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="channels"):
        compiled(torch.randn(2, 6, 4, 4))
    with pytest.raises(Exception, match="4-D"):
        compiled(torch.randn(2, 8, 4))


def test_compiled_lean_block_keeps_packed_masks_not_activations():
    # What the compiled step keeps for backward stays the lean one: masks and
    # descriptors, not the block's float activations.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = da2ext.adapt(torchvision.models.resnet18(), 10).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    exclude = da2ext.profiling.model_state(model)
    with da2ext.SavedTensorCounter(exclude=exclude) as eager_kept:
        model(x)
    with da2ext.SavedTensorCounter(exclude=exclude) as compiled_kept:
        compiled(x)
    stem_output_bytes = 2 * 64 * 32 * 32 * 4  # one float32 activation of the stem
    assert compiled_kept.saved_bytes < stem_output_bytes
    assert compiled_kept.saved_bytes < 2 * eager_kept.saved_bytes


def test_compiled_adaptor_without_kernels_compiles_the_reference(monkeypatch):
    # Where the kernels are missing the reference runs, and compiles as plain PyTorch.
    monkeypatch.setattr(residual_attention_module, "kernels_available", lambda device_type: False)
    monkeypatch.setattr(_extension, "_warned", set())
    adaptor = da2ext.ResidualAttentionAdaptor(8)
    with torch.no_grad():
        adaptor.gamma.normal_(std=0.5)
    x = torch.randn(2, 8, 5, 5)
    with pytest.warns(RuntimeWarning, match="reference"):
        expected = adaptor(x)
    compiled = torch.compile(adaptor, fullgraph=True, backend="aot_eager")
    assert relative_error(compiled(x), expected) < 1e-6


@pytest.mark.skipif(not hasattr(torch, "export"), reason="torch.export needs torch >= 2.1")
def test_torch_export_sees_the_ops_of_an_adapted_model_with_a_dynamic_batch():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = da2ext.adapt(torchvision.models.resnet18(), 10, rank=4).eval()
    with torch.no_grad():
        for adaptor in (m for m in model.modules() if isinstance(m, da2ext.ResidualAttentionAdaptor)):
            adaptor.gamma.normal_(std=0.5)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes={"x": {0: batch}})
    targets = set(str(node.target) for node in exported.graph.nodes)
    # On the CPU the adaptor is one op (its autograd in C++); op by op, the pool and the apply.
    assert "da2ext.residual_attention.default" in targets or \
        {"da2ext.descriptor_pool.default", "da2ext.attention_apply.default"} <= targets
    for size in (1, 5):
        x = torch.randn(size, 3, 64, 64)
        with torch.no_grad():
            assert relative_error(exported.module()(x), model(x)) < 1e-6
