"""da2's training step eager against torch.compile (default mode) as a pytest-benchmark
suite, on an adapted ResNet-18 at batch 4, 3x64x64, and the compile table's script.

    pytest benchmarks/test_compile_benchmark.py --benchmark-only
    python benchmarks/compile_table.py          # the table: ResNet-18 and Lite0, ft and da2, 224x224

Both setups start from the same weights; their first steps must agree in loss and
the compiled one must keep no more than twice what the eager one keeps for
backward (the partitioner picks what to save; the lean modules' masks must stay
masks). extra_info records both.
"""
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compile_table  # noqa: E402

import da2ext  # noqa: E402

pytestmark = [
    pytest.mark.skipif(da2ext.backend("cpu") != "cpu", reason="needs the compiled extension (da2ext._C)"),
    pytest.mark.skipif(not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported(),
                       reason="torch.compile needs torch >= 2.0 on a Python it supports"),
]


@pytest.fixture(scope="module")
def setups():
    pytest.importorskip("torchvision")
    torch._dynamo.reset()
    # da2 without its late branches: what the partitioner keeps of the adaptors and the lean blocks (with
    # the branches it keeps more of them than their autograd Functions do: 1.2x eager's in all at 224x224,
    # benchmarks/results/compile_cpu-2cores.md; tests/test_low_rank_branch.py compiles them fullgraph)
    compared = compile_table.ComparedSetups("resnet18", "da2_no_branches", 4, 64, torch.device("cpu"), "default")
    figures = compared.first_steps()
    yield compared, figures
    torch._dynamo.reset()


def test_eager_step(benchmark, setups):
    compared, (eager_loss, compiled_loss, _, _, eager_kept, compiled_kept) = setups
    benchmark.extra_info.update(saved_bytes=eager_kept, first_loss=eager_loss)
    benchmark(compared.eager.timed_step)


def test_compiled_step(benchmark, setups):
    compared, (eager_loss, compiled_loss, _, _, eager_kept, compiled_kept) = setups
    benchmark.extra_info.update(saved_bytes=compiled_kept, first_loss=compiled_loss)
    assert abs(compiled_loss - eager_loss) <= 1e-4 * abs(eager_loss)
    assert compiled_kept <= 2 * eager_kept
    benchmark(compared.compiled.timed_step)


def test_compile_table_writes_its_results(tmp_path):
    pytest.importorskip("torchvision")
    code = compile_table.main(["--models", "resnet18", "--methods", "da2_no_branches", "--batch-size", "2",
                               "--image-size", "32",
                               "--steps", "1", "--tag", "test", "--out-dir", str(tmp_path)])
    assert code == 0
    with open(str(tmp_path / "compile_test.json")) as f:
        results = json.load(f)
    (record,) = results["records"]
    assert record["model"] == "resnet18" and record["method"] == "da2_no_branches"
    assert abs(record["compiled_loss"] - record["eager_loss"]) <= 1e-4 * abs(record["eager_loss"])
    assert 0 < record["compiled_saved_bytes"] <= 2 * record["eager_saved_bytes"]
    assert record["compiled_step_time"] > 0 and record["compile_seconds"] >= 0
    assert results["meta"]["command"] == ("python benchmarks/compile_table.py --models resnet18 --methods "
                                          "da2_no_branches --batch-size 2 --image-size 32 --steps 1 --tag test")
    table = (tmp_path / "compile_test.md").read_text()
    assert "| resnet18 | 2 | da2_no_branches |" in table and results["meta"]["commit"] in table
