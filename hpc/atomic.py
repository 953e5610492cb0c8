"""Atomic file writes (temp file in the same folder, fsync, rename: readers never see half a
file and a crash leaves the previous version in place) and the integrity check of a written
file against its recorded size and sha256 (shards, checkpoints).

A write that fails (disk full, I/O error, a temp file removed under us, an unwritable folder)
raises `OutputError`: an error of the output, never of the input being processed, so callers
that record bad inputs and go on (preprocessing) let it stop the job instead. Nothing is left
half-written: the temp file is removed and the previous version of `path` stays.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class OutputError(Exception):
    """Writing an output failed (ENOSPC, EIO, EACCES, a vanished temp file...). Not an OSError
    subclass on purpose: code that catches OSError as "bad input" must not swallow it."""

    def __init__(self, path: str | os.PathLike, cause: BaseException | str):
        why = cause if isinstance(cause, str) else (getattr(cause, "strerror", None) or str(cause) or type(cause).__name__)
        super().__init__(f"cannot write {path}: {why}")
        self.path = Path(path)
        self.errno = getattr(cause, "errno", None)


def check_free_space(path: str | os.PathLike, nbytes: int) -> None:
    """OutputError(ENOSPC) naming `path` when its file system (of `path`, or of its folder if
    `path` does not exist yet) has less than `nbytes` free."""
    path = Path(path)
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    if free < nbytes:
        raise OutputError(path, OSError(errno.ENOSPC, f"No space left on device: needs {nbytes} bytes, "
                                                      f"{free} free"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on clean exit it is renamed onto `path`, on error removed.
    An OSError while writing (in the block, the fsync or the rename) becomes `OutputError`.

    For writers that open the file themselves (torch.save, PIL)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        # mkstemp makes 0600; give the file the mode a plain open() would (shared cluster folders)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` atomically, after checking that it fits on the disk (a clean ENOSPC)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    check_free_space(path, len(data))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def file_mismatch(path: str | os.PathLike, nbytes: int, sha256: str) -> str | None:
    """None when `path` exists with exactly this size and sha256, else what is wrong."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if size != nbytes:
        return f"{size} bytes, expected {nbytes}"
    if sha256_file(p) != sha256:
        return "sha256 differs from the recorded one"
    return None
