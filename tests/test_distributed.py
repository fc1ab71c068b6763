"""Learning a domain in a torch.distributed group (gloo on the CPU), with real
processes: what two processes learn is what one process learns over the same
global batches, a step's gradients are averaged over the processes, a killed
process makes the other fail instead of hang, and an interrupted run resumes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import da2ext
from helpers import adapted_resnet18, batches, write_image_folder

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo process groups as tested here are POSIX"),
]

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(da2ext.__file__)))
TINY = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "32", "--no-progress"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p))
    env.update((k, str(v)) for k, v in extra.items())
    return env


def torchrun(processes, arguments, cwd, timeout=300):
    """`torchrun --nproc-per-node N ARGUMENTS` to the end; its output."""
    # --standalone: torchrun picks a free port itself (no race with other processes for one)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(processes)] + arguments
    result = subprocess.run(command, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def group_of_processes(world_size, arguments, cwd, log_dir):
    """The processes of a group started by hand (what torchrun sets up), so that one can be killed."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        log = open(os.path.join(log_dir, "rank{}.log".format(rank)), "w")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "da2ext"] + arguments, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            env=environment(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world_size, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port)))
    return processes


def wait_for(path, processes, timeout=240):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, "{} did not appear".format(path)
        assert all(p.poll() is None for p in processes), "a process ended before {} appeared".format(path)
        time.sleep(0.02)


def domain_tensors(workdir):
    from safetensors.torch import load_file
    return load_file(os.path.join(workdir, "domains", "da2", "shapes.safetensors"))


def largest_difference(a, b, kind):
    """The largest relative difference (in norm) over the tensors of one kind."""
    def kind_of(name):
        if ".branch." in name:
            return "branches"
        return "adaptors" if ".adaptor." in name else ("head" if name.startswith("fc.") else "shifts")
    return max((a[k].double() - b[k].double()).norm().item() / max(a[k].double().norm().item(), 1e-12)
               for k in a if kind_of(k) == kind)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    pytest.importorskip("torchvision")
    pytest.importorskip("safetensors")
    return write_image_folder(str(tmp_path_factory.mktemp("data") / "shapes"), train_per_class=16, val_per_class=5)


def test_two_processes_learn_what_one_learns_over_the_same_global_batches(shapes, tmp_path):
    common = ["-m", "da2ext", "train", "--data", shapes, "--epochs", "2"] + TINY
    out = torchrun(2, common + ["--workdir", str(tmp_path / "two"), "--batch-size", "8"], str(tmp_path))
    assert "2 processes" in out and out.count("val accuracy") == 1  # process 0 alone reports
    torchrun(1, common + ["--workdir", str(tmp_path / "one"), "--batch-size", "16"], str(tmp_path))
    two, one = domain_tensors(str(tmp_path / "two")), domain_tensors(str(tmp_path / "one"))
    assert sorted(two) == sorted(one)
    # The same sums in another order: float noise, which Adam's normalisation magnifies where
    # gradients are tiny (the adaptors' MLPs, whose gamma starts at 0; the branches, whose BN
    # scale does, and whose gradient reaches every shift). One step's gradients agree to 1e-5
    # (test_a_steps_gradients_are_averaged_over_the_processes).
    assert largest_difference(one, two, "head") < 1e-3
    assert largest_difference(one, two, "shifts") < 1e-2
    assert largest_difference(one, two, "adaptors") < 2e-2
    # the late branches' BN normalises over the whole group's batch, as one process's
    assert largest_difference(one, two, "branches") < 2e-2
    with open(str(tmp_path / "two" / "metrics" / "shapes-da2.json")) as f:
        metrics = json.load(f)
    assert metrics["world_size"] == 2 and metrics["settings"]["world_size"] == 2
    assert not os.path.exists(str(tmp_path / "two" / "checkpoints" / "shapes-da2.pt"))


