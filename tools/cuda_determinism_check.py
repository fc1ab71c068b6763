"""Run-to-run reproducibility of training steps on CUDA, eager and as a CUDA graph.

    python tools/cuda_determinism_check.py
    python tools/cuda_determinism_check.py --cpu     # the same two eager runs on the CPU (no graph)

Three SGD steps of adapt()'s lean ResNet-18 (adaptor gamma ~ N(0, 0.5), as in
tests/test_cuda_graph_step.py) and of the same model plainly frozen
(adapt(..., lean=False), gamma as initialised), each run twice eagerly and once
through da2ext.CUDAGraphStep from the same start. Printed per case: the three
tensors that differ most between the runs (relative error in norm), and whether
the losses are equal. First with PyTorch's defaults, then with cuDNN's and
torch's deterministic algorithms. --cpu: the lean model's two eager runs on
the CPU, for comparison.

Then two probes of where the lean model's run-to-run difference comes from:
the same eager comparison with only cuDNN's deterministic switch, and with
torch's deterministic algorithms but without their filling of uninitialised
memory (torch.utils.deterministic.fill_uninitialized_memory); and one forward
and backward of the lean model run twice from the same start, with the CUDA
caching allocator's free blocks holding different junk each time. A gradient
that depends on the junk was computed from memory nobody wrote.
"""
import copy
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import da2ext  # noqa: E402
from helpers import adapted_resnet18, batches, eager_steps, relative_error, sgd  # noqa: E402


def plainly_frozen_resnet18(device):
    import torchvision
    torch.manual_seed(0)
    return da2ext.adapt(torchvision.models.resnet18(), 10, lean=False).to(device).train()


def worst_differences(a, b, count=3):
    state_a, state_b = a.state_dict(), b.state_dict()
    return sorted(((relative_error(state_a[k].float(), state_b[k].float()), k) for k in state_a
                   if state_a[k].is_floating_point()), reverse=True)[:count]


def _leave_junk_in_cache(value, device):
    """Fill free blocks of the CUDA caching allocator (or of the CPU's malloc) with
    `value`: tensors of every power-of-two size from 4 KiB to 256 MiB, written and
    freed. Later torch.empty calls get these blocks back as they were left."""
    blocks = [torch.full((2 ** k,), value, device=device) for k in range(10, 27)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del blocks


def junk_sensitivity(model, batch):
    """One forward and backward of `model` from the same start, twice, with junk of
    a different value in the allocator's free blocks each time; prints the
    gradients that differ (relative error in norm) and whether the losses agree."""
    inputs, targets = batch
    runs = []
    for junk in (0.0, 1e4):
        replica = copy.deepcopy(model)
        _leave_junk_in_cache(junk, inputs.device)
        loss = nn.functional.cross_entropy(replica(inputs), targets)
        loss.backward()
        runs.append((loss.item(), dict((n, p.grad.float()) for n, p in replica.named_parameters()
                                       if p.grad is not None)))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    worst = sorted(((relative_error(grads_b[n], grads_a[n]), n) for n in grads_a), reverse=True)[:3]
    print("lean, one step with junk 0 vs 1e4 in the allocator's free blocks: {} (losses equal: {})".format(
        worst, loss_a == loss_b), flush=True)


def compare(label, make_model, device):
    first = make_model(device)
    second, graphed = copy.deepcopy(first), copy.deepcopy(first)
    data = batches(device)
    losses = eager_steps(first, sgd(first), data)
    same = eager_steps(second, sgd(second), data) == losses
    print("{}: eager vs eager {} (losses equal: {})".format(label, worst_differences(second, first), same), flush=True)
    if device.type != "cuda":
        return
    step = da2ext.CUDAGraphStep(graphed, nn.CrossEntropyLoss(), sgd(graphed), *data[0])
    same = [step(x, y).item() for x, y in data] == losses
    print("{}: graphed vs eager {} (losses equal: {})".format(label, worst_differences(graphed, first), same),
          flush=True)


def main(argv):
    if "--cpu" in argv:
        compare("lean, gamma N(0, 0.5), CPU", adapted_resnet18, torch.device("cpu"))
        junk_sensitivity(adapted_resnet18(torch.device("cpu")), batches(torch.device("cpu"))[0])
        return 0
    if not torch.cuda.is_available() or da2ext.backend("cuda") != "cuda":
        print("needs a CUDA GPU and a CUDA build of da2ext (or --cpu)")
        return 2
    device = torch.device("cuda")
    for deterministic in (False, True):
        if deterministic:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            torch.use_deterministic_algorithms(True, warn_only=True)
        mode = "deterministic" if deterministic else "defaults"
        compare("lean, gamma N(0, 0.5), " + mode, adapted_resnet18, device)
        compare("plainly frozen, gamma 0, " + mode, plainly_frozen_resnet18, device)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = True
    compare("lean, gamma N(0, 0.5), cudnn.deterministic alone", adapted_resnet18, device)
    torch.backends.cudnn.deterministic = False
    fill = getattr(getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory", None)
    if fill is not None:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        compare("lean, gamma N(0, 0.5), deterministic algorithms without filling empty tensors", adapted_resnet18,
                device)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(False)
    junk_sensitivity(adapted_resnet18(device), batches(device)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
