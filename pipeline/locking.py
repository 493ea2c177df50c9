"""One writer per output folder: a second kdpipe process writing the same cache or run folder refuses
at once instead of interleaving with the first. The lock is an OS file lock (filelock, fcntl/flock
on POSIX), so a writer killed with -9 releases it; the lock file itself stays and is harmless. The
temporaries such a writer left (`.<name>.tmp-<pid>`) are removed by the next writer."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import KdpipeError

LOCK_NAME = ".kdpipe.lock"


@contextlib.contextmanager
def exclusive(folder: Path, flag: str = "--out"):
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise KdpipeError(f"{flag} {folder} is being written by another kdpipe process right now; wait for it "
                          "to finish, or choose another " + flag) from None
    try:
        for stale in folder.glob(".*.tmp-*"):  # left by a writer that was killed; we are the only writer now
            if stale.is_dir():
                import shutil

                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield
    finally:
        lock.release()
