"""What identifies a file's bytes without reading them, and its sha256 hashed once per such state.

:func:`file_stamp` is ``(device, inode, size, mtime_ns, ctime_ns)``: any write to the file, a
replacement (new inode), a truncation or a ``touch`` changes it, a rename of the file or of a folder
above it does not (the bytes are the same). Like git's "racily clean" rule, a file modified in the
last :data:`SETTLE_NS` has no stamp: a same-size rewrite within the file system's timestamp
granularity could not be told apart from it, so what is derived from such a file is not cached.

:func:`sha256_file` keeps, per process, the digests of up to :data:`MAX_DIGESTS` file states
(keyed by stamp; the digests are immutable strings, so no caller can change what another sees):
finding the newest complete checkpoint, recovering a crashed save and reading the checkpoint
(:mod:`slope.checkpoint_store`, :func:`slope.checkpoint.verify_checkpoint`) hash each file once.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict

__all__ = ["SETTLE_NS", "MAX_DIGESTS", "file_stamp", "sha256_file"]

#: a file modified less than this long ago (or in the future) gets no stamp.
SETTLE_NS = 2 * 10**9
#: digests :func:`sha256_file` keeps per process (least recently used dropped first).
MAX_DIGESTS = 1024

_digests: OrderedDict[tuple, str] = OrderedDict()
_lock = threading.Lock()


def file_stamp(path: str | os.PathLike) -> tuple | None:
    """``(device, inode, size, mtime_ns, ctime_ns)`` of ``path``, or None when it cannot be
    stat'ed or was modified too recently to key a cache (module docstring)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if time.time_ns() - st.st_mtime_ns < SETTLE_NS:  # (a future mtime too)
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 (hex) of the file at ``path``, read in 1 MiB blocks; remembered per
    :func:`file_stamp` (when it has one and it did not change while the file was read)."""
    stamp = file_stamp(path)
    if stamp is not None:
        with _lock:
            digest = _digests.get(stamp)
            if digest is not None:
                _digests.move_to_end(stamp)
                return digest
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hasher.update(block)
    digest = hasher.hexdigest()
    if stamp is not None and file_stamp(path) == stamp:
        with _lock:
            _digests[stamp] = digest
            while len(_digests) > MAX_DIGESTS:
                _digests.popitem(last=False)
    return digest
