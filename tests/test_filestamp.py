"""slope.filestamp: a file's stamp changes with its bytes (not with a rename), and sha256_file
hashes each settled file state once."""
import hashlib
import os
import time

import pytest

from slope import filestamp


def _dated(path, seconds_ago: int) -> None:
    os.utime(path, ns=(path.stat().st_atime_ns, time.time_ns() - seconds_ago * 10**9))


@pytest.fixture
def opened(monkeypatch):
    """The paths sha256_file opens (it still opens them)."""
    paths = []

    def counting_open(path, *args, **kwargs):
        paths.append(os.fspath(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(filestamp, "open", counting_open, raising=False)
    return paths


def test_settled_files_are_hashed_once_and_changes_are_seen(tmp_path, opened):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 3000)
    assert filestamp.file_stamp(path) is None  # just written: no stamp
    assert filestamp.sha256_file(path) == filestamp.sha256_file(path) == hashlib.sha256(b"x" * 3000).hexdigest()
    assert len(opened) == 2
    _dated(path, 100)
    assert filestamp.sha256_file(path) == filestamp.sha256_file(path) and len(opened) == 3
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))  # the same bytes under another name
    moved = tmp_path.with_name(tmp_path.name + "-moved") / "a.bin"
    assert filestamp.sha256_file(moved) == hashlib.sha256(b"x" * 3000).hexdigest() and len(opened) == 3
    moved.write_bytes(b"y" * 3000)  # same size, rewritten in place
    _dated(moved, 50)
    assert filestamp.sha256_file(moved) == hashlib.sha256(b"y" * 3000).hexdigest() and len(opened) == 4
    assert filestamp.file_stamp(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError):
        filestamp.sha256_file(tmp_path / "missing")


def test_the_digest_cache_is_bounded(tmp_path, monkeypatch, opened):
    monkeypatch.setattr(filestamp, "MAX_DIGESTS", 2)
    paths = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(bytes([i]) * 10)
        _dated(path, 100)
        filestamp.sha256_file(path)
    assert len(filestamp._digests) <= 2
    filestamp.sha256_file(paths[0])  # dropped first: hashed again
    assert opened.count(os.fspath(paths[0])) == 2
