"""Where a run keeps its checkpoints, so that no crash loses one.

In a run folder, next to ``checkpoint/`` (the argument ``base`` of every function here)::

    checkpoint/                  the newest complete checkpoint: what --resume, eval and generate read
    checkpoint-step000200/ ...   older complete ones, kept by --keep-checkpoints K (the K-1 newest)
    checkpoint.tmp/              a save in progress
    checkpoint.old/              the previous checkpoint while a save publishes the new one

:func:`publish` writes ``checkpoint.tmp/`` (every file ``fsync``-ed, the manifest last, then the
folder), renames ``checkpoint/`` to ``checkpoint.old/`` and ``checkpoint.tmp/`` to
``checkpoint/``, ``fsync``-s the run folder, and only then retires ``checkpoint.old/`` (kept as
``checkpoint-stepN/`` or removed). So a kill or a power loss at any instant leaves the newest
complete checkpoint under one of these names:

====================================  ==================================================
left behind                           newest complete checkpoint
====================================  ==================================================
checkpoint/ + partial .tmp/           checkpoint/ (the save had not finished writing)
checkpoint/ + complete .tmp/          .tmp/ (written and synced, not yet published)
.old/ + complete .tmp/ (no ckpt/)     .tmp/ (killed between the two renames)
checkpoint/ + .old/                   checkpoint/ (killed before .old/ was retired)
====================================  ==================================================

"Complete" means the manifest and every checksum verify; "newest" is the highest manifest
``serial`` (ties: .tmp, then checkpoint/, then .old), never a step number or a clock, so a new
run started in an old folder is ordered right. :func:`latest_checkpoint` finds it without
changing anything (``slope eval``); :func:`recover` (``slope train``, under the run lock)
publishes it as ``checkpoint/`` and removes only partial leftovers: a complete checkpoint is never
deleted except to rotate it out after a newer one is safely in place.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from slope.checkpoint import CheckpointError, verify_checkpoint
from slope.durable import StorageError, fsync_dir
from slope.serialization.jsonfile import read_json_object

__all__ = ["kept_checkpoints", "latest_checkpoint", "publish", "recover"]

#: tie-break of equal serials: an unpublished complete save is the newest, a retiring one the oldest
_ROLE_RANK = {".tmp": 3, "": 2, ".old": 1}


def _sibling(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


def kept_checkpoints(base: Path) -> list[Path]:
    """The ``checkpoint-stepN/`` folders next to ``base``, oldest first (by manifest serial)."""
    kept = [p for p in base.parent.glob(base.name + "-step*") if p.is_dir()]
    return sorted(kept, key=lambda p: (_serial(p), p.name))


def _manifest(path: Path) -> dict:
    """``path``'s manifest, or ``{}`` when it has none that reads as a JSON object."""
    return read_json_object(path / "manifest.json") or {}


def _serial(path: Path) -> int:
    """The manifest's serial (checkpoints written before serials existed: 0; none: -1)."""
    manifest = _manifest(path)
    serial = manifest.get("serial", 0) if manifest else -1
    return serial if isinstance(serial, int) else -1


def _complete(path: Path, optional: tuple[str, ...] = ()) -> bool:
    try:
        verify_checkpoint(path, optional)
    except CheckpointError:
        return False
    return True


def _candidates(base: Path) -> list[Path]:
    """Existing checkpoint folders of ``base``, newest first by (serial, role)."""
    named = [(_sibling(base, suffix), rank) for suffix, rank in _ROLE_RANK.items()]
    named += [(p, 0) for p in kept_checkpoints(base)]
    found = [(path, rank) for path, rank in named if path.is_dir()]
    return [path for path, _ in sorted(found, key=lambda item: (_serial(item[0]), item[1]), reverse=True)]


def _newest_complete(base: Path, optional: tuple[str, ...] = ()) -> Path | None:
    """The newest complete checkpoint folder of ``base``, or None. ``base`` itself is trusted when it
    is the newest (it is only ever created by renaming a complete, synced folder; reading it verifies
    every checksum), and a ``base`` without a readable manifest is damaged, not a crash leftover:
    its error is raised rather than silently falling back to an older checkpoint."""
    if base.is_dir() and _serial(base) < 0:
        verify_checkpoint(base, optional)
    for path in _candidates(base):
        if path == base or _complete(path, optional):
            return path
    return None


def latest_checkpoint(base: str | Path, hint: str = "train one first (slope train --out RUN)", optional: tuple[str, ...] = ()) -> Path:
    """The folder holding the newest complete checkpoint of ``base`` (``RUN/checkpoint``), whatever
    a crash left (module docstring); changes nothing. ``optional``: files a checkpoint may lack
    and still count as complete (:data:`slope.checkpoint.TRAINING_ONLY` for inference). Raises
    :class:`CheckpointError` (ending in ``hint``) when there is none."""
    base = Path(base)
    found = _newest_complete(base, optional)
    if found is None:
        raise CheckpointError(f"no checkpoint at {base}{checkpoints_beside(base)}; {hint}")
    return found


