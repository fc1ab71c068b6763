"""benchmarks/lean_activations_table.py in a short run (the first real block only):
a RecomputedBlock keeps its input alone (4 bytes per input element, 2 in float16 or
bfloat16) and gives plain autograd's gradients to float32 rounding; the half-precision
copies stay within docs/design.md §3's bounds (float16: 2e-4 for smooth derivatives,
2e-2 with jumps; bfloat16 5e-2); an
EfficientNet-B0 MBConv keeps under a tenth of plain autograd's bytes, its transient
under half; the results name their commit."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import lean_activations_table  # noqa: E402

# docs/design.md §3: a derivative with jumps (ReLU's, hardswish's, a hard sigmoid's) flips where the rounded
# input crosses a kink, so the error grows as the square root of the flipped share; smooth ones stay near
# the rounding itself.
BOUNDS = {"recomputed, float16 input": 2e-2, "recomputed, bfloat16 input": 5e-2}
SMOOTH_FLOAT16_BOUND = 2e-4
SMOOTH = ("BN + SiLU", "BN + GELU", "squeeze-excitation, sigmoid gate", "LayerNorm2d")


def test_lean_activations_table(tmp_path):
    assert lean_activations_table.main(["--runs", "1", "--blocks", "first", "--tag", "test",
                                        "--out-dir", str(tmp_path)]) == 0
    with open(str(tmp_path / "lean_activations_test.json")) as f:
        results = json.load(f)
    records = results["records"]
    groups = {}
    for r in records:
        groups.setdefault((r["table"], r["what"]), {})[r["kept"]] = r
    assert len(groups) == len(lean_activations_table.nonlinearities()) + 1
    for (table, what), rows in groups.items():
        assert set(rows) == set(label for label, _, _ in lean_activations_table.CHOICES), what
        plain, exact = rows["plain autograd"], rows["recomputed"]
        assert exact["bytes_per_input_element"] == 4.0 and exact["kept_bytes"] <= plain["kept_bytes"], what
        assert 0 < plain["gradient_error"] < 1e-5, what  # float32 rounding against float64
        assert exact["gradient_error"] < 1e-5, what  # float32 rounding too (the BNs' input gradients computed apart)
        for label, bound in BOUNDS.items():
            assert rows[label]["bytes_per_input_element"] == 2.0 and rows[label]["gradient_error"] < bound, (what,
                                                                                                            label)
        if what in SMOOTH:
            assert rows["recomputed, float16 input"]["gradient_error"] < SMOOTH_FLOAT16_BOUND, what
        if table == "blocks":
            assert exact["vs_plain"] < 0.1, what
            # the recompute keeps the nonlinearities' inputs, not the frozen convs' and BNs'
            assert 0 < exact["recompute_transient_bytes"] < plain["kept_bytes"] / 2
            assert plain["recompute_transient_bytes"] == 0
            assert exact["step_time"] > 0 and plain["step_time"] > 0
    table = (tmp_path / "lean_activations_test.md").read_text()
    assert results["meta"]["commit"] in table and "| BN + SiLU | recomputed |" in table
