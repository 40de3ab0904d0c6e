"""The ``--out`` folder of a training run: checked before any work, locked while a run uses it,
and cleared (moved aside, never deleted) for ``--restart``.

The lock is an OS lock (``fcntl.flock``) on ``<out>/train.lock``, which holds the pid and host
of the run that has it: a second run on the folder is refused with that pid, and the kernel
releases the lock when its process ends however it ends, so the folder of a killed run is taken
over by the next one. On storage without file locks the run goes on with a warning. Only the
main process of a multi-process run takes it.
"""

import errno
import os
import pathlib
import shutil
import socket
import time

try:
    import fcntl
except ImportError:  # not a POSIX system: runs go on unlocked, with a warning
    fcntl = None

from train.errors import RunFailure, UserError

LOCK_FILE = "train.lock"
OLD_RUNS_DIR = "old_runs"
# What a run writes at the top of its folder; --restart moves these aside.
RUN_ENTRIES = ("checkpoints", "damaged_checkpoints", "metrics.jsonl", "config.yaml", "loss.png")


def write_atomically(path, data):
    """Writes ``data`` (text or bytes) to ``<path>.partial``, then renames it to ``path``: a
    kill mid-write leaves the previous file whole, and a reader never sees half a file."""
    partial = f"{path}.partial"
    with open(partial, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)
    os.replace(partial, path)


class OutDirError(UserError):
    """The ``--out`` path cannot hold a run (a file, unwritable)."""


class RunFolderBusy(RunFailure):
    """Another run holds the folder's lock."""


def check_out_dir(out):
    """``OutDirError`` unless ``out`` is, or can be made, a writable folder. Creates nothing."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutDirError(f"--out {out} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutDirError(f"--out {out} cannot be written: {existing} is read-only")


class RunLock:
    """``with RunLock(out):`` creates ``out`` and holds its lock (``RunFolderBusy`` if taken)."""

    def __init__(self, out, *, log=print):
        self.out = pathlib.Path(out)
        self.path = self.out / LOCK_FILE
        self._log = log
        self._fd = None

    def acquire(self):
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutDirError(f"--out {self.out} cannot be written: {err.strerror}") from err
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "file locks are not available on this system")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise RunFolderBusy(f"{self.out} is in use by another m2rnn-train ({holder}); wait "
                                f"for it to end, or stop it, or choose another --out") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                                 errno.EINVAL):
                os.close(fd)
                raise
            self._log(f"WARNING: {self.out} cannot be locked ({err.strerror}); make sure no "
                      f"other run uses it at the same time")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays for the next run
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def move_aside(out) -> pathlib.Path | None:
    """Moves what a previous run wrote in ``out`` to ``out/old_runs/<time>/`` (nothing is
    deleted); the folder it made, or ``None`` when there was nothing."""
    out = pathlib.Path(out)
    present = [name for name in RUN_ENTRIES if (out / name).exists()]
    if not present:
        return None
    target = out / OLD_RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        suffix += 1
    target.mkdir(parents=True)
    for name in present:
        shutil.move(str(out / name), str(target / name))
    return target
