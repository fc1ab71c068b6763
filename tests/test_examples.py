"""Every example script in python/ runs to the end (exit code 0), with small arguments.

A new script in python/ needs an entry in SCRIPT_ARGS (an empty list is fine):
test_every_script_has_arguments fails until it has one, so that nobody forgets
to give it arguments that keep the test suite fast. A script may also have a
check of its output in OUTPUT_CHECKS.
"""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import da2ext

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(REPO_ROOT, "python")
TIMEOUT_S = 300

# Arguments for each script: small, so the suite stays fast on a 2-core CPU.
SCRIPT_ARGS = {
    "adapt_resnet_block.py": ["--steps", "15", "--batch-size", "32", "--image-size", "64"],
    # --cuda-graph: on a GPU the steps replay from a graph; on the CPU the run says why it is eager
    "train_domain.py": ["--epochs", "1", "--train-images", "64", "--val-images", "40", "--cuda-graph"]
                       + (["--device", "cuda"] if torch.cuda.is_available() else []),
    "insert_adaptors.py": ["--steps", "3", "--batch-size", "8"],
    "adapt_any_model.py": ["--batch-size", "2", "--image-size", "64"],
}


def example_scripts():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES_DIR, "*.py")))


def run_script(name, extra_args=()):
    env = dict(os.environ)
    # Import the same da2ext as this test process (a built checkout works without installing).
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(da2ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.join(EXAMPLES_DIR, name)] + SCRIPT_ARGS.get(name, []) + list(extra_args)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, "{} exited with {}:\n{}".format(
        " ".join(command), result.returncode, result.stdout[-5000:])
    return result.stdout


def search(pattern, output):
    match = re.search(pattern, output, re.M)
    assert match, "no line matching {!r} in the output:\n{}".format(pattern, output[-5000:])
    return match


def check_adapt_resnet_block(output):
    backend = search(r"^backend: (\S+)$", output).group(1)
    losses = search(r"^final loss (\S+) \(initial (\S+)\)$", output)
    final_loss, initial_loss = float(losses.group(1)), float(losses.group(2))
    assert final_loss < initial_loss, "the loss did not go down:\n" + output
    saved = search(r"^saved for backward: fused (\d+) bytes, reference (\d+) bytes", output)
    fused_bytes, reference_bytes = int(saved.group(1)), int(saved.group(2))
    assert fused_bytes < reference_bytes, (
        "the fused adaptor (backend {}) keeps {} bytes for backward, the reference {}".format(
            backend, fused_bytes, reference_bytes))


def check_train_domain(output):
    # The domain file, loaded into a fresh model, gives the accuracy it was saved with.
    search(r"^reloaded from the file: val accuracy .* \(the same\)$", output)
    graph = search(r"^CUDA graph: (\d+) of (\d+) steps replayed(.*)$", output)
    if torch.cuda.is_available():  # 2 steps at batch 32: the first eager, the second replayed
        assert graph.group(1) == "1" and graph.group(3) == "", output
    else:
        assert graph.group(1) == "0" and "needs a CUDA device" in graph.group(3), output


def check_insert_adaptors(output):
    assert "adaptors after: trunk_output.block1, trunk_output.block2, trunk_output.block3, " \
           "trunk_output.block4" in output
    assert "features unchanged before training: True" in output
    assert re.search(r"step +3: loss \d", output)


def check_adapt_any_model(output):
    # RegNetX is lean throughout: its stages report "lean" and the step keeps far less than plain autograd.
    search(r"^adaptors after: trunk_output.block1, trunk_output.block2, trunk_output.block3, "
           r"trunk_output.block4$", output)
    search(r"^trunk_output\.module\.block2\.module +lean ", output)
    ratio = float(search(r"\((\d+\.\d)x less\)$", output).group(1))
    assert ratio > 8, "the adapted RegNet keeps only {}x less than the plain one:\n{}".format(ratio, output)


OUTPUT_CHECKS = {
    "adapt_any_model.py": check_adapt_any_model,
    "adapt_resnet_block.py": check_adapt_resnet_block,
    "insert_adaptors.py": check_insert_adaptors,
    "train_domain.py": check_train_domain,
}


def test_examples_exist():
    assert example_scripts(), "no example scripts found in " + EXAMPLES_DIR


def test_every_script_has_arguments():
    missing = [name for name in example_scripts() if name not in SCRIPT_ARGS]
    assert not missing, "add these scripts to SCRIPT_ARGS in {} (an empty list is fine): {}".format(
        os.path.basename(__file__), missing)
    stale = sorted(set(SCRIPT_ARGS).union(OUTPUT_CHECKS) - set(example_scripts()))
    assert not stale, "SCRIPT_ARGS/OUTPUT_CHECKS name scripts that are not in python/: {}".format(stale)


@pytest.mark.parametrize("name", example_scripts())
def test_example_runs(name):
    output = run_script(name)
    check = OUTPUT_CHECKS.get(name)
    if check is not None:
        check(output)


def test_adapt_any_model_on_a_model_of_recomputed_blocks():
    """MobileNetV3 (hardswish, squeeze-excitation): its blocks keep their inputs in
    float16 and are recomputed, far less than plain autograd keeps, and the script
    says what the largest one holds while its backward runs."""
    output = run_script("adapt_any_model.py", ["--model", "mobilenet_v3_small", "--recompute-dtype", "float16"])
    search(r"^features\.module\.4\.module +recomputed ", output)
    ratio = float(search(r"\((\d+\.\d)x less\)$", output).group(1))
    assert ratio > 8, output
    search(r"^while its backward runs, the largest recomputed block \(.*\) holds \d+\.\d MiB more$", output)



def test_adapt_any_model_places_adaptors_by_stride():
    """--adaptor-max-stride 8, da2's placement: RegNetX's first two stages (strides 4 and 8)
    get adaptors, the last two (16 and 32) none."""
    output = run_script("adapt_any_model.py", ["--adaptor-max-stride", "8"])
    search(r"^adaptors after: trunk_output\.block1, trunk_output\.block2$", output)
    assert "trunk_output.module.block3.adaptor" not in output, output
