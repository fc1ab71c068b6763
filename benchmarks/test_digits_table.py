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
    from da2ext.data.digits import prepare_digits
    root = str(tmp_path_factory.mktemp("data"))
    prepare_digits(root, seed=0, image_size=32, train_per_domain=40, val_per_domain=20, domains=["digits"],
                   progress=False)
    return root


def test_a_tiny_run_writes_records_table_and_plot_and_resumes(tiny_digits, tmp_path):
    out = str(tmp_path / "out")
    argv = ["--methods", "last,da2", "--data", tiny_digits, "--seeds", "1", "--epochs", "1",
            "--batch-size", "16", "--image-size", "32", "--workdir", str(tmp_path / "work"), "--out-dir", out,
            "--tag", "tiny", "--no-nano", "--no-progress", "--sweep-scales", "0.5,1", "--sweep-jobs", "2",
            "--sweep-extend", "0", "--sweep-seeds", "0"]
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
    pytest.importorskip("matplotlib")
    with open(os.path.join(out, "tiny.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

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
    mib = 2 ** 20
    records = []
    # (method, accuracy on mnist_m, on digits, nano kept, nano training bytes on both backbones)
    rows = (("ft", 0.90, 0.96, 600 * mib, 900 * mib), ("bias_lean", 0.60, 0.92, 10 * mib, 11 * mib),
            ("parallel_adapter", 0.80, 0.95, 650 * mib, 700 * mib), ("da2", 0.67, 0.93, 14 * mib, 15 * mib),
            ("da2_tail1", 0.85, 0.96, 20 * mib, 100 * mib), ("da2_tail5", 0.88, 0.97, 30 * mib, 200 * mib))
    for seed, shift in ((1, 0.0), (2, 0.02)):
        for method, far, near, kept, training in rows:
            for domain, accuracy in (("mnist_m", far), ("digits", near)):
                r = _record(method, domain, seed, accuracy + shift, 1)
                r.update(nano_saved_bytes=kept, nano_resnet50_training_bytes=training,
                         nano_efficientnet_lite0_training_bytes=training)
                records.append(r)
    summary = digits_table.summarise(records, [r[0] for r in rows], ["mnist_m", "digits"])
    assert summary["da2"]["accuracy"]["mnist_m"] == pytest.approx((68.0, 1.0))
    assert summary["da2"]["mean_accuracy"] == pytest.approx(81.0)
    assert summary["da2"]["mean_accuracy_spread"] == pytest.approx(1.0)
    assert summary["da2_tail1"]["nano_training_bytes"]["resnet50"] == 100 * mib
    lines = digits_table.check_targets(summary)
    assert "+4.00 points" in lines[0] and lines[0].endswith("met")     # da2 vs bias_lean, mean
    assert "+7.00 points" in lines[1] and lines[1].endswith("met")     # on mnist_m
    assert "14.0 MiB" in lines[2] and lines[2].endswith("met")         # nano kept
    # within 700/5 = 140 MiB only da2_tail1 fits: 91.5 >= parallel_adapter's 88.5
    assert "is da2_tail1 at 91.50 against 88.50: met" in lines[3]
    # within 900/8 = 112.5 MiB: da2_tail1 again, 91.5 against ft's 94 - 2 = 92: missed
    assert "is da2_tail1 at 91.50 against 92.00: MISSED" in lines[5]
    # A budget row picks its tail per backbone: its accuracy (the table's backbone's) counts there alone.
    for seed, shift in ((1, 0.0), (2, 0.02)):
        for domain, accuracy in (("mnist_m", 0.95), ("digits", 0.99)):
            r = _record("da2_budget64", domain, seed, accuracy + shift, 1)
            r.update(nano_saved_bytes=14 * mib, nano_resnet50_training_bytes=15 * mib,
                     nano_efficientnet_lite0_training_bytes=60 * mib)
            records.append(r)
    summary = digits_table.summarise(records, [r[0] for r in rows] + ["da2_budget64"], ["mnist_m", "digits"])
    lines = digits_table.check_targets(summary, table_backbone="efficientnet_lite0")
    resnet50 = [line for line in lines if "on resnet50" in line]
    lite0 = [line for line in lines if "on efficientnet_lite0" in line]
    assert resnet50 and not any("da2_budget64" in line for line in resnet50)
    assert lite0 and all("is da2_budget64" in line for line in lite0)


def test_unknown_methods_and_empty_data_dirs_fail_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        digits_table.parse_args(["--methods", "da2,nope"])
    with pytest.raises(SystemExit):
        digits_table.parse_args(["--data", str(tmp_path)])


def test_the_nano_columns_count_what_each_method_keeps_and_trains():
    pytest.importorskip("timm")
    nano = digits_table.nano_bytes(["ft", "bias_lean", "da2_tail1"], batch_size=1, image_size=64)
    assert nano["bias_lean"]["saved_bytes"] * 20 < nano["ft"]["saved_bytes"]
    for backbone in digits_table.NANO_BACKBONES:
        key = backbone + "_training_bytes"
        # ft's gradients and Adam state alone are 3x its weights; the tail trains one block of them
        assert nano["bias_lean"][key] < nano["da2_tail1"][key] < nano["ft"][key]


def test_calibrate_shifts_reaches_only_the_methods_that_train_bn_shifts(tmp_path):
    for split in ("train", "val"):
        os.makedirs(str(tmp_path / "mnist" / split))
    args = digits_table.parse_args(["--methods", "ft,last,bias_lean,da2", "--data", str(tmp_path), "--backbone",
                                    "resnet18", "--no-pretrained", "--calibrate-shifts"])
    chosen = dict((m, digits_table.calibrates(args, m)) for m in ("ft", "last", "bias_lean", "da2"))
    assert chosen == {"ft": False, "last": False, "bias_lean": True, "da2": True}
    command = digits_table._train_command(args, "da2", "mnist", 1, 1.0, str(tmp_path / "run"))
    assert "--calibrate-shifts" in command
    ft_command = digits_table._train_command(args, "ft", "mnist", 1, 1.0, str(tmp_path))
    assert "--calibrate-shifts" not in ft_command and "--no-calibrate-shifts" not in ft_command
    args.calibrate_shifts = False
    assert not digits_table.calibrates(args, "da2")
    assert "--no-calibrate-shifts" in digits_table._train_command(args, "da2", "mnist", 1, 1.0, str(tmp_path))


def test_the_sweep_goes_beyond_an_end_while_the_best_is_there(tmp_path, monkeypatch):
    for split in ("train", "val"):
        os.makedirs(str(tmp_path / "mnist_m" / split))
    args = digits_table.parse_args(["--methods", "da2,bias_lean,ft", "--data", str(tmp_path)])
    accuracy = {"da2": lambda s: -abs(s - 1.0),            # best at 1: no extension
                "bias_lean": lambda s: s,                  # rising: 10 and 30 tried, 30 stays an edge
                "ft": lambda s: -s}                        # falling: 0.1 and 0.03 tried
    ran = []

    def fake_run_all(args, jobs, bar, stage, runs, threads=None):
        ran.extend(runs)
        return [{"method": m, "lr_scale": scale, "val_accuracy": accuracy[m](scale)} for m, _, _, scale in runs]

    monkeypatch.setattr(digits_table, "_run_all", fake_run_all)
    chosen, records, tried = digits_table.sweep_learning_rates(args)
    assert chosen == {"da2": 1.0, "bias_lean": 30.0, "ft": 0.03}
    assert tried == {"da2": [0.3, 1.0, 3.0], "bias_lean": [0.3, 1.0, 3.0, 10.0, 30.0],
                     "ft": [0.03, 0.1, 0.3, 1.0, 3.0]}
    assert len(ran) == len(records) == 2 * (9 + 4)  # each scale on both sweep seeds, 0 and 3
    assert sorted(set(seed for _, _, seed, _ in ran)) == [0, 3]


def test_the_sweep_chooses_on_the_mean_over_its_seeds(tmp_path, monkeypatch):
    for split in ("train", "val"):
        os.makedirs(str(tmp_path / "mnist_m" / split))
    args = digits_table.parse_args(["--methods", "da2", "--data", str(tmp_path), "--sweep-extend", "0"])
    # 0.3 wins on seed 0 by a little and loses on seed 3 by a lot: 1 is the better scale.
    accuracy = {(0.3, 0): 0.73, (1.0, 0): 0.72, (3.0, 0): 0.2, (0.3, 3): 0.70, (1.0, 3): 0.76, (3.0, 3): 0.2}

    def fake_run_all(args, jobs, bar, stage, runs, threads=None):
        return [{"method": m, "lr_scale": scale, "seed": seed, "val_accuracy": accuracy[scale, seed]}
                for m, _, seed, scale in runs]

    monkeypatch.setattr(digits_table, "_run_all", fake_run_all)
    chosen, records, _ = digits_table.sweep_learning_rates(args)
    assert chosen == {"da2": 1.0} and len(records) == 6


def test_the_sweep_seeds_must_not_be_the_tables(tmp_path, capsys):
    for split in ("train", "val"):
        os.makedirs(str(tmp_path / "mnist_m" / split))
    with pytest.raises(SystemExit):
        digits_table.parse_args(["--data", str(tmp_path), "--seeds", "1,2", "--sweep-seeds", "0,2"])
    assert "share a seed" in capsys.readouterr().err


def test_the_sweep_leaves_da2s_adaptor_rate_as_the_method_sets_it(tmp_path):
    for split in ("train", "val"):
        os.makedirs(str(tmp_path / "mnist" / split))
    args = digits_table.parse_args(["--methods", "da2,bias_lean", "--data", str(tmp_path)])
    command = digits_table._train_command(args, "da2", "mnist", 0, 3.0, str(tmp_path / "run"))
    rate = float(command[command.index("--lr") + 1].split("=")[1])
    assert command[command.index("--lr") + 1].startswith("adaptors=")
    assert rate * 3.0 == pytest.approx(0.1)  # --lr-scale 3 brings it back to da2's own 0.1
    assert "--lr" not in digits_table._train_command(args, "da2", "mnist", 0, 1.0, str(tmp_path / "run"))
    assert "--lr" not in digits_table._train_command(args, "bias_lean", "mnist", 0, 3.0, str(tmp_path / "run"))


@pytest.mark.parametrize("stale", [{"last": {"saved_bytes": -1}},  # the cache's format before its commit key
                                   {"commit": "0000000", "bytes": {"last": {"saved_bytes": -1}}}])
def test_a_nano_cache_of_another_commit_is_measured_again(tmp_path, stale):
    import argparse
    with open(str(tmp_path / "nano_bytes.json"), "w") as f:
        json.dump(stale, f)
    args = argparse.Namespace(workdir=str(tmp_path), methods=["last"])
    measured = digits_table.nano_column(args)
    assert measured["last"]["saved_bytes"] >= 0
    with open(str(tmp_path / "nano_bytes.json")) as f:
        stored = json.load(f)
    assert stored["bytes"]["last"] == measured["last"] and stored["commit"] != "0000000"
