"""Files that are either wholly written or not there at all, on the file system they live on.

A write goes to a hidden partial file beside its target, is flushed to disk
(fsync), then renamed over the target, and the directory entry is flushed too.
Rename is atomic only within one file system, so the partial file is never put
in ``TMPDIR``: on a cluster that is usually a node-local disk while the run
directory is on a shared one, and a cross-device "rename" is a copy that a kill
can cut in half (fsspec's transactions, which Lightning uses, do exactly that).
A kill leaves at most a partial file beside the target, which
``remove_partial_files`` clears at the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before its rename: same directory, hidden, per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a partial file beside ``path``, fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (its entry, not only the file's data)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_files(directory: Path) -> list[Path]:
    """Delete the partial files a killed writer left in ``directory``; return them."""
    if not directory.is_dir():
        return []
    found = sorted(directory.glob(f".*{PARTIAL_SUFFIX}"))
    for p in found:
        if p.is_dir():  # a sharded checkpoint's directory (vlmtrain.engines.FsdpStrategy)
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def read_json(path: Path, what: str) -> Any:
    """A JSON file vlmtrain wrote; a damaged one is an error naming the file and ``what`` it is."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(path, f"{what} is damaged ({e})") from None


class DamagedFileError(ValueError):
    """A file vlmtrain wrote that no longer reads back."""

    def __init__(self, path: Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
