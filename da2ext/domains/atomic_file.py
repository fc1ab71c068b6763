"""Writes that an interruption cannot half-do: domain files and checkpoints are
written to a temporary file in the same directory, flushed to disk, then renamed
over the destination (os.replace is atomic on POSIX and Windows). Whatever was
saved before stays intact until the new file is complete."""
import glob
import os
import tempfile

__all__ = ["atomic_write", "remove_stale_partials"]


_PARTIAL_SUFFIX = ".partial"


def _partial_prefix(path):
    return "." + os.path.basename(path) + "."


def remove_stale_partials(path):
    """Remove the temporary files atomic_write left next to `path` when its
    process was killed mid-write (SIGKILL skips the cleanup); returns their
    paths. Only names of atomic_write's own pattern for this path go. Call it
    only while no other process can be writing `path` (da2ext holds the
    domain's run lock)."""
    path = os.path.abspath(path)
    pattern = os.path.join(glob.escape(os.path.dirname(path)),
                            glob.escape(_partial_prefix(path)) + "*" + _PARTIAL_SUFFIX)
    removed = []
    for stale in glob.glob(pattern):
        try:
            os.remove(stale)
            removed.append(stale)
        except OSError:
            pass
    return removed


def atomic_write(path, write, mode="wb"):
    """Call write(file_object) on a temporary file next to `path`, then move it
    into place. On any exception (KeyboardInterrupt included) the temporary file
    is removed and `path` is left as it was."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError("directory {} does not exist".format(directory))
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(path), suffix=_PARTIAL_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
