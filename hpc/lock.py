"""One writer per output folder: `folder_lock(folder, what)` holds `<folder>/.lock` for a job.

The lock is an exclusive `flock` on the file, held for as long as the job runs; the file
records who holds it (host, pid, start time, what), for the error a second writer gets. The
kernel drops a flock when its process dies, so a job killed with SIGKILL leaves a file whose
lock is free: the next job takes it over (a stale lock, said once). Across hosts it relies on
the file system's flock (Lustre with `-o flock`, GPFS, NFSv4 lock it cluster-wide); on one that
answers ENOLCK/ENOTSUP the recorded host and pid still refuse a second writer on the same host.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK = ".lock"


class FolderLocked(ValueError):
    """Another job writes this folder (a user-facing error: one line, exit code 2)."""


def _holder(path: Path) -> dict:
    try:
        d = json.loads(path.read_text() or "{}")
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(who: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["time"])) if "time" in who else "?"
    return f"{who.get('what', 'a job')} (pid {who.get('pid', '?')} on {who.get('host', '?')}, since {since})"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the output lock of `folder` (created if missing) for the block; `FolderLocked`
    naming the holder if another live job has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderLocked(f"{folder} is being written by {_describe(_holder(path))}; wait for it to "
                                   f"finish, or write elsewhere (lock file {path})") from None
            if exc.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            who = _holder(path)  # no flock on this file system: the record alone decides, on this host
            if who.get("host") == socket.gethostname() and who.get("pid") != os.getpid() and _alive(int(who.get("pid", 0))):
                raise FolderLocked(f"{folder} is being written by {_describe(who)} (lock file {path})") from None
        old = _holder(path)
        if old.get("pid") and old.get("pid") != os.getpid():
            print(f"{what}: taking over the stale lock of {_describe(old)}, which no longer runs", file=sys.stderr)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": round(time.time(), 3), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
        os.ftruncate(fd, 0)  # released: an empty record, nobody to name
    finally:
        os.close(fd)  # drops the flock
