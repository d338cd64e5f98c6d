"""``apply.json``: what a :func:`slope.stages.apply` run keeps in its output folder.

::

    {"settings": {"recipe": "...", "model": "llama-dense", "learning_rate": 5e-05, ...},
     "stages": [{"name": "sparsity_stage", "run_type": "oneshot", "folder": "stage_sparsity_stage",
                 "done": true, "seconds": 41.2, "result": {"zero_fraction": 0.5}}, ...]}

The settings are those that decide the stages' results (recipe with defaults filled in, source
model, data, teacher, calibration and training arguments). ``apply`` on a folder holding a record
continues that run when its settings are the same, and refuses other settings in one line that names
what differs; finished stages (``done``) are kept. The file is replaced atomically after each stage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slope.durable import replace_file
from slope.serialization.folders import OutputDirError, check_new_output_dir
from slope.serialization.jsonfile import read_json_object

__all__ = ["RECORD_NAME", "StageRecord", "stage_folder_name"]

RECORD_NAME = "apply.json"


def stage_folder_name(stage: str) -> str:
    """The folder of a stage inside the run's output folder (llm-compressor's ``stage_<name>``)."""
    return f"stage_{stage}"


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), to compare settings with a record."""
    return json.loads(json.dumps(value))


class StageRecord:
    """The ``apply.json`` of one run: its settings and, per stage in order, whether it is done."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def open(cls, out: Path, settings: dict[str, Any], stages: list[tuple[str, str]]) -> "StageRecord":
        """The record in ``out`` (``stages``: ``(name, run_type)`` in the recipe's order): the one there
        when its settings equal ``settings``, else a new one (``out`` must then be new or empty).
        Main process only; it creates ``out``."""
        path = out / RECORD_NAME
        settings = _plain(settings)
        if path.is_file():
            data = read_json_object(path, lambda why: OutputDirError(
                f"{path} is corrupt ({why}); remove the folder {out} (its finished stages are lost) or choose a new one"))
            return cls(path, data)._checked(settings, stages)
        check_new_output_dir(out, advice="choose a new folder, or one that an earlier apply run with these settings wrote")
        data = {"settings": settings,
                "stages": [{"name": name, "run_type": run_type, "folder": stage_folder_name(name), "done": False,
                            "seconds": None, "result": None} for name, run_type in stages]}
        out.mkdir(parents=True, exist_ok=True)
        record = cls(path, data)
        record.write()
        return record

    def _checked(self, settings: dict[str, Any], stages: list[tuple[str, str]]) -> "StageRecord":
        old = self.data.get("settings")
        if not isinstance(old, dict) or not isinstance(self.data.get("stages"), list):
            raise OutputDirError(f"{self.path} is not an apply record (no settings or stages); choose a new folder")
        differ = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if differ:
            shown = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(settings.get(k))} now" for k in differ[:3])
            raise OutputDirError(f"output_dir {str(self.path.parent)!r} holds an apply run with other settings ({shown}"
                                 f"{'; ...' if len(differ) > 3 else ''}); continue it with its settings, or choose a new folder")
        if [(s.get("name"), s.get("run_type")) for s in self.data["stages"]] != [tuple(s) for s in stages]:
            raise OutputDirError(f"{self.path} lists other stages than the recipe's; choose a new folder")
        return self

    def write(self) -> None:
        replace_file(self.path, (json.dumps(self.data, indent=1) + "\n").encode("utf-8"))

    def entry(self, name: str) -> dict[str, Any]:
        return next(s for s in self.data["stages"] if s["name"] == name)

    def done(self, name: str) -> bool:
        return bool(self.entry(name)["done"])

    def finish(self, name: str, seconds: float | None, result: dict[str, Any]) -> None:
        """Mark stage ``name`` done (``seconds``: how long it ran; ``None`` when found finished) and write."""
        self.entry(name).update(done=True, seconds=None if seconds is None else round(seconds, 3), result=_plain(result))
        self.write()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
