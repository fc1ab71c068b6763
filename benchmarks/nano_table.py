"""The nano table (docs/design.md §4) from a checkout: da2ext.cli.nano_table with its
results in benchmarks/results/. The code lives in the package, so that
`python -m da2ext nano-table` runs only the installed package's own code.

    python benchmarks/nano_table.py                       # everything, CPU
    python benchmarks/nano_table.py --device cuda --tag h100
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a checkout runs without installing

from da2ext.cli.nano_table import *  # noqa: E402,F401,F403  (the suites and scripts here use its names)
from da2ext.cli.nano_table import main as _main  # noqa: E402
from provenance import git_commit, rerun_command  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--provenance" or a.startswith("--provenance=") for a in argv):
        argv += ["--provenance", "Commit {}; rerun: `{}`.".format(
            git_commit(), rerun_command("benchmarks/nano_table.py", argv))]
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in argv):
        argv += ["--out-dir", os.path.join(HERE, "results")]
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
