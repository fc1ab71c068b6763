"""Where a results file came from: the commit its script ran at and the command
that reruns it (benchmarks/results/* name both beside the machine)."""
import json
import os
import subprocess

__all__ = ["git_commit", "rerun_command", "write_table"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(code_paths=("da2ext", "csrc")):
    """The checkout's short commit, with "+changes" when the files under
    `code_paths` (what the measurement ran) differ from it; "unknown" outside git."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                         stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--"] + list(code_paths), cwd=ROOT,
                                stderr=subprocess.DEVNULL) != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def rerun_command(script, argv):
    """`python <script> <argv>` without --out-dir: where a run wrote is not how to rerun it."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == "--out-dir":
            skip = True
        elif not argument.startswith("--out-dir="):
            kept.append(argument)
    return " ".join(["python", script] + kept)


def write_table(out_dir, stem, record, markdown):
    """out_dir/<stem>.json (`record`) and out_dir/<stem>.md (`markdown`); prints the markdown."""
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(markdown)
    print(markdown)
