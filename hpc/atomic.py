"""Atomic file writes (temp file in the same folder, fsync, rename: readers never see half a
file and a crash leaves the previous version in place) and the integrity check of a written
file against its recorded size and sha256 (shards, checkpoints)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on clean exit it is renamed onto `path`, on error removed.

    For writers that open the file themselves (h5py, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes 0600; give the file the mode a plain open() would (shared cluster folders)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
