"""benchmarks/launch_count.py in a short run: every adaptor, shape and rank is counted,
the counts are consistent (every dispatched op is among all ops), and the results
files name their commit and command."""
import json
import os
import sys

import da2ext
from da2ext.ops.fake_kernels import has_op

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import launch_count  # noqa: E402


def test_launch_count_table(tmp_path):
    code = launch_count.main(["--runs", "3", "--rounds", "2", "--tag", "test", "--out-dir", str(tmp_path)])
    assert code == 0
    with open(str(tmp_path / "launch_count_test.json")) as f:
        results = json.load(f)
    records = results["records"]
    assert len(records) == len(launch_count.SHAPES) * 2 * len(launch_count.KINDS)
    for r in records:
        assert 0 < r["dispatched_ops"] <= r["all_ops"]
        assert ("wall_time" in r) == ("time_vs_op_by_op" in r) == (tuple(r["shape"]) == launch_count.SHAPES[0])
    assert results["meta"]["backend"] == da2ext.backend("cpu")
    if has_op("residual_attention"):
        # Issue 19's CPU target: the one-op adaptor dispatches at most 15 ops per forward + backward
        # (72 op by op), and its small branch runs as loops at 8x256x2x2 (far fewer ops in all).
        for r in records:
            if r["adaptor"] == "fused":
                by_op = [o for o in records if o["adaptor"] == "fused, op by op" and o["shape"] == r["shape"]
                         and o["rank"] == r["rank"]][0]
                assert r["dispatched_ops"] <= 15 < by_op["dispatched_ops"]
                if tuple(r["shape"]) == launch_count.SHAPES[0]:
                    assert r["all_ops"] < by_op["all_ops"] / 2
    table = (tmp_path / "launch_count_test.md").read_text()
    assert "| 8x256x2x2 | 4 | fused |" in table and results["meta"]["commit"] in table
