"""One training run per domain and work directory at a time: an advisory file lock.

Two `train` runs of the same domain in the same work directory would resume each
other's checkpoint, delete it, and overwrite each other's domain file; the
second one must stop at once instead and say who holds the domain. The lock is
fcntl.flock on a lock file: the kernel releases it when its holder exits, however
it exits (SIGKILL included), so a dead run never leaves a domain locked. The lock
file itself stays (removing it would race with the next run that opens it); it
holds a line naming the holder. Where fcntl does not exist (Windows), runs are
not locked.
"""
import contextlib
import errno
import os
import socket
import time

__all__ = ["RunLockedError", "run_lock"]


class RunLockedError(RuntimeError):
    """Another live process holds the lock."""


def _fcntl():
    try:
        import fcntl
        return fcntl
    except ImportError:  # not a POSIX system
        return None


@contextlib.contextmanager
def run_lock(path, what):
    """Hold the exclusive lock `path` for the duration of the block, or raise
    RunLockedError at once (naming `what` and the holder) if another process holds it."""
    fcntl = _fcntl()
    if fcntl is None:
        yield
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            raise RunLockedError("{} is being trained by another run ({}; lock file {}); wait for it to finish "
                                 "or use another --workdir".format(what, holder, path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, "pid {} on {}, since {}\n".format(
            os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S")).encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
