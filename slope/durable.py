"""Writes that survive a kill at any instant and a power loss, and fail with one clear line.

- :func:`write_file`: the bytes reach the disk (``fsync``) before it returns; on any error
  (a full disk, a read-only folder) the partial file is removed and :class:`StorageError` says
  what failed.
- :func:`replace_file`: a file is replaced by new content atomically (a temporary sibling,
  ``fsync``, ``os.replace``, ``fsync`` of the folder): readers see the old or the new file, never
  a mix or an empty one.
- :func:`append_line`: one ``write`` of the whole line on an ``O_APPEND`` descriptor; a short or
  failed write is cut back, so a file of lines never ends in a torn line because of us.
- :func:`fsync_dir`: make renames and new entries inside a folder durable.

Every low-level write goes through :func:`_write_all` (tests replace it to simulate a full disk).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["StorageError", "append_line", "fsync_dir", "replace_file", "write_file"]


class StorageError(RuntimeError):
    """A file could not be written (disk full, permissions, ...); the message names the file and
    the cause in one line."""


def _describe(path: Path, err: OSError) -> str:
    reason = err.strerror or str(err)
    hint = {
        errno.ENOSPC: "the disk is full: free some space",
        errno.EDQUOT: "the disk quota is exceeded: free some space",
        errno.EACCES: "permission denied: choose a writable folder",
        errno.EROFS: "the file system is read-only: choose a writable folder",
    }.get(err.errno, "check the disk")
    return f"cannot write {path}: {reason} ({hint})"


def _write_all(fd: int, data: bytes | memoryview) -> int:
    """``os.write`` until all of ``data`` is written; returns the bytes written."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` the folder ``path`` so that entries created, renamed or removed in it persist."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Create or truncate ``path``, write ``data`` and ``fsync`` it. On failure the file is
    removed and :class:`StorageError` is raised (the folder is not synced: callers sync once)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise StorageError(_describe(path, e)) from e
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise StorageError(_describe(path, e)) from e
    os.close(fd)


def replace_file(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace (or create) ``path`` with ``data``; durable when it returns."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(_describe(path, e)) from e


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` (no newline; one is added) to ``path`` with a single write. A failed or
    short write is truncated back to the previous end and raises :class:`StorageError`, so the
    file still ends with a complete line."""
    path = Path(path)
    data = (line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise StorageError(_describe(path, e)) from e
    try:
        end = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
        except OSError as e:
            os.ftruncate(fd, end)
            raise StorageError(_describe(path, e)) from e
    finally:
        os.close(fd)
