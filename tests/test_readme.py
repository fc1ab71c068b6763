"""The README's example code runs as printed (with fewer steps)."""
import io
import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_example_trains_the_adaptor():
    with io.open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "README.md has no python example"
    code = blocks[0].replace("range(10)", "range(2)")
    namespace = {}
    exec(compile(code, "README.md example", "exec"), namespace)
    adaptor = namespace["adaptor"]
    # two Adam steps moved gamma off zero: the adaptor was trained, not just run
    assert adaptor.gamma.abs().sum().item() > 0
    assert torch.isfinite(namespace["loss"]).all()
