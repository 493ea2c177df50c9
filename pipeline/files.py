"""Files that are never seen half-written: everything kdpipe writes goes to a temporary name beside its target
(`.<name>.tmp-<pid>`) and is renamed over it when complete; on any error the temporary is removed and the
target is left as it was. The next writer of a folder removes temporaries whose process is gone
(locking.py). JSON is written strict: no NaN or Infinity (a non-finite float becomes null)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary(path: Path, suffix: str = "") -> Path:
    """The temporary name of `path` for this process (`suffix` keeps an extension a writer looks at, e.g. .png)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def replacing(path: Path, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new contents to (a file or a folder); when the block ends
    without an error it replaces `path`, otherwise it is removed. `fsync`: flush a file to disk first."""
    path, tmp = Path(path), temporary(path, suffix)
    _remove(tmp)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if tmp.is_dir() and path.is_dir():  # a folder cannot be renamed over a non-empty one
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_dead_temporaries(folder: Path, pattern: str = "*") -> None:
    """Remove the temporaries of targets named `pattern` in `folder` (`.<pattern>.tmp-<pid>`) whose writer is
    gone (killed mid-write; they can be large), where other processes may be writing beside them."""
    for stale in Path(folder).glob(f".{pattern}.tmp-*"):
        try:
            os.kill(int(stale.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not ours to judge
            pass


def write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    with replacing(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    write_bytes(path, text.encode(), fsync)


def finite(value):
    """`value` with every non-finite float replaced by None: JSON has no NaN or Infinity, and the bare NaN that
    json.dumps writes by default is refused by strict readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value, indent: int | None = None) -> str:
    return json.dumps(finite(value), indent=indent, allow_nan=False)


def write_json(path: Path, value, indent: int | None = 2) -> None:
    write_text(path, json_text(value, indent) + "\n")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
