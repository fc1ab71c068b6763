"""CUDAGraphStep: a captured training step gives the same parameters as the same
steps run eagerly, leaves the model as it found it, and refuses what a graph
cannot replay, with errors that say so. The CUDA cases skip without a GPU; the
argument checks run everywhere."""
import copy

import pytest
import torch
from torch import nn

import da2ext
from helpers import (adapt_quietly, adapted_resnet18, batches, eager_steps, kernel_devices, make_original,
                     relative_error, sgd)

needs_cuda = pytest.mark.skipif("cuda" not in kernel_devices(), reason="needs a CUDA GPU and a CUDA build of da2ext")


def assert_states_agree(graphed, eager, eager_again):
    """Every floating tensor of the graphed model close (relative error in norm) to the
    eager model's: within 1e-4, or 10x the worst difference between two eager runs of
    the same steps where those differ more (atomics, in cuDNN and scatter_add, differ
    from run to run, and a few steps of SGD magnify it in the shift sums)."""
    eager_state, graphed_state, again_state = eager.state_dict(), graphed.state_dict(), eager_again.state_dict()
    errors = sorted(((relative_error(graphed_state[name].float(), tensor.float()),
                      relative_error(again_state[name].float(), tensor.float()), name)
                     for name, tensor in eager_state.items() if tensor.is_floating_point()), reverse=True)
    floor = max(e0 for _, e0, _ in errors)
    print("worst relative errors, graphed vs eager (eager vs eager):",
          ", ".join("{} {:.1e} ({:.1e})".format(name, e, e0) for e, e0, name in errors[:5]),
          "; worst eager vs eager {:.1e}".format(floor))
    assert errors[0][0] <= max(1e-4, 10 * floor), errors[:5]


@pytest.fixture
def deterministic():
    """cuDNN's and torch's deterministic algorithms where they have them (warnings elsewhere)."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except TypeError:  # torch < 1.11 (the Jetson's 1.10) has no warn_only
        pytest.skip("needs torch.use_deterministic_algorithms(..., warn_only=True) (torch >= 1.11)")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2])


# ----------------------------------------------------------------------------------------------
# Everywhere: what cannot be captured is refused before anything runs


def test_cpu_tensors_are_refused():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            da2ext.CUDAGraphStep(nn.Linear(2, 2), nn.MSELoss(), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1),
                                 torch.zeros(1, 2), torch.zeros(1, 2))
        return
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="example_inputs must be on a CUDA device"):
        da2ext.CUDAGraphStep(model, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=1),
                             torch.zeros(1, 2), torch.zeros(1, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_elsewhere_and_uncapturable_optimizer_are_refused():
    model = nn.Linear(2, 2)  # on the CPU
    x, y = torch.zeros(1, 2, device="cuda"), torch.zeros(1, 2, device="cuda")
    with pytest.raises(ValueError, match="model tensor weight must be on a CUDA device"):
        da2ext.CUDAGraphStep(model, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=1), x, y)
    model = model.cuda()
    with pytest.raises(ValueError, match="capturable=True"):
        da2ext.CUDAGraphStep(model, nn.MSELoss(), torch.optim.Adam(model.parameters()), x, y)
    with pytest.raises(ValueError, match="example_targets must be on a CUDA device"):
        da2ext.CUDAGraphStep(model, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=1), x, torch.zeros(1, 2))


# ----------------------------------------------------------------------------------------------
# On a GPU: the captured step is the eager step


@needs_cuda
@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_graphed_steps_match_eager_steps_on_the_lean_model(optimizer_name, deterministic):
    device = torch.device("cuda")
    eager = adapted_resnet18(device)
    graphed, eager_again = copy.deepcopy(eager), copy.deepcopy(eager)
    before = copy.deepcopy(graphed.state_dict())
    data = batches(device)

    def make_optimizer(model):
        if optimizer_name == "sgd":
            return sgd(model)
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, capturable=True)

    eager_losses = eager_steps(eager, make_optimizer(eager), data)
    eager_steps(eager_again, make_optimizer(eager_again), data)
    optimizer = make_optimizer(graphed)
    step = da2ext.CUDAGraphStep(graphed, nn.CrossEntropyLoss(), optimizer, *data[0])
    # The warm-up changed nothing the caller sees.
    for name, tensor in graphed.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    graphed_losses = [step(inputs, targets).item() for inputs, targets in data]

    assert graphed_losses[:2] == pytest.approx(eager_losses[:2], rel=1e-4, abs=1e-5)
    assert graphed_losses[0] != graphed_losses[-1]  # the steps did train
    assert_states_agree(graphed, eager, eager_again)


@needs_cuda
def test_full_fine_tuning_with_train_mode_batch_norm_matches_too(deterministic):
    torchvision = pytest.importorskip("torchvision")
    device = torch.device("cuda")
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).to(device).train()
    graphed, eager_again = copy.deepcopy(eager), copy.deepcopy(eager)
    data = batches(device)
    eager_losses = eager_steps(eager, sgd(eager), data)
    eager_steps(eager_again, sgd(eager_again), data)
    step = da2ext.CUDAGraphStep(graphed, nn.CrossEntropyLoss(), sgd(graphed), *data[0])
    graphed_losses = [step(inputs, targets).item() for inputs, targets in data]
    assert graphed_losses[:2] == pytest.approx(eager_losses[:2], rel=1e-4, abs=1e-5)
    assert_states_agree(graphed, eager, eager_again)  # running statistics included


@needs_cuda
def test_batches_of_another_shape_and_changed_learning_rates_are_refused():
    device = torch.device("cuda")
    model = adapted_resnet18(device)
    optimizer = sgd(model)
    inputs, targets = batches(device, count=1)[0]
    step = da2ext.CUDAGraphStep(model, nn.CrossEntropyLoss(), optimizer, inputs, targets)
    with pytest.raises(ValueError, match=r"inputs must be torch.float32 \(4, 3, 64, 64\) as captured"):
        step(inputs[:3], targets[:3])
    with pytest.raises(ValueError, match="targets must be torch.int64"):
        step(inputs, targets.float())
    optimizer.param_groups[0]["lr"] *= 0.5
    with pytest.raises(ValueError, match="learning rates changed since capture"):
        step(inputs, targets)


@pytest.mark.parametrize("family", ["resnet18", "mobilenet_v2", "tf_efficientnet_lite0"])
def test_lean_step_never_reads_a_tensor_on_the_host(family):
    """A CUDA graph cannot capture a device-to-host read (.item(), int(t), a
    data-dependent shape): aten::_local_scalar_dense, whatever the device. The
    lean model's whole training step is run here on the CPU under a dispatch mode
    that records every op, so CI without a GPU sees such a read too (the stem
    pool's table size once came from one and broke CUDAGraphStep on the H100)."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")
    if not hasattr(dispatch, "TorchDispatchMode"):
        pytest.skip("needs torch.utils._python_dispatch.TorchDispatchMode (torch >= 1.13)")

    class HostReads(dispatch.TorchDispatchMode):
        def __init__(self):
            super(HostReads, self).__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads.append(func)
            return func(*args, **(kwargs or {}))

    original, shape = make_original(family)
    model = adapt_quietly(original, 10)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    inputs, targets = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    for _ in range(2):  # the second step has momentum buffers to update
        with HostReads() as mode:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        assert mode.reads == [], "{} host reads in one training step".format(len(mode.reads))
