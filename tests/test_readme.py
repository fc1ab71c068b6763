"""The README's example code runs as printed (with fewer steps)."""
import io
import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_example_adapts_and_trains():
    with io.open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "README.md has no python example"
    code = blocks[0].replace("range(10)", "range(2)")
    namespace = {}
    exec(compile(code, "README.md example", "exec"), namespace)
    model = namespace["model"]
    gammas = [p for name, p in model.named_parameters() if name.endswith("adaptor.gamma")]
    # two Adam steps moved the adaptors' gamma off zero: they were trained, not just run
    assert len(gammas) == 16 and all(g.abs().sum().item() > 0 for g in gammas)
    assert torch.isfinite(namespace["loss"]).all()
    assert namespace["kept"].saved_bytes < 16 * 2 ** 20  # the lean backbone's claim, as printed
