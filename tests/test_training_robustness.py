"""What a user sees when training goes wrong (issue "nothing lost, nothing silently
wrong"): a run whose loss turns NaN stops and saves nothing, a learned domain is not
learned again without --overwrite, an unreadable checkpoint is set aside and the run
starts over, a non-finite --lr-scale is refused by the parser."""
import json
import os

import pytest
import torch

from da2ext.training import NonFiniteTrainingError, loop
from da2ext.training.workflow import build_model
from da2ext.data.loaders import domain_loaders
from helpers import CLI_TINY, CLI_TINY_EVAL, IMAGE_SIZE, run_cli, write_image_folder



@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data") / "shapes"), train_per_class=4, val_per_class=2)


def _tiny_run(shapes_dir, tmp_path, **kwargs):
    model = build_model("resnet18", "da2", pretrained=False, seed=0)
    train_loader, val, classes = domain_loaders(shapes_dir, backbone="resnet18", image_size=IMAGE_SIZE,
                                                batch_size=8, seed=0)
    model.add_domain("shapes", len(classes), classes)
    paths = dict(checkpoint_path=str(tmp_path / "shapes.pt"), metrics_path=str(tmp_path / "shapes.json"),
                 domain_path=str(tmp_path / "shapes.safetensors"))
    return model, paths, lambda epochs=2: loop.train_domain(model, "shapes", train_loader, val, epochs,
                                                            progress=False, **dict(paths, **kwargs))


def _head_bias(model):
    return [t for slot, t in model.domain_tensors("shapes").items() if slot.endswith("fc.bias")][0]


def test_a_run_whose_loss_turns_nan_stops_and_saves_nothing(shapes_dir, tmp_path):
    model, paths, train = _tiny_run(shapes_dir, tmp_path)
    with torch.no_grad():
        _head_bias(model)[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match=r"loss of domain shapes became nan at epoch 1/2, step 1/\d+: "
                                                     r"the run stopped and saved nothing.*--lr-scale"):
        train()
    for path in paths.values():
        assert not os.path.exists(path)


def test_tensors_that_turn_non_finite_stop_a_run_before_its_checkpoint(shapes_dir, tmp_path, monkeypatch):
    model, paths, train = _tiny_run(shapes_dir, tmp_path)
    bias = _head_bias(model)
    real_epoch = loop._train_epoch

    def epoch_that_leaves_an_infinity(run, *args):
        result = real_epoch(run, *args)  # finite losses all along
        with torch.no_grad():
            bias[0] = float("inf")
        return result

    monkeypatch.setattr(loop, "_train_epoch", epoch_that_leaves_an_infinity)
    with pytest.raises(NonFiniteTrainingError, match=r"trained tensors hold non-finite values after epoch 1/2 "
                                                     r"\(.*fc.bias"):
        train()
    for path in paths.values():
        assert not os.path.exists(path)


def test_backbone_weights_with_a_nan_are_refused_naming_the_file(shapes_dir, tmp_path, capsys):
    import torchvision
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = str(tmp_path / "nan_weights.pt")
    torch.save(state, weights)
    runs = str(tmp_path / "runs")
    argv = ["train", "--data", shapes_dir, "--workdir", runs, "--epochs", "1", "--backbone", "resnet18",
            "--image-size", "32", "--batch-size", "16", "--no-progress"]
    status, _, err = run_cli(argv + ["--weights", weights], capsys)
    assert status != 0 and "nan_weights.pt holds NaN or infinite values in 1 tensor(s): layer1.0.conv1.weight" in err
    assert "Traceback" not in err and not os.path.exists(os.path.join(runs, "domains"))
    status, _, err = run_cli(argv + ["--no-pretrained"], capsys)  # the work directory is still usable
    assert status == 0, err


@pytest.mark.parametrize("scale", ["inf", "nan", "0", "-1"])
def test_a_non_finite_or_non_positive_lr_scale_is_refused_by_the_parser(shapes_dir, tmp_path, capsys, scale):
    status, _, err = run_cli(["train", "--data", shapes_dir, "--workdir", str(tmp_path / "runs"),
                               "--lr-scale", scale] + CLI_TINY, capsys)
    assert status == 2 and "--lr-scale: expected a finite positive number" in err, err


