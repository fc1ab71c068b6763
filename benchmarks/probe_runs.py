"""What the single-domain probes share (training_recipe_probe.py,
shift_calibration_probe.py): their common arguments, and how they write
benchmarks/results/<stem>.{json,md} with the commit they ran at."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from da2ext.domains.atomic_file import atomic_write  # noqa: E402
from provenance import git_commit  # noqa: E402

__all__ = ["add_probe_arguments", "write_results"]


def add_probe_arguments(parser):
    """The digits table's setting on one domain, with seeds none of the table's."""
    parser.add_argument("--data", required=True, help="the digits domains (python -m da2ext prepare-digits DIR)")
    parser.add_argument("--domain", default="mnist_m")
    parser.add_argument("--seeds", default="0,3,4", type=lambda text: [int(s) for s in text.split(",")])
    parser.add_argument("--subsample", type=int, default=720)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))


def write_results(out_dir, stem, script, argv, records, markdown):
    """out_dir/<stem>.json (commit, argv, records) and out_dir/<stem>.md; prints the markdown."""
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    commit = git_commit(("da2ext", "csrc", "benchmarks/" + script))
    text = json.dumps({"commit": commit, "argv": argv, "records": records}, indent=1, sort_keys=True) + "\n"
    atomic_write(os.path.join(out_dir, stem + ".json"), lambda f: f.write(text), mode="w")
    atomic_write(os.path.join(out_dir, stem + ".md"), lambda f: f.write(markdown), mode="w")
    print(markdown)