def checkpoints_beside(path: Path) -> str:
    """``" (PARENT holds checkpoint, checkpoint-step000010)"``: the checkpoint folders next to a
    ``path`` that is not one (a mistyped step, e.g. ``checkpoint-step10``), or ``""``."""
    parent = Path(path).parent
    names = sorted(p.name for p in parent.glob("checkpoint*") if p.is_dir() and p != Path(path)) if parent.is_dir() else []
    return f" ({parent} holds {', '.join(names[-4:])})" if names else ""


def _prune_kept(base: Path, keep: int) -> None:
    """Remove the oldest ``checkpoint-stepN/`` folders beyond the ``keep - 1`` newest."""
    kept = kept_checkpoints(base)
    for path in kept[: max(0, len(kept) - (keep - 1))]:
        shutil.rmtree(path)


def _retire(path: Path, base: Path, keep: int) -> None:
    """Rotate out the complete checkpoint ``path`` (a newer one is safely in place): keep it as
    ``checkpoint-stepN/`` when ``keep > 1``, else remove it; then prune the kept ones."""
    if keep > 1:
        target = _sibling(base, f"-step{_manifest(path).get('step', 0):06d}")
        if target.exists():  # the same step saved again (a new run in this folder): the newer wins
            shutil.rmtree(target)
        os.rename(path, target)
    else:
        shutil.rmtree(path)
    _prune_kept(base, keep)
    fsync_dir(base.parent)


def recover(base: str | Path, keep: int = 1) -> list[str]:
    """Finish whatever a crash interrupted (module docstring): publish the newest complete
    checkpoint as ``base``, retire the older ones of the interrupted save, remove partial
    leftovers. Returns one line per action taken. A damaged ``base`` is left for
    :func:`~slope.checkpoint.read_checkpoint` to report. Call it only while holding the run's
    lock (:mod:`slope.runlock`)."""
    base = Path(base)
    tmp, old = _sibling(base, ".tmp"), _sibling(base, ".old")
    try:
        newest = _newest_complete(base)
    except CheckpointError:
        newest = None
    notes = []
    for partial in (tmp, old):
        if partial.is_dir() and partial != newest and not _complete(partial):
            shutil.rmtree(partial)
            notes.append(f"removed {partial.name}/, the partial leftover of an interrupted save")
    if newest is None:
        return notes
    if newest != base:
        if old.is_dir() and newest != old:
            _retire(old, base, keep)  # complete and older than newest
        if base.is_dir():
            if not _complete(base):
                shutil.rmtree(base)  # damaged, and a newer complete checkpoint exists
            elif newest == old:
                _retire(base, base, keep)
            else:
                os.rename(base, old)
        os.rename(newest, base)
        fsync_dir(base.parent)
        notes.append(f"an interrupted save of step {_manifest(base).get('step')} was complete: published {newest.name}/ as {base.name}/")
    for leftover in (old, tmp):
        if leftover.is_dir():  # complete and older than base: partial ones are gone
            _retire(leftover, base, keep)
            notes.append(f"rotated out {leftover.name}/, the previous checkpoint of an interrupted save")
    return notes


def publish(base: Path, write: Callable[[Path, int], None], keep: int = 1) -> Path:
    """Save a new checkpoint as ``base`` crash-safely: ``write(folder, serial)`` fills an empty
    folder (every file durable; the manifest, holding ``serial``, last), then the module
    docstring's renames publish it and the previous one is retired. On any error (a full disk)
    or interrupt while writing, the partial folder is removed and the previous checkpoint stays."""
    tmp, old = _sibling(base, ".tmp"), _sibling(base, ".old")
    if tmp.exists() or old.exists():
        recover(base, keep)  # a crash left a save unfinished: finish it before starting another
    serial = 1 + max([_serial(p) for p in _candidates(base)], default=0)
    try:
        tmp.mkdir(parents=True)
        write(tmp, serial)
        fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise StorageError(f"cannot write the checkpoint {tmp}: {e.strerror or e}") from e
        raise
    try:
        if base.exists():
            os.rename(base, old)
        os.rename(tmp, base)
        fsync_dir(base.parent)
        if old.exists():
            _retire(old, base, keep)
        else:
            _prune_kept(base, keep)
    except OSError as e:
        raise StorageError(f"cannot publish the checkpoint {base}: {e.strerror or e} (the next run recovers it)") from e
    return base
