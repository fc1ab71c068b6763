"""Writes that an interruption cannot half-do: domain files and checkpoints are
written to a temporary file in the same directory, flushed to disk, then renamed
over the destination (os.replace is atomic on POSIX and Windows). Whatever was
saved before stays intact until the new file is complete."""
import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path, write, mode="wb"):
    """Call write(file_object) on a temporary file next to `path`, then move it
    into place. On any exception (KeyboardInterrupt included) the temporary file
    is removed and `path` is left as it was."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError("directory {} does not exist".format(directory))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=directory)
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
