"""One writer per output folder: a second kdpipe process writing the same cache or run folder refuses
at once instead of interleaving with the first. The lock is an OS file lock (filelock, fcntl/flock
on POSIX), so a writer killed with -9 releases it; the lock file itself stays and is harmless. The
temporaries such a writer left (`.<name>.tmp-<pid>`) are removed by the next writer. A folder that a
refused command created and left holding nothing but the lock file is removed again, with the parents
it created."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import KdpipeError

LOCK_NAME = ".kdpipe.lock"


def make_folder(folder: Path, flag: str = "--out") -> list[Path]:
    """Create `folder` (and its parents) as an output folder; returns the folders it created, deepest first.
    A file, a broken link or an unwritable place is a one-line KdpipeError naming `flag`."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise KdpipeError(f"{flag} {folder} is a symbolic link to {os.readlink(folder)}, which does not exist; "
                          f"create its target or choose another {flag}")
    if folder.exists() and not folder.is_dir():
        raise KdpipeError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists() or parent.is_symlink():
            break
        created.append(parent)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KdpipeError(f"{flag} {folder}: cannot create it ({e.strerror or e}); choose another {flag}") from None
    return created


def remove_if_empty(created: list[Path]) -> None:
    """Remove the folders `make_folder` created (deepest first) while they hold nothing but a lock file."""
    for folder in created:
        try:
            if _only_lock(folder):
                (folder / LOCK_NAME).unlink()
            folder.rmdir()
        except OSError:  # gone, or not empty (something was written, or another process is in it): keep it
            return


def _only_lock(folder: Path) -> bool:
    return [p.name for p in folder.iterdir()] == [LOCK_NAME]


@contextlib.contextmanager
def exclusive(folder: Path, flag: str = "--out"):
    """Hold `folder`'s lock for the block. If the block fails and the folder was created here and holds
    nothing else, it is removed: a refused command leaves no empty folder behind."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    created = make_folder(folder, flag)
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise KdpipeError(f"{flag} {folder} is being written by another kdpipe process right now; wait for it "
                          "to finish, or choose another " + flag) from None
    except OSError as e:
        remove_if_empty(created)
        raise KdpipeError(f"{flag} {folder}: cannot write in it ({e.strerror or e}); choose another {flag}") from None
    ok = False
    try:
        for stale in folder.glob(".*.tmp-*"):  # left by a writer that was killed; we are the only writer now
            if stale.is_dir():
                import shutil

                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield
        ok = True
    finally:
        if not ok and created and _only_lock(folder):
            (folder / LOCK_NAME).unlink(missing_ok=True)  # while still held: no one else can be inside
        lock.release()
        if not ok:
            remove_if_empty(created)


def held(folder: Path) -> bool:
    """Whether a process holds `folder`'s lock right now (a live writer). Creates nothing: a folder without
    a lock file was never locked."""
    from filelock import FileLock, Timeout

    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:  # unreadable: say so by calling it held rather than guessing it free
        return True
    lock.release()
    return False


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

    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(exclusive(folder, flag))
            except KdpipeError as e:
                error = e
        failed = torch.tensor([error is not None], dtype=torch.int32)
        dist.broadcast(failed, 0)
        if failed.item():
            raise error or KdpipeError(f"{flag} {folder} is being written by another kdpipe process right now")
        yield
