"""``apply.json``: what a :func:`slope.stages.apply` run keeps in its output folder.

::

    {"stages": [{"name": "sparsity_stage", "run_type": "oneshot", "folder": "stage_sparsity_stage",
                 "settings": {"recipe": "...", "model": "/abs/llama-dense", "num_calibration_samples": 512, ...},
                 "done": true, "seconds": 41.2, "result": {"zero_fraction": 0.5}}, ...]}

Each stage keeps the settings that decide its result (its recipe stage with defaults filled in, the
data, and its calibration or training arguments; the first stage also its source model). A stage's
model also depends on every stage before it, so a continued run keeps the stages up to the first
whose settings differ from the call's, and starts afresh from there — as long as nothing from there on
is finished (or holds a checkpoint): that is a one-line error naming the stage and the setting,
since its result would be lost. The file is replaced atomically after each change.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slope.durable import replace_file
from slope.serialization.folders import OutputDirError, check_new_output_dir
from slope.serialization.jsonfile import read_json_object

__all__ = ["RECORD_NAME", "StageRecord", "stage_finished", "stage_folder_name"]

RECORD_NAME = "apply.json"


def stage_folder_name(stage: str) -> str:
    """The folder of a stage inside the run's output folder (llm-compressor's ``stage_<name>``)."""
    return f"stage_{stage}"


def stage_finished(folder: Path, run_type: str) -> bool:
    """Whether ``folder`` holds a finished stage: a oneshot folder appears whole (renamed into
    place); a train stage writes ``summary.json`` after its model."""
    return folder.is_dir() and (run_type == "oneshot" or (folder / "summary.json").is_file())


def _has_checkpoint(folder: Path) -> bool:
    from slope.finetune_checkpoints import checkpoint_steps

    return bool(checkpoint_steps(folder, complete=True))


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), to compare settings with a record."""
    return json.loads(json.dumps(value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first differing settings, as ``key: old there, new now`` (the recipe as "its modifiers")."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = ["recipe: its modifiers differ" if k == "recipe" else f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now"
             for k in keys[:3]]
    return "; ".join(shown) + ("; ..." if len(keys) > 3 else "")


class StageRecord:
    """The ``apply.json`` of one run: per stage in order, its settings and whether it is done."""

    def __init__(self, out: Path, data: dict[str, Any]):
        self.out = out
        self.path = out / RECORD_NAME
        self.data = data

    @classmethod
    def open(cls, out: Path, planned: list[dict[str, Any]]) -> "StageRecord":
        """The record of the run in ``out`` for the ``planned`` stages (``{"name", "run_type",
        "settings"}`` in order): the one there, with the stages after the first that differs started
        afresh (module docstring), or a new one (``out`` must then be new or empty). Main process
        only; it creates ``out``."""
        fresh = [{"name": p["name"], "run_type": p["run_type"], "folder": stage_folder_name(p["name"]),
                  "settings": _plain(p["settings"]), "done": False, "seconds": None, "result": None} for p in planned]
        if not (out / RECORD_NAME).is_file():
            check_new_output_dir(out, advice="choose a new folder, or one that an earlier apply run wrote")
            out.mkdir(parents=True, exist_ok=True)
            record = cls(out, {"stages": fresh})
            record.write()
            return record
        data = read_json_object(out / RECORD_NAME, lambda why: OutputDirError(
            f"{out / RECORD_NAME} is corrupt ({why}); remove the folder {out} (its finished stages are lost) or choose a new one"))
        old = data.get("stages")
        if not isinstance(old, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in old):
            raise OutputDirError(f"{out / RECORD_NAME} is not an apply record (no stages); choose a new folder")
        record = cls(out, data)
        keep = record._kept(fresh)
        record._drop(keep, fresh)
        record.data["stages"] = old[:keep] + fresh[keep:]
        record.write()
        return record

    def _kept(self, fresh: list[dict[str, Any]]) -> int:
        """How many of the recorded stages stay: those before the first that differs from ``fresh``."""
        old = self.data["stages"]
        for k, new in enumerate(fresh):
            if k >= len(old) or (old[k].get("name"), old[k].get("run_type"), old[k].get("settings")) != (
                    new["name"], new["run_type"], new["settings"]):
                return k
        return len(fresh)

    def _drop(self, keep: int, fresh: list[dict[str, Any]]) -> None:
        """Remove what the stages from ``keep`` on left (unfinished, without checkpoints); a finished
        one, or one holding a checkpoint, is an ``OutputDirError`` (its work would be lost)."""
        for k, old in enumerate(self.data["stages"][keep:], start=keep):
            folder = self.out / stage_folder_name(old["name"])
            finished = stage_finished(folder, old.get("run_type"))  # (recorded done, its folder gone: nothing to lose)
            if finished or _has_checkpoint(folder):
                what = "finished" if finished else "holds a checkpoint of"
                if k >= len(fresh):
                    why = "the recipe no longer holds it"
                elif old["name"] != fresh[k]["name"] or old.get("run_type") != fresh[k]["run_type"]:
                    why = f"the recipe's stage {k + 1} is now {fresh[k]['name']} ({fresh[k]['run_type']})"
                elif k > keep:
                    why = f"stage {self.data['stages'][keep]['name']} before it changed"
                else:
                    why = f"its settings changed ({_difference(old.get('settings') or {}, fresh[k]['settings'])})"
                raise OutputDirError(f"output_dir {str(self.out)!r} {what} stage {old['name']}, but {why}; continue the run "
                                     "with its settings, or choose a new folder")
        for old in self.data["stages"][keep:]:
            shutil.rmtree(self.out / stage_folder_name(old["name"]), ignore_errors=True)

    def write(self) -> None:
        replace_file(self.path, (json.dumps(self.data, indent=1) + "\n").encode("utf-8"))

    def entry(self, name: str) -> dict[str, Any]:
        return next(s for s in self.data["stages"] if s["name"] == name)

    def done(self, name: str) -> bool:
        """Whether stage ``name`` is recorded done and its folder still holds it."""
        entry = self.entry(name)
        return bool(entry["done"]) and stage_finished(self.out / entry["folder"], entry["run_type"])

    def finish(self, name: str, seconds: float | None, result: dict[str, Any]) -> None:
        """Mark stage ``name`` done (``seconds``: how long it ran; ``None`` when found finished) and write."""
        self.entry(name).update(done=True, seconds=None if seconds is None else round(seconds, 3), result=_plain(result))
        self.write()
