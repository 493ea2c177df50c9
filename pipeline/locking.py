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


@contextlib.contextmanager
def exclusive_for_job(folder: Path, flag: str = "--out"):
    """`exclusive` for a job of one or several processes (torchrun): rank 0 holds the lock, and every
    rank refuses alike when it cannot (the others would otherwise wait for rank 0 forever)."""
    from .runtime import distributed

    rank, world = distributed()
    if world == 1:
        with exclusive(folder, flag):
            yield
        return
    import torch
    import torch.distributed as dist

    with contextlib.ExitStack() as held:
        error = None
        if rank == 0:
            try:
                held.enter_context(exclusive(folder, flag))
            except KdpipeError as e:
                error = e
        failed = torch.tensor([error is not None], dtype=torch.int32)
        dist.broadcast(failed, 0)
        if failed.item():
            raise error or KdpipeError(f"{flag} {folder} is being written by another kdpipe process right now")
        yield