def test_a_learned_domain_is_not_learned_again_without_overwrite(shapes_dir, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    base = ["train", "--data", shapes_dir, "--workdir", runs] + CLI_TINY
    assert run_cli(base + ["--epochs", "1"], capsys)[0] == 0
    domain_file = os.path.join(runs, "domains", "da2", "shapes.safetensors")
    with open(domain_file, "rb") as f:
        learned = f.read()
    status, _, err = run_cli(base + ["--epochs", "2"], capsys)
    assert status == 2 and "domain shapes was learned already with method da2" in err, err
    assert "what would change: epochs 1 -> 2" in err and "--overwrite" in err
    with open(domain_file, "rb") as f:
        assert f.read() == learned  # untouched
    status, _, err = run_cli(base + ["--epochs", "2", "--overwrite"], capsys)
    assert status == 0, err
    with open(os.path.join(runs, "metrics", "shapes-da2.json")) as f:
        assert json.load(f)["epochs"] == 2


def test_an_unreadable_checkpoint_is_set_aside_and_the_run_starts_over(shapes_dir, tmp_path):
    _, paths, train = _tiny_run(shapes_dir, tmp_path)
    with open(paths["checkpoint_path"], "wb") as f:
        f.write(os.urandom(3000))
    with pytest.warns(RuntimeWarning, match="could not be read .* set aside as .*shapes.pt.unreadable, training "
                                            "starts over"):
        metrics = train(epochs=1)
    assert metrics["resumed_from_epoch"] is None
    assert os.path.exists(paths["checkpoint_path"] + ".unreadable") and os.path.exists(paths["domain_path"])


def test_a_rate_adam_cannot_take_is_refused_by_name(shapes_dir, tmp_path, capsys):
    status, _, err = run_cli(["train", "--data", shapes_dir, "--workdir", str(tmp_path / "runs"),
                               "--lr", "shifts=1e38"] + CLI_TINY, capsys)
    assert status == 2 and "the rate of group shifts is 1e+38" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "--device: expected a torch device such as cpu, cuda or cuda:1, got 'foo'"),
    (["--seed", "-1"], "--seed: expected an integer from 0 to 2**32 - 1, got -1"),
    (["--seed", str(2 ** 32)], "--seed: expected an integer from 0 to 2**32 - 1"),
])
def test_bad_device_or_seed_is_one_line_from_the_parser(shapes_dir, tmp_path, capsys, argv, message):
    status, _, err = run_cli(["train", "--data", shapes_dir, "--workdir", str(tmp_path / "runs")] + CLI_TINY + argv,
                              capsys)
    assert status == 2 and message in err and "Traceback" not in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_from_the_parser(shapes_dir, tmp_path, capsys):
    status, _, err = run_cli(["train", "--data", shapes_dir, "--workdir", str(tmp_path / "runs"),
                               "--device", "cuda"] + CLI_TINY, capsys)
    assert status == 2 and "torch sees no CUDA device here" in err, err


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_unreadable_weights_file_is_one_line_naming_it(shapes_dir, tmp_path, capsys, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    weights = str(tmp_path / ("garbage" + suffix))
    with open(weights, "wb") as f:
        f.write(os.urandom(100))
    status, _, err = run_cli(["train", "--data", shapes_dir, "--workdir", str(tmp_path / "runs"), "--backbone",
                               "resnet18", "--weights", weights, "--image-size", "32", "--no-progress"], capsys)
    assert status == 2 and "garbage{} cannot be read as a state_dict file".format(suffix) in err, err
    assert "Traceback" not in err


_HOLD_LOCK = """
import sys, time
from da2ext.domains.run_lock import run_lock
with run_lock(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="advisory locks are POSIX only")
def test_a_second_run_of_a_domain_stops_at_once_and_a_killed_holder_frees_it(shapes_dir, tmp_path, capsys):
    import signal
    import subprocess
    import sys
    from da2ext.training.workflow import WorkDir
    runs = str(tmp_path / "runs")
    lock = WorkDir(runs).lock_path("da2", "shapes")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, lock], stdout=subprocess.PIPE, cwd=repo,
                              env=dict(os.environ, PYTHONPATH=repo))
    try:
        assert holder.stdout.readline().strip() == b"held"
        argv = ["train", "--data", shapes_dir, "--workdir", runs, "--epochs", "1"] + CLI_TINY
        status, _, err = run_cli(argv, capsys)
        assert status == 2 and "domain shapes (method da2)" in err, err
        assert "is being trained by another run (pid {} on".format(holder.pid) in err
        assert not os.path.exists(os.path.join(runs, "domains"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    status, _, err = run_cli(argv, capsys)  # the kernel released the dead holder's lock
    assert status == 0, err


def test_a_killed_runs_temporary_files_are_removed_by_the_next_run_and_nothing_else(shapes_dir, tmp_path, capsys):
    from da2ext.training.workflow import WorkDir
    runs = str(tmp_path / "runs")
    work = WorkDir(runs)
    stale, kept = [], []
    for path in (work.domain_path("da2", "shapes"), work.metrics_path("da2", "shapes"),
                 work.checkpoint_path("da2", "shapes")):
        directory, base = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        stale.append(os.path.join(directory, "." + base + ".k1llEd.partial"))  # atomic_write's own pattern
        kept.append(os.path.join(directory, "." + base + ".partial.notes"))  # not its pattern
        kept.append(os.path.join(directory, ".other" + base + ".x.partial"))  # another file's
    for path in stale + kept:
        with open(path, "w") as f:
            f.write("x")
    status, _, err = run_cli(["train", "--data", shapes_dir, "--workdir", runs, "--epochs", "1"] + CLI_TINY, capsys)
    assert status == 0, err
    assert not any(os.path.exists(p) for p in stale) and all(os.path.exists(p) for p in kept)


def test_16_bit_greyscale_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image
    from da2ext.data.loaders import load_rgb
    path = str(tmp_path / "grey16.png")
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)  # mid-grey at 16 bits
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_rgb(path))
    assert pixels.shape == (4, 4, 3) and int(pixels.min()) == int(pixels.max()) == 128  # 32768 / 257, not 255


def test_a_corrupt_image_stops_training_with_its_name(tmp_path, capsys):
    data = tmp_path / "shapes"
    write_image_folder(str(data), train_per_class=2, val_per_class=1, seed=0)
    broken = data / "train" / "circle" / "broken.png"
    with open(str(broken), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    status, _, err = run_cli(["train", "--data", str(data), "--workdir", str(tmp_path / "runs"), "--epochs", "1"]
                             + CLI_TINY, capsys)
    assert status == 2 and "cannot read image" in err and "broken.png" in err and "Traceback" not in err, err


def _learn(data, runs, domain, capsys, *extra):
    status, out, err = run_cli(["train", "--data", data, "--workdir", runs, "--domain", domain, "--epochs", "1"]
                               + CLI_TINY + list(extra), capsys)
    assert status == 0, err
    return out, err


def test_a_damaged_domain_file_costs_its_own_domain_not_the_work_directory(shapes_dir, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    _learn(shapes_dir, runs, "first", capsys)
    damaged = os.path.join(runs, "domains", "da2", "first.safetensors")
    with open(damaged, "r+b") as f:  # truncated in the middle: not a readable safetensors file any more
        f.truncate(os.path.getsize(damaged) // 2)
    out, err = _learn(shapes_dir, runs, "second", capsys)
    assert "warning: domain first skipped: " in err and "first.safetensors" in err and "damaged" in err, err
    assert "another backbone" not in err
    data_root = str(tmp_path / "eval_data")
    os.makedirs(data_root)
    os.symlink(shapes_dir, os.path.join(data_root, "second"))
    status, out, err = run_cli(["eval", "--data", data_root, "--workdir", runs] + CLI_TINY_EVAL, capsys)
    assert status == 1  # one domain could not be evaluated ...
    assert "| first | - | - | - |" in out and "| second | 8 |" in out, out  # ... the other one was
    assert "warning: domain first skipped" in err


def test_eval_reads_past_a_corrupt_metrics_file(shapes_dir, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    _learn(shapes_dir, runs, "shapes", capsys)
    metrics = os.path.join(runs, "metrics", "shapes-da2.json")
    with open(metrics, "w") as f:
        f.write('{"settings": {"image_size": 3')  # cut off mid-write by another tool
    # Without --image-size, eval reads the image size the run recorded: here it cannot, and uses 64.
    status, out, err = run_cli(["eval", "--data", os.path.dirname(shapes_dir), "--workdir", runs, "--backbone",
                                "resnet18", "--no-pretrained"], capsys)
    assert status == 0, err
    assert "| shapes | 8 |" in out and "metrics file {} cannot be read".format(metrics) in err
    with open(metrics, "w") as f:
        f.write("[1, 2]")  # JSON, but not the object a run writes
    status, out, err = run_cli(["train", "--data", shapes_dir, "--workdir", runs, "--epochs", "1"] + CLI_TINY,
                               capsys)
    assert status == 2 and "was learned already" in err and "holds a JSON list" in err, err
