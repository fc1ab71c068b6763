"""The training loop's steps replayed from a CUDA graph (train_domain(cuda_graph=True),
`train --cuda-graph`; da2ext/training/loop_graph.py).

Everywhere: where a graph cannot be used the run is eager, says why and learns the
very weights of a run that did not ask; learning rates as tensors follow the
schedule in place and step Adam as floats do; a checkpoint of either kind of run
resumes in the other. On a CUDA device: a graphed run learns what an eager run
learns, its short last batch runs eagerly, and a step that cannot be captured is
said and the run goes on eagerly from where it was.
"""
import warnings

import pytest
import torch

from da2ext.data.loaders import domain_loaders
from da2ext.training import loop
from da2ext.training.loop_graph import LoopGraph, graph_unavailable, learning_rates_as_tensors, match_optimizer_to_run
from da2ext.training.lr_schedule import warmup_cosine_scheduler
from da2ext.training.workflow import build_model
from helpers import CLI_TINY, IMAGE_SIZE, run_cli, write_image_folder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    # 40 training images at batch 16: two full batches and a short one of 8 per epoch
    return write_image_folder(str(tmp_path_factory.mktemp("data") / "shapes"), train_per_class=10)


def _run(shapes_dir, device="cpu", epochs=2, model=None, **kwargs):
    model = model or build_model("resnet18", "da2", pretrained=False, seed=0, device=device)
    train_loader, val, classes = domain_loaders(shapes_dir, backbone="resnet18", image_size=IMAGE_SIZE,
                                                batch_size=16, seed=0)
    model.add_domain("shapes", len(classes), classes)
    metrics = loop.train_domain(model, "shapes", train_loader, val, epochs, progress=False, **kwargs)
    weights = dict((slot, t.detach().cpu().clone()) for slot, t in model.domain_tensors("shapes").items())
    return metrics, weights


