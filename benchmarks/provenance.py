"""Where a results file came from: the commit its script ran at (benchmarks/results/*
name it beside their command and machine)."""
import os
import subprocess

__all__ = ["git_commit"]

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
