"""One run per output folder: ``slope train`` holds ``OUT/.lock`` while it runs.

The lock is an exclusive ``flock`` on ``OUT/.lock``, which holds the owner's pid and host. The
kernel drops a ``flock`` when its process dies however it dies, so a lock file left behind by a
killed run is stale by construction: the next run takes it over (and says so). A second run on
a folder in use is refused with :class:`RunLockError` naming the holder's pid.
(``flock`` is per host: two machines sharing a network folder are not excluded.)
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path

from slope.serialization.jsonfile import read_json_object

__all__ = ["RunLock", "RunLockError"]

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The output folder is in use by another run."""


class RunLock:
    """Context manager holding the lock of ``out`` (a folder); ``note`` receives one line when a
    stale lock of a dead run is taken over."""

    def __init__(self, out: str | os.PathLike, note=print):
        self.path = Path(out) / LOCK_NAME
        self.note = note
        self._fd: int | None = None

    def _holder(self) -> dict:
        return read_json_object(self.path) or {}

    def _lock_file(self) -> int:
        """An open descriptor of the lock file, locked; retried if a finishing holder removed the
        file between our open and our lock (we would hold a lock nobody else sees)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunLockError(f"cannot create the lock file {self.path} ({e.strerror or e}); choose a writable --out") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                raise RunLockError(
                    f"{self.path.parent} is in use by another slope train ({who}); wait for it to finish, "
                    "stop it, or choose another --out"
                ) from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def acquire(self) -> None:
        fd = self._lock_file()
        previous = self._holder()
        if previous.get("pid") not in (None, os.getpid()):
            self.note(f"note: took over the stale lock of pid {previous['pid']} in {self.path.parent} (that run is gone)")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then creates a fresh file
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
