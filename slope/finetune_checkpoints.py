"""``checkpoint-<step>/`` folders of a :class:`slope.finetune_loop.FinetuneLoop` run, for every front door
that trains on it (``slope.finetune``, ``slope.dynamic.sparse_finetune``).

A checkpoint holds the run's whole state in one file (``slope_finetune_state.pt``): the model's full state
dict (masks included), both optimizers, the loss scaler, the torch / NumPy / Python RNG states, the
records logged so far, the front door's own stateful objects (held masks, a dynamic-sparsity
schedule: anything with ``state_dict`` / ``load_state_dict``) and a fingerprint of the settings a
resumed run must share. It is written and fsynced in a temporary folder, then renamed (and the
folder synced), so a kill or a power loss leaves either the old checkpoint or the new one, never half
of one; a full disk is a one-line :class:`slope.durable.StorageError`.

``save_total_limit`` (``transformers.TrainingArguments``' name) keeps the newest N checkpoints: once a new
one is in place, the older ones beyond N are removed (:func:`rotate_checkpoints`).
"""
from __future__ import annotations

import io
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from slope.checkpoint import capture_rng, restore_rng
from slope.durable import fsync_dir, write_file
from slope.finetune_loop import FinetuneLoop
from slope.serialization.folders import checkpoint_step

__all__ = ["CHECKPOINT_STATE", "LoopCheckpoints", "checkpoint_step", "checkpoint_steps", "resolve_checkpoint", "rotate_checkpoints"]

CHECKPOINT_STATE = "slope_finetune_state.pt"


def checkpoint_steps(folder: Path, complete: bool = False) -> dict[int, Path]:
    """``{step: folder}`` of the ``checkpoint-<step>`` folders in ``folder`` (:func:`checkpoint_step` names;
    ``complete``: only those holding their state file)."""
    if not folder.is_dir():
        return {}
    found = {checkpoint_step(p.name): p for p in folder.glob("checkpoint-*")}
    return {step: p for step, p in found.items()
            if step is not None and (not complete or (p / CHECKPOINT_STATE).is_file())}


def resolve_checkpoint(folder: Path | None, writer: str = "slope's fine-tuning") -> Path:
    """``folder`` itself when it is a ``checkpoint-<step>`` folder, else the newest complete one inside it
    (incomplete ones, without their state file, are skipped with a ``UserWarning`` naming them); a
    ``FileNotFoundError`` naming the flag when there is none (``writer``: who writes them)."""
    if folder is not None and (folder / CHECKPOINT_STATE).is_file():
        return folder
    found = checkpoint_steps(folder) if folder is not None else {}
    if not found and folder is not None and checkpoint_step(folder.name) is not None and folder.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint (--resume-from-checkpoint): {folder} is incomplete (no {CHECKPOINT_STATE}: "
                                "its save was interrupted); resume from another checkpoint-<step> folder")
    complete = {step: path for step, path in found.items() if (path / CHECKPOINT_STATE).is_file()}
    skipped = sorted(step for step in found if step not in complete and (not complete or step > max(complete)))
    incomplete = f" (incomplete, without {CHECKPOINT_STATE}: {', '.join(f'checkpoint-{s}' for s in skipped)})" if skipped else ""
    if not complete:
        raise FileNotFoundError(f"resume_from_checkpoint (--resume-from-checkpoint): no checkpoint-<step> folder written by "
                                f"{writer} at {folder}{incomplete} (one is written every save_steps / --save-steps steps)")
    if skipped:
        warnings.warn(f"resume_from_checkpoint: resuming the newest complete checkpoint, checkpoint-{max(complete)}; skipped newer "
                      f"folders{incomplete}", UserWarning)  # (said once: both checks meet it here)
    return complete[max(complete)]


def rotate_checkpoints(folder: Path, keep: int, newest: int) -> list[Path]:
    """Remove the oldest ``checkpoint-<step>/`` folders in ``folder`` beyond the ``keep`` newest, once
    ``checkpoint-<newest>/`` (the one just written) is complete; returns the removed folders.

    ``checkpoint-<newest>/`` always stays (nothing is removed while it is incomplete or missing); the
    others rank by step (a larger step: newer). Only complete folders named exactly ``checkpoint-<step>``
    (:func:`checkpoint_step`; holding the state file) count as the run's checkpoints: anything else is left alone. Each is renamed
    aside (``.checkpoint-<step>.removing-<pid>``) before it is deleted, so an interrupted removal leaves
    no half-deleted checkpoint among them.
    """
    found = checkpoint_steps(folder, complete=True)
    if newest not in found:
        return []
    removed = []
    for step in sorted((s for s in found if s != newest), reverse=True)[keep - 1:]:
        aside = folder / f".checkpoint-{step}.removing-{os.getpid()}"
        os.rename(found[step], aside)
        shutil.rmtree(aside)
        removed.append(found[step])
    if removed:
        fsync_dir(folder)
    return removed


