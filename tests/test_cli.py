"""The command line (python -m da2ext ...): every subcommand has help, bad
arguments say what is allowed, train + eval work on any ImageFolder directory,
and the main job (digits-demo) runs end to end in a tiny setting."""
import json
import os
import subprocess
import sys

import pytest

import da2ext
from da2ext import methods
from helpers import CLI_TINY, run_cli, write_image_folder

DA2_RATES = methods.get("da2").learning_rates

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ("prepare-digits", "train", "eval", "predict", "export", "digits-demo", "nano-table", "info")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    status, out, _ = run_cli([command, "--help"], capsys)
    assert status == 0 and "usage:" in out


def test_unknown_method_lists_the_methods(tmp_path, capsys):
    status, _, err = run_cli(["train", "--data", str(tmp_path), "--method", "lora"], capsys)
    assert status == 2
    assert "unknown method 'lora'" in err and "da2" in err and "ft" in err and "bias" in err


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    status, _, err = run_cli(["train", "--data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "runs")]
                              + CLI_TINY, capsys)
    assert status == 2 and "does not exist" in err
    (tmp_path / "no_val" / "train").mkdir(parents=True)
    status, _, err = run_cli(["train", "--data", str(tmp_path / "no_val")] + CLI_TINY, capsys)
    assert status == 2 and "no val/" in err


@pytest.mark.parametrize("domain", [".hidden", "a/b"])
def test_a_domain_name_no_file_can_take_is_refused_before_the_model_is_built(tmp_path, capsys, domain):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    status, _, err = run_cli(["train", "--data", str(tmp_path), "--domain", domain, "--workdir",
                              str(tmp_path / "runs")] + CLI_TINY, capsys)
    assert status == 2 and "--domain" in err and repr(domain) in err
    assert not (tmp_path / "runs").exists()


def test_pretrained_torchvision_needs_weights(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    status, _, err = run_cli(["train", "--data", str(tmp_path), "--backbone", "resnet18"], capsys)
    assert status == 2 and "--weights" in err and "--no-pretrained" in err


def test_train_two_domains_then_eval_prints_every_domain(tmp_path, capsys):
    data = tmp_path / "data"
    for name, seed in (("shapes", 0), ("other_shapes", 1)):
        write_image_folder(str(data / name), train_per_class=4, val_per_class=3, seed=seed)
    runs = str(tmp_path / "runs")
    status, out, _ = run_cli(["train", "--data", str(data / "shapes"), "--workdir", runs, "--epochs", "1"] + CLI_TINY,
                              capsys)
    assert status == 0, out
    assert "shapes (da2): val accuracy" in out
    status, out, _ = run_cli(["train", "--data", str(data / "other_shapes"), "--workdir", runs, "--epochs", "1"]
                              + CLI_TINY, capsys)
    assert status == 0, out
    assert "learned earlier" in out and "shapes" in out
    for name in ("shapes", "other_shapes"):
        assert os.path.isfile(os.path.join(runs, "domains", "da2", name + ".safetensors"))
        with open(os.path.join(runs, "metrics", "{}-da2.json".format(name))) as f:
            assert json.load(f)["domain"] == name
    assert os.listdir(os.path.join(runs, "checkpoints")) == []

    status, out, err = run_cli(["eval", "--data", str(data), "--workdir", runs, "--backbone", "resnet18",
                                 "--no-pretrained"], capsys)
    assert status == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["shapes", "other_shapes"]

    # The same work directory with another backbone: the files do not fit, and the error says why.
    status, _, err = run_cli(["eval", "--data", str(data), "--workdir", runs], capsys)
    assert status == 2 and "backbone" in err


def test_a_model_of_recomputed_blocks_trains_evaluates_and_exports(tmp_path, capsys):
    """--backbone mobilenet_v3_small (hardswish, squeeze-excitation: blocks kept as
    their inputs and recomputed, adapted generically): train, eval and export work as
    for the known families."""
    data = tmp_path / "data"
    write_image_folder(str(data / "shapes"), train_per_class=4, val_per_class=3, seed=0)
    runs = str(tmp_path / "runs")
    tiny = ["--backbone", "mobilenet_v3_small", "--no-pretrained", "--image-size", "32", "--batch-size", "16"]
    status, out, err = run_cli(["train", "--data", str(data / "shapes"), "--workdir", runs, "--epochs", "1",
                                "--no-progress"] + tiny, capsys)
    assert status == 0, out + err
    assert "shapes (da2): val accuracy" in out
    status, out, err = run_cli(["eval", "--data", str(data), "--workdir", runs] + tiny, capsys)
    assert status == 0, err
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "%" in line] == [
        "shapes"]
    exported = str(tmp_path / "shapes.pt")
    status, out, err = run_cli(["export", "--workdir", runs, "--domain", "shapes", "--format", "torchscript",
                                exported] + tiny[:3], capsys)
    assert status == 0, out + err
    assert os.path.isfile(exported)


def test_digits_demo_end_to_end(tmp_path):
    """The README's main job, tiny: every domain gets an accuracy, earlier domains stay bit-identical."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(da2ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    workdir = str(tmp_path / "demo")
    command = [sys.executable, "-m", "da2ext", "digits-demo", "--workdir", workdir, "--epochs", "1",
               "--image-size", "32", "--batch-size", "32", "--train-per-domain", "64", "--val-per-domain", "40",
               "--no-progress"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
    for name in ("mnist", "digits", "mnist_m"):
        assert any(line.startswith("| {} | ".format(name)) and "%" in line for line in result.stdout.splitlines()), \
            result.stdout[-3000:]
    assert "earlier domains unchanged: yes" in result.stdout
    assert "domain files reproduce the logits: yes" in result.stdout
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert [row["domain"] for row in results["domains"]] == ["mnist", "digits", "mnist_m"]
    assert results["earlier_domains_unchanged"] is True
    assert os.path.isfile(os.path.join(workdir, "results.md"))


def _adaptor_tensors(domain_file):
    from safetensors.torch import load_file
    return dict((k, v) for k, v in load_file(domain_file).items() if ".adaptor." in k)


def test_lr_sets_one_group_and_adaptors_0_keeps_them_as_they_start(tmp_path, capsys):
    # --lr adaptors=0 is the ablation "da2 with its adaptors frozen": the adaptors stay as
    # they start, in the same model (same random start of the head).
    pytest.importorskip("safetensors")
    data = tmp_path / "shapes"
    write_image_folder(str(data), train_per_class=4, val_per_class=3, seed=0)
    files = {}
    for tag, extra in (("default", []), ("frozen", ["--lr", "adaptors=0", "--lr", "head=0.05"])):
        runs = str(tmp_path / tag)
        status, out, err = run_cli(["train", "--data", str(data), "--workdir", runs, "--epochs", "1"] + CLI_TINY + extra,
                                    capsys)
        assert status == 0, err
        files[tag] = os.path.join(runs, "domains", "da2", "shapes.safetensors")
        with open(os.path.join(runs, "metrics", "shapes-da2.json")) as f:
            metrics = json.load(f)
        if tag == "frozen":
            assert metrics["learning_rates"] == {"adaptors": 0.0, "branches": DA2_RATES["branches"], "head": 0.05,
                                                 "shifts": DA2_RATES["shifts"]}
            assert metrics["settings"]["learning_rates"] == {"adaptors": 0.0, "head": 0.05}
        else:
            assert metrics["learning_rates"] == dict((g, DA2_RATES[g]) for g in ("adaptors", "branches", "head", "shifts"))
            assert "learning_rates" not in metrics["settings"]
    trained, frozen = _adaptor_tensors(files["default"]), _adaptor_tensors(files["frozen"])
    gammas = [k for k in frozen if k.endswith(".gamma")]
    assert gammas and all(float(frozen[k].abs().max()) == 0.0 for k in gammas)
    assert any(float(trained[k].abs().max()) > 0.0 for k in gammas)  # so the check above can fail


@pytest.mark.parametrize("argv, message", [
    (["--lr", "adaptor=0"], "GROUP=RATE with GROUP one of adaptors, branches, shifts, head, tail, other"),
    (["--lr", "head"], "GROUP=RATE"),
    (["--lr", "head=-1"], "a finite number >= 0, got -1.0"),
    (["--lr", "head=nan"], "a finite number >= 0"),
    (["--lr", "head=1", "--lr", "head=2"], "--lr names a group twice: head=1, head=2"),
    (["--method", "bias_lean", "--lr", "adaptors=0"],
     "--lr: learning_rates: method bias_lean trains no parameters in group(s) adaptors; its groups here: head, shifts"),
])
def test_bad_lr_says_what_is_allowed(tmp_path, capsys, argv, message):
    data = tmp_path / "shapes"
    write_image_folder(str(data), train_per_class=2, val_per_class=1, seed=0)
    status, _, err = run_cli(["train", "--data", str(data), "--workdir", str(tmp_path / "runs")] + CLI_TINY + argv,
                              capsys)
    assert status == 2 and message in err, err
    assert not (tmp_path / "runs" / "domains").exists()


def test_nano_table_runs_the_packages_own_code(tmp_path, monkeypatch, capsys):
    """nano-table needs no checkout: outside one it writes into the current directory."""
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(["nano-table", "--models", "mobilenet_v2", "--batch-sizes", "2", "--methods",
                                 "bias_lean", "--image-size", "32", "--steps", "1", "--tag", "tiny"], capsys)
    assert status == 0, err
    with open(str(tmp_path / "nano_tiny.json")) as f:
        records = json.load(f)["records"]
    assert {r["method"] for r in records} == {"ft", "bias_lean"}
    assert all(r["saved_bytes"] > 0 for r in records)