def test_where_a_graph_cannot_be_used_the_run_is_eager_and_says_why(shapes_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, graphed_weights = _run(shapes_dir, cuda_graph=True)
    said = [str(w.message) for w in caught if "--cuda-graph" in str(w.message)]
    assert len(said) == 1 and "needs a CUDA device" in said[0], said
    assert graphed["cuda_graph"] == {"captured": False, "replayed_steps": 0, "capture_seconds": None,
                                     "not_used": graph_unavailable("cpu")}
    plain, plain_weights = _run(shapes_dir)
    assert plain["cuda_graph"] is None
    assert sorted(graphed_weights) == sorted(plain_weights)
    for slot in plain_weights:
        assert torch.equal(graphed_weights[slot], plain_weights[slot]), slot
    assert graphed["learning_rates"] == plain["learning_rates"]


def test_graph_unavailable_names_the_reason():
    assert "CUDA device" in graph_unavailable("cpu")
    if torch.cuda.is_available():
        assert "torch.distributed" in graph_unavailable("cuda", distributed=object())


def _model_and_groups(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    groups = [{"params": list(model[0].parameters()), "lr": 0.1, "name": "first"},
              {"params": list(model[1].parameters()), "lr": 0.01, "name": "second"}]
    return model, groups


def _adam_steps(model, optimizer, steps=12):
    scheduler = warmup_cosine_scheduler(optimizer, steps, 0.25)
    data = torch.Generator().manual_seed(3)
    rates = []
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 6, generator=data)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        rates.extend(float(g["lr"]) for g in optimizer.param_groups)
    return rates


def test_tensor_learning_rates_follow_the_schedule_in_place_and_step_adam_as_floats_do():
    floats, float_groups = _model_and_groups()
    float_rates = _adam_steps(floats, torch.optim.Adam(float_groups, foreach=False))
    tensors, tensor_groups = _model_and_groups()
    # On the CPU: Adam without capturable takes a tensor rate in its single-tensor loop.
    optimizer = torch.optim.Adam(learning_rates_as_tensors(tensor_groups, "cpu"), foreach=False)
    rate_tensors = [g["lr"] for g in optimizer.param_groups]
    assert all(torch.is_tensor(r) and r.dtype == torch.float32 and r.numel() == 1 for r in rate_tensors)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.01]  # the schedule's base: floats
    tensor_rates = _adam_steps(tensors, optimizer)
    # the same tensors throughout (a captured step reads them at their addresses), filled with the schedule
    assert all(g["lr"] is r for g, r in zip(optimizer.param_groups, rate_tensors))
    assert tensor_rates == pytest.approx(float_rates, rel=1e-6)
    for a, b in zip(floats.parameters(), tensors.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_rate_a_scheduler_assigns_as_a_float_goes_back_into_the_tensor_the_graph_reads():
    # torch's schedulers before the in-place fill assigned floats: the graph would keep its captured rate
    model, groups = _model_and_groups()
    optimizer = torch.optim.Adam(learning_rates_as_tensors(groups, "cpu"), foreach=False)
    graph = LoopGraph(model, optimizer)
    graph.rates = [g["lr"] for g in optimizer.param_groups]  # what capture() records
    for group, rate in zip(optimizer.param_groups, (0.05, 0.005)):
        group["lr"] = rate
    graph.keep_rates()
    for group, tensor, rate in zip(optimizer.param_groups, graph.rates, (0.05, 0.005)):
        assert group["lr"] is tensor and float(tensor) == pytest.approx(rate)


def test_a_checkpoint_of_either_kind_of_run_resumes_in_the_other():
    model, groups = _model_and_groups()
    graphed = torch.optim.Adam(learning_rates_as_tensors(groups, "cpu"), foreach=False)
    _adam_steps(model, graphed, steps=3)
    state = graphed.state_dict()
    for group in state["param_groups"]:
        group["capturable"] = True  # as a graphed run's, on CUDA

    _, plain_groups = _model_and_groups()
    plain = torch.optim.Adam(plain_groups)
    plain.load_state_dict(state)
    match_optimizer_to_run(plain, graphed=False, device="cpu")
    for group in plain.param_groups:
        assert isinstance(group["lr"], float) and isinstance(group["initial_lr"], float)
        assert group["capturable"] is False
    assert all(s["step"].device.type == "cpu" for s in plain.state.values())

    match_optimizer_to_run(plain, graphed=True, device="cpu")
    for group, rate in zip(plain.param_groups, state["param_groups"]):
        assert torch.is_tensor(group["lr"]) and float(group["lr"]) == pytest.approx(float(rate["lr"]))
        assert isinstance(group["initial_lr"], float) and group["capturable"] is True


@needs_cuda
def test_on_cuda_a_graphed_run_learns_what_an_eager_run_learns_its_short_batches_eagerly(shapes_dir):
    eager, eager_weights = _run(shapes_dir, device="cuda", epochs=3)
    graphed, graphed_weights = _run(shapes_dir, device="cuda", epochs=3, cuda_graph=True)
    summary = graphed["cuda_graph"]
    assert summary["captured"] and summary["not_used"] is None
    # per epoch 3 steps, the last one short: the first full step eager (then the capture), every other
    # full one replayed, every short one eager
    assert graphed["steps"] == eager["steps"] == 9
    assert summary["replayed_steps"] == 9 - 1 - 3
    assert graphed["saved_bytes"] == eager["saved_bytes"]
    # capturable Adam's arithmetic on device step counts, float32 rates: the same steps to rounding
    for slot in eager_weights:
        assert torch.allclose(graphed_weights[slot], eager_weights[slot], rtol=1e-3, atol=1e-5), slot
    assert graphed["final_val_accuracy"] == pytest.approx(eager["final_val_accuracy"], abs=0.05)


def _synchronise(module, inputs, output):
    """A forward hook that reads a value on the host: it runs eagerly, it cannot be captured."""
    float(output.detach().abs().sum())


@needs_cuda
def test_on_cuda_a_step_that_cannot_be_captured_is_said_and_the_run_goes_on_eagerly(shapes_dir):
    def model_with_synchronising_forward():
        model = build_model("resnet18", "da2", pretrained=False, seed=0, device="cuda")
        model.register_forward_hook(_synchronise)
        return model
    eager, eager_weights = _run(shapes_dir, device="cuda", model=model_with_synchronising_forward())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, graphed_weights = _run(shapes_dir, device="cuda", model=model_with_synchronising_forward(),
                                        cuda_graph=True)
    said = [str(w.message) for w in caught if "could not be captured" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert not graphed["cuda_graph"]["captured"] and graphed["cuda_graph"]["replayed_steps"] == 0
    # the warm-up undone: the run goes on from the first step's weights, as the eager run does
    for slot in eager_weights:
        assert torch.allclose(graphed_weights[slot], eager_weights[slot], rtol=1e-3, atol=1e-5), slot


def test_train_cuda_graph_on_the_cpu_trains_eagerly_and_says_why(shapes_dir, tmp_path, capsys):
    argv = ["train", "--data", shapes_dir, "--workdir", str(tmp_path / "runs"), "--epochs", "1",
            "--cuda-graph"] + CLI_TINY
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    assert "val accuracy" in out
    said = [str(w.message) for w in caught if "--cuda-graph" in str(w.message)]
    assert len(said) == 1 and "needs a CUDA device" in said[0], said
