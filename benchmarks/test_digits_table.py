"""The baselines benchmark script (digits_table.py) end to end on a tiny setting,
and its summary and target checks on records made up for the purpose. The
benchmark's own targets are judged on the full run (benchmarks/results/digits.md)."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import digits_table  # noqa: E402

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    from da2ext.digits import prepare_digits
    root = str(tmp_path_factory.mktemp("data"))
    prepare_digits(root, seed=0, image_size=32, train_per_domain=40, val_per_domain=20, domains=["digits"],
                   progress=False)
    return root


def test_a_tiny_run_writes_records_table_and_plot_and_resumes(tiny_digits, tmp_path):
    out = str(tmp_path / "out")
    argv = ["--methods", "last,da2", "--data", tiny_digits, "--seeds", "1", "--epochs", "1",
            "--batch-size", "16", "--image-size", "32", "--workdir", str(tmp_path / "work"), "--out-dir", out,
            "--tag", "tiny", "--no-nano", "--no-progress", "--sweep-scales", "0.5,1", "--sweep-jobs", "2"]
    assert digits_table.main(argv) == 0
    with open(os.path.join(out, "tiny.json")) as f:
        records = json.load(f)
    assert [(r["method"], r["domain"], r["seed"]) for r in records] == [("last", "digits", 1), ("da2", "digits", 1)]
    for r in records:
        assert set(digits_table.RECORD_KEYS) <= set(r)
        assert 0.0 <= r["val_accuracy"] <= 1.0
        assert r["peak_rss_bytes"] > 50 * 2 ** 20  # a process that imported torch
        assert r["file_bytes"] > 0 and r["trainable_params"] > 0 and r["step_time"] > 0
    with open(os.path.join(out, "tiny_sweep.json")) as f:
        sweep = json.load(f)
    assert sorted((r["method"], r["lr_scale"], r["seed"]) for r in sweep) == [
        ("da2", 0.5, 0), ("da2", 1.0, 0), ("last", 0.5, 0), ("last", 1.0, 0)]
    for r in records:  # each method trains with the scale that did best in its sweep
        tried = dict((x["lr_scale"], x["val_accuracy"]) for x in sweep if x["method"] == r["method"])
        assert tried[r["lr_scale"]] == max(tried.values())
    by_method = dict((r["method"], r) for r in records)
    assert by_method["da2"]["saved_bytes"] > by_method["last"]["saved_bytes"]  # masks + descriptors vs head input
    with open(os.path.join(out, "tiny.md")) as f:
        table = f.read()
    assert "| last |" in table and "| da2 |" in table
    if digits_table.plot({}, os.path.join(out, "probe.png"), "") is not None:
        assert os.path.getsize(os.path.join(out, "tiny.png")) > 0

    # A second run reads the finished runs back instead of training again.
    record_files = [os.path.join(digits_table._run_dir(str(tmp_path / "work"), r["method"], "digits", 1,
                                                      r["lr_scale"]), "record.json") for r in records]
    stamps = [os.path.getmtime(p) for p in record_files]
    assert digits_table.main(argv) == 0
    assert [os.path.getmtime(p) for p in record_files] == stamps


def _record(method, domain, seed, accuracy, saved):
    return {"method": method, "domain": domain, "seed": seed, "val_accuracy": accuracy, "saved_bytes": saved,
            "peak_rss_bytes": 1, "step_time": 0.1, "trainable_params": 10, "file_bytes": 100}


def test_summary_means_over_domains_and_seeds_and_checks_the_targets():
    records = []
    for seed, shift in ((1, 0.0), (2, 0.02)):
        records += [_record("ft", "a", seed, 0.90 + shift, 400), _record("ft", "b", seed, 0.80 + shift, 400),
                    _record("bias", "a", seed, 0.92 + shift, 100), _record("bias", "b", seed, 0.82 + shift, 100),
                    _record("da2", "a", seed, 0.91 + shift, 10), _record("da2", "b", seed, 0.80 + shift, 10)]
    summary = digits_table.summarise(records, ["ft", "bias", "da2"], ["a", "b"])
    assert summary["da2"]["accuracy"]["a"] == pytest.approx((92.0, 1.0))
    assert summary["da2"]["mean_accuracy"] == pytest.approx(86.5)
    assert summary["da2"]["mean_accuracy_spread"] == pytest.approx(1.0)
    lines = digits_table.check_targets(summary)
    assert "+0.50 points" in lines[0] and lines[0].endswith("met")       # vs ft
    assert "40.0x less" in lines[1] and lines[1].endswith("met")        # memory
    assert "-1.50 points" in lines[2] and lines[2].endswith("MISSED")   # vs bias


def test_unknown_methods_and_empty_data_dirs_fail_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        digits_table.parse_args(["--methods", "da2,nope"])
    with pytest.raises(SystemExit):
        digits_table.parse_args(["--data", str(tmp_path)])


def test_the_nano_column_counts_what_each_method_keeps():
    kept = digits_table.nano_saved_bytes(["ft", "bias_lean"], batch_size=1, image_size=64)
    assert kept["bias_lean"] * 20 < kept["ft"]
