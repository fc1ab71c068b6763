"""benchmarks/distributed_table.py in a tiny setting: the bytes a process all-reduces per
step are exactly the gradients of what the method trains (float32), and the table's
files name their commit and command (its step times are in results/, not checked here)."""
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import distributed_table  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def test_distributed_table_counts_the_trained_gradients(tmp_path):
    pytest.importorskip("torchvision")
    code = distributed_table.main(["--models", "resnet18", "--steps", "1", "--tag", "test", "--out-dir",
                                   str(tmp_path)])
    assert code == 0
    with open(str(tmp_path / "distributed_test.json")) as f:
        results = json.load(f)
    traffic = dict((r["method"], r) for r in results["traffic"])
    for record in traffic.values():
        assert record["allreduce_bytes"] == 4 * record["trainable_params"]
    assert traffic["da2"]["allreduce_bytes"] * 20 < traffic["ft"]["allreduce_bytes"]
    assert [r["processes"] for r in results["timing"]] == [1, 2]
    assert all(r["step_time"] > 0 for r in results["timing"])
    table = (tmp_path / "distributed_test.md").read_text()
    assert "| resnet18 | da2 |" in table and results["meta"]["commit"] in table
