"""benchmarks/launch_count.py in a short run: every adaptor, shape and rank is counted,
the counts are consistent (every dispatched op is among all ops), and the results
files name their commit and command."""
import json
import os
import sys

import da2ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import launch_count  # noqa: E402


def test_launch_count_table(tmp_path):
    code = launch_count.main(["--runs", "3", "--tag", "test", "--out-dir", str(tmp_path)])
    assert code == 0
    with open(str(tmp_path / "launch_count_test.json")) as f:
        results = json.load(f)
    records = results["records"]
    assert len(records) == len(launch_count.SHAPES) * 2 * len(launch_count.KINDS)
    for r in records:
        assert 0 < r["dispatched_ops"] <= r["all_ops"]
        assert ("wall_time" in r) == (tuple(r["shape"]) == launch_count.SHAPES[0])
    assert results["meta"]["backend"] == da2ext.backend("cpu")
    table = (tmp_path / "launch_count_test.md").read_text()
    assert "| 8x256x2x2 | 4 | fused |" in table and results["meta"]["commit"] in table
