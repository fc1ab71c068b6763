"""Every ```python block of README.md runs as printed.

Each block runs in a fresh Python process (its own namespace, no state shared with
the other blocks or with this test process), on the CPU, with a time limit. A
block preceded by an HTML comment `<!-- no-test: REASON -->` is skipped with that
reason (e.g. one that needs CUDA). A few blocks get extra checks, run in the same
process after the block, on what it left in its namespace.
"""
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 600

# A block, and the no-test comment right before it (only blank lines between).
BLOCK = re.compile(r"(?:<!--\s*no-test:\s*(?P<reason>.*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)

# Checks appended to the block whose code contains the key.
CHECKS = {
    "da2ext.adapt(model, num_classes=10, rank=1, adaptor_max_stride=8, branch_width=64)": """
gammas = [p for name, p in model.named_parameters() if name.endswith("adaptor.gamma")]
# an adaptor after each of layer1's and layer2's 7 blocks (stride <= 8), and three Adam steps moved
# their gamma off zero: they were trained, not just run
assert len(gammas) == 7 and all(g.abs().sum().item() > 0 for g in gammas), len(gammas)
# a branch beside each of layer4's 3 blocks (stride 32), its BN scale moved off zero too
scales = [p for name, p in model.named_parameters() if name.endswith("branch.bn.weight")]
assert len(scales) == 3 and all(s.abs().sum().item() > 0 for s in scales), len(scales)
assert torch.isfinite(loss).all()
assert kept.saved_bytes < 16 * 2 ** 20, kept.saved_bytes  # the lean backbone's claim, as printed
""",
    "da2ext.MultiDomainModel(backbone)": """
assert name == "mnist" and set(model.domains) == {"mnist", "letters"}, (name, model.domains)
with model.domain("mnist"), other.domain(name), torch.no_grad():
    assert torch.equal(model(images), other(images))
""",
    "da2ext.ResidualAttentionAdaptor(256)": """
assert da2ext.saved_bytes(adaptor, x) < 0.05 * x.numel() * 4  # O(N(C+HW)), not a copy of F
""",
    "train_last=2": """
assert model.da2ext_tail == {"train_last": 2} and "tail" in da2ext.lean.trainable.parameter_groups(model)
assert budgeted.da2ext_tail["fits"] and budgeted.da2ext_tail["training_bytes"] <= 20 * 2 ** 20
""",
}


def readme_blocks():
    with io.open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append((line, match.group("code"), match.group("reason")))
    return blocks


BLOCKS = readme_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "README.md has {} python blocks".format(len(BLOCKS))
    # every check above still finds its block (a renamed example must not drop its checks)
    for key in CHECKS:
        assert any(key in code for _, code, _ in BLOCKS), key


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=["line{}".format(b[0]) for b in BLOCKS])
def test_readme_block_runs_as_printed(line, code, reason, tmp_path):
    if reason is not None:
        pytest.skip("README.md line {}: {}".format(line, reason))
    checks = "".join(check for key, check in CHECKS.items() if key in code)
    # The block compiles under its README name and line, so a traceback points there.
    runner = (
        "import sys\n"
        "code, checks, line = sys.stdin.read().split('\\0')\n"
        "namespace = {'__name__': '__main__'}\n"
        "exec(compile('\\n' * (int(line) - 1) + code, 'README.md', 'exec'), namespace)\n"
        "exec(compile(checks, 'README.md checks', 'exec'), namespace)\n"
    )
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, as CI without a GPU runs it
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    process = subprocess.Popen([sys.executable, "-c", runner], cwd=str(tmp_path), env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate("\0".join([code, checks, str(line)]).encode("utf-8"), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail("README.md block at line {} ran over {} s:\n{}".format(line, TIMEOUT_S, output.decode(
            "utf-8", "replace")[-4000:]))
    text = output.decode("utf-8", "replace")
    assert process.returncode == 0, "README.md block at line {} failed:\n{}".format(line, text[-4000:])