class LoopCheckpoints:
    """Save and resume ``loop``'s run under ``out`` (``None``: no saving).

    ``states``: ``{name: object}`` saved and restored beside the loop's own state (``None`` values
    are skipped). ``fingerprint``: plain values; a checkpoint whose ``resume_keys`` differ is refused.
    ``writer``: the front door's name for error messages. Only the ``main`` process writes.
    ``save_total_limit``: keep only the newest N ``checkpoint-<step>/`` folders (:func:`rotate_checkpoints`;
    ``None``: all).
    """

    def __init__(self, out: Path | None, loop: FinetuneLoop, states: dict[str, Any], fingerprint: dict[str, Any],
                 resume_keys: tuple[str, ...], main: bool = True, writer: str = "slope.finetune", *,
                 save_total_limit: int | None = None):
        self.out, self.loop, self.main, self.writer = out, loop, main, writer
        self.save_total_limit = save_total_limit
        self.states = {name: obj for name, obj in states.items() if obj is not None}
        self.fingerprint, self.resume_keys = fingerprint, resume_keys

    def save(self, step: int, records: list[dict]) -> None:
        """Write ``out/checkpoint-<step>/`` atomically (replacing one of the same step), then remove the
        checkpoints beyond ``save_total_limit``. Every rank calls it: an FSDP2-sharded model's state is
        gathered (collective), then the main process writes."""
        if self.out is None:
            return
        from slope.parallel import full_model_state_dict, full_optimizer_state_dict, is_fsdp2

        loop = self.loop
        sharded = is_fsdp2(loop.model)
        if not (self.main or sharded):
            return
        model_state = full_model_state_dict(loop.model, rank0_only=sharded)
        # the single-process layout: a checkpoint of N ranks resumes on any number
        dense_state = (full_optimizer_state_dict(loop.model, loop.dense_opt, index_keys=True, rank0_only=True) if sharded
                       else loop.dense_opt.state_dict())
        states = {name: obj.state_dict() for name, obj in self.states.items()}  # (gathers sharded masks)
        sparse_state = None if loop.sparse_opt is None else loop.sparse_opt.full_state_dict()  # (gathers sharded moments)
        if not self.main:
            return
        state = {"step": step, "fingerprint": self.fingerprint, "records": records, "model": model_state, "dense_opt": dense_state,
                 "sparse_opt": sparse_state,
                 "scaler": loop.scaler.state_dict(), **states, "rng": capture_rng()}  # torch (and CUDA), NumPy and Python states
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".checkpoint-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_file(tmp / CHECKPOINT_STATE, buffer.getbuffer())  # fsynced; a full disk is a StorageError
            fsync_dir(tmp)
        except BaseException:  # (a second SIGINT / SIGTERM too): no partial folder left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.out)
        if self.save_total_limit is not None:
            rotate_checkpoints(self.out, self.save_total_limit, step)

    def resolve(self, source) -> Path:
        """A ``checkpoint-<step>`` folder, or the newest one in a folder (``True``: in ``out``)."""
        return resolve_checkpoint(self.out if source is True else Path(source), self.writer)

    def load(self, source) -> tuple[int, list[dict]]:
        """Restore the run saved at ``source``; returns ``(step, records)`` to continue from."""
        path = self.resolve(source) / CHECKPOINT_STATE
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and what to do
            raise ValueError(f"resume_from_checkpoint: {path} cannot be read ({type(e).__name__}: {e}); "
                             "resume from another checkpoint-<step> folder") from e
        missing = [name for name in ("step", "fingerprint", "model", *self.states) if name not in state]
        if missing:
            raise ValueError(f"resume_from_checkpoint: {path} lacks {missing}: it was not written by {self.writer}")
        theirs = state["fingerprint"]
        diff = {k: (theirs.get(k), self.fingerprint.get(k)) for k in self.resume_keys if theirs.get(k) != self.fingerprint.get(k)}
        if diff:
            hint = ("; the global batch is per_device_train_batch_size × the number of processes, so on another number of "
                    "processes set per_device_train_batch_size to keep it") if "global_batch" in diff else ""
            raise ValueError(f"the checkpoint {path.parent} was written by a run with other settings "
                             f"({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in diff.items())}); resume with the same "
                             f"ones{hint}")
        from slope.parallel import is_fsdp2, load_full_model_state_dict, load_full_optimizer_state_dict

        loop = self.loop
        sharded = is_fsdp2(loop.model)
        if sharded:
            load_full_model_state_dict(loop.model, state["model"])
        else:
            loop.model.load_state_dict(state["model"])
        for name, obj in self.states.items():
            obj.load_state_dict(state[name])
        if sharded:
            load_full_optimizer_state_dict(loop.model, loop.dense_opt, state["dense_opt"])
        else:
            loop.dense_opt.load_state_dict(state["dense_opt"])
        if loop.sparse_opt is not None:
            loop.sparse_opt.load_state_dict(state["sparse_opt"])
        loop.scaler.load_state_dict(state["scaler"])
        restore_rng(*state["rng"])
        return int(state["step"]), list(state["records"])