# The step runs in a function, as train's does: DistributedDataParallel holds the process group,
# and a wrapper left in a module global is freed only while the interpreter shuts down, where
# tearing gloo's group down can abort the process (it did once in CI: SIGABRT after the step).
# Once more in CI with the wrapper freed and the group destroyed, rank 1 aborted with "terminate
# called without an active exception" (not reproduced here in 30 runs, idle or under load): the message
# of a C++ object destroyed while the interpreter tears its modules down, as in PyTorch's own gloo
# tests (pytorch/pytorch#65237). What this test checks is done by then, so the script says so and
# leaves without that teardown; an abort before it still fails the test, naming the rank.
STEP_SCRIPT = """
import os, sys, torch, torch.nn.functional as F
sys.path.insert(0, {tests!r})
from helpers import adapted_resnet18, batches
from da2ext.training.distributed import DistributedRun

def step(run):
    model = adapted_resnet18("cpu", branch_width={branch_width!r})
    images, labels = batches("cpu", count=1, batch_size=8)[0]
    share = slice(run.rank * 8 // run.world_size, (run.rank + 1) * 8 // run.world_size)
    wrapped = run.wrap(model)
    F.cross_entropy(wrapped(images[share]), labels[share]).backward()
    if run.is_main:
        torch.save({{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}, {out!r})

run = DistributedRun.from_environment("cpu", 60)
step(run)
run.close()
print("rank {{}}: step done, group left".format(run.rank), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("branch_width", [None, 8])
def test_a_steps_gradients_are_averaged_over_the_processes(tmp_path, branch_width):
    """Each process's share of one batch: the averaged gradients are one process's over the
    whole batch, the late branches' BN included (its statistics are the group's)."""
    pytest.importorskip("torchvision")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT.format(tests=tests_dir, out=str(tmp_path / "grads.pt"), branch_width=branch_width))
    out = torchrun(2, [str(script)], str(tmp_path))
    assert "rank 0: step done" in out and "rank 1: step done" in out, out[-2000:]
    grads = torch.load(str(tmp_path / "grads.pt"))
    # The reference runs on one thread, as each process does (OMP_NUM_THREADS=1): oneDNN's and MKL's
    # sums are in another order on two threads, noise the branches' BN then magnifies.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = adapted_resnet18("cpu", branch_width=branch_width)
        images, labels = batches("cpu", count=1, batch_size=8)[0]
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    finally:
        torch.set_num_threads(threads)
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(expected)
    # float32 sums in another order; a branch's BN adds the group's statistics, summed across the processes,
    # whose rounding reaches every earlier gradient (1e-7 in absolute on the smallest, about 2e-5 in norm)
    tolerance, floor = (1e-5, 1e-9) if branch_width is None else (5e-5, 1e-6)
    for name, grad in expected.items():
        scale = max(grad.norm().item(), 1e-6)
        assert (grads[name] - grad).norm().item() <= tolerance * scale + floor, name


def test_a_killed_process_makes_the_other_fail_instead_of_hanging(shapes, tmp_path):
    workdir = str(tmp_path / "runs")
    arguments = ["train", "--data", shapes, "--workdir", workdir, "--epochs", "50", "--batch-size", "4",
                 "--dist-timeout", "30"] + TINY
    processes = group_of_processes(2, arguments, str(tmp_path), str(tmp_path))
    try:
        wait_for(os.path.join(workdir, "checkpoints", "shapes-da2.pt"), processes)
        processes[1].send_signal(signal.SIGKILL)
        status = processes[0].wait(timeout=120)  # within the group's timeout, not never
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert status != 0
    assert not os.path.exists(os.path.join(workdir, "domains", "da2", "shapes.safetensors"))


def test_an_interrupted_group_resumes_and_finishes_as_an_uninterrupted_one(shapes, tmp_path):
    arguments = ["train", "--data", shapes, "--epochs", "4", "--batch-size", "4"] + TINY
    workdir = str(tmp_path / "interrupted")
    processes = group_of_processes(2, arguments + ["--workdir", workdir], str(tmp_path), str(tmp_path))
    try:
        wait_for(os.path.join(workdir, "checkpoints", "shapes-da2.pt"), processes)
        for p in processes:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in processes:
            p.wait(timeout=60)
    assert not os.path.exists(os.path.join(workdir, "domains", "da2", "shapes.safetensors")), \
        "the run finished before it was killed: give it more work"
    torchrun(2, ["-m", "da2ext"] + arguments + ["--workdir", workdir], str(tmp_path))
    with open(os.path.join(workdir, "metrics", "shapes-da2.json")) as f:
        metrics = json.load(f)
    assert 1 <= metrics["resumed_from_epoch"] < 4 and metrics["world_size"] == 2
    torchrun(2, ["-m", "da2ext"] + arguments + ["--workdir", str(tmp_path / "straight")], str(tmp_path))
    resumed, straight = domain_tensors(workdir), domain_tensors(str(tmp_path / "straight"))
    for kind in ("head", "shifts", "adaptors"):
        assert largest_difference(straight, resumed, kind) < 1e-6, kind
