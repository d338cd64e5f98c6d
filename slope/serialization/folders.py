"""What kind of model folder a path is, and what to do with it (for error messages that give the right advice).

Kinds (:func:`folder_kind`):

- ``"slope-train"``: a ``slope train`` checkpoint (``manifest.json``), or a run directory holding one as ``checkpoint/``;
- ``"slope-pretrained"``: a Hugging Face folder of a pruned model (``slope_config`` in ``config.json``),
  written by ``model.save_pretrained`` / the ``Trainer`` / :func:`slope.save_pretrained` / ``slope export --form sparse|merged``;
- ``"slope-pretrained-v1"``: the older slope format (``slope_config.json`` beside the weights);
- ``"slope-export-dense"``: ``slope export --form dense`` (``slope_export`` in ``config.json``, no sparse layers);
- ``"hf-pruned"``: weights with SLoPe layers' entries (``values`` / ``mask_bits``) but no record: a pruned
  model saved by a path that bypassed slope's ``save_pretrained`` (or by a slope older than the record);
- ``"slope-finetune-checkpoint"``: a ``checkpoint-<step>`` folder of ``slope finetune`` / ``sparse-finetune``;
- ``"slope-train-damaged"``: a ``slope train`` checkpoint folder that lost its ``manifest.json``;
- ``"slope-apply"``: the run folder of ``slope apply`` (``apply.json``; its models are in ``stage_<name>/``);
- ``"peft-adapter"``: a peft adapter folder (``adapter_config.json``, no ``config.json``): adapters whose base model is elsewhere;
- ``"checkpoints-only"``: no model of its own, but ``checkpoint-<step>/`` model folders inside (a Trainer's ``output_dir``);
- ``"hf"``: a plain Hugging Face folder; ``"missing"``; ``"unknown"``.

:func:`check_new_output_dir` is the one check of every command that writes a folder (``slope oneshot``,
``slope finetune``, ``slope sparse-finetune``, ``slope export``): the folder must be new or empty,
so that no run's files end up beside another's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from slope.serialization.jsonfile import read_json_object

__all__ = ["OutputDirError", "check_new_output_dir", "checkpoint_step", "folder_kind", "describe_folder", "weight_keys"]

_CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)")  # (re's [0-9]: ASCII digits only)

_DESCRIPTIONS = {
    "slope-train": (
        "a `slope train` checkpoint: evaluate it with `slope eval --checkpoint {path}`, or write a Hugging Face folder "
        "with `slope export {path} --output-dir OUT --form sparse` (OUT then loads with slope.from_pretrained; the default "
        "--form dense loads with transformers.AutoModelForCausalLM)"
    ),
    "slope-pretrained": (
        "a Hugging Face folder of a pruned model (slope_config in config.json): load it with "
        "slope.from_pretrained({path!r}) for the sparse model, or transformers.AutoModelForCausalLM.from_pretrained "
        "for the dense-equivalent one"
    ),
    "slope-pretrained-v1": "a slope.save_pretrained folder (slope_config.json): load it with slope.from_pretrained({path!r})",
    "slope-export-dense": (
        "a dense `slope export` folder (W⊙M in ordinary layers, no masks): load it with "
        "transformers.AutoModelForCausalLM.from_pretrained({path!r}); for the sparse model, export with --form sparse"
    ),
    "hf-pruned": (
        "a pruned model saved without slope's record (no slope_config in config.json: an older slope, or a save "
        "that bypassed the pruned model's save_pretrained). Build the model from its config, prune it with the same "
        "slope.prune_model arguments, load_state_dict the weights, and re-save it with model.save_pretrained"
    ),
    "hf": (
        "a plain Hugging Face folder without slope layers (what slope oneshot, finetune and sparse-finetune write: "
        "pruned entries are exact zeros): evaluate it with `slope eval --checkpoint {path}`, load it with "
        "transformers.AutoModelForCausalLM.from_pretrained({path!r}); for SLoPe layers, prune it with slope.prune_model"
    ),
    "slope-finetune-checkpoint": (
        "a checkpoint-<step> folder of slope finetune / sparse-finetune (the whole training state, not a model folder): "
        "continue its run with --resume-from-checkpoint {path}; the run writes its model to the output folder when it ends"
    ),
    "slope-train-damaged": (
        "a `slope train` checkpoint without its manifest.json (damaged, or its save was cut short): use an older copy kept "
        "beside it (checkpoint-stepN/, written with --keep-checkpoints K), or delete it and retrain"
    ),
    "slope-apply": (
        "the run folder of `slope apply` (apply.json), not a model folder: each stage's model is in its stage_<name>/ "
        "folder, the final model in the last stage's (apply.json lists them); pass that folder"
    ),
    "peft-adapter": (
        "a peft adapter folder (adapter_config.json; its base model is another folder): run LoRA adapters with `slope eval "
        "--checkpoint {path}` (on the base that adapter_config.json names, or --base), load them onto their base with "
        "slope.peft.load_peft_model(base_model, {path!r})"
    ),
    "checkpoints-only": (
        "a training output folder without a model of its own (a transformers Trainer's output_dir, or a run that has not "
        "finished): its models are the checkpoint-<step>/ folders inside it; pass one (the newest has the largest step)"
    ),
    "missing": "missing",
    "unknown": "not a model folder slope knows (no config.json, slope_config.json or manifest.json)",
}


def checkpoint_step(name: str) -> int | None:
    """The step of a folder named exactly ``checkpoint-<step>`` (ASCII digits, no leading zero: ``checkpoint-0``,
    ``checkpoint-12``), else ``None`` (``checkpoint-002``, ``checkpoint-²``, ``checkpoint-3.bak`` are not checkpoints).
    The one rule for the name, whoever wrote the folder (a transformers ``Trainer``, ``slope finetune``)."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def weight_keys(directory: str | os.PathLike) -> list[str]:
    """Tensor names of the safetensors weights in ``directory`` (one file or an index; headers only)."""
    from safetensors import safe_open

    directory = Path(directory)
    index = read_json_object(directory / "model.safetensors.index.json")
    if index is not None and isinstance(index.get("weight_map"), dict):
        return sorted(index["weight_map"])
    try:
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return sorted(f.keys())
    except Exception:  # noqa: BLE001 (missing or corrupt: the caller reports that when it loads)
        return []


def folder_kind(path: str | os.PathLike) -> str:
    """The kind of model folder ``path`` is (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if (path / "manifest.json").is_file() or (path / "checkpoint" / "manifest.json").is_file():
        return "slope-train"
    if (path / "slope_finetune_state.pt").is_file():  # slope.finetune_checkpoints.CHECKPOINT_STATE
        return "slope-finetune-checkpoint"
    if (path / "trainer_state.json").is_file() and (path / "optimizers.pt").is_file():  # slope.checkpoint.FILES
        return "slope-train-damaged"
    if (path / "apply.json").is_file() and not (path / "config.json").is_file():  # slope.stages.record.RECORD_NAME
        return "slope-apply"
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():  # (peft.utils.CONFIG_NAME)
        return "peft-adapter"
    config = read_json_object(path / "config.json")
    if config is not None and "slope_config" in config:
        return "slope-pretrained"
    if (path / "slope_config.json").is_file():
        return "slope-pretrained-v1"
    if config is None:
        checkpoints = [p for p in path.glob("checkpoint-*") if checkpoint_step(p.name) is not None and (p / "config.json").is_file()]
        return "checkpoints-only" if checkpoints else "unknown"
    if isinstance(config.get("slope_export"), dict):
        return "slope-export-dense"
    if any(key.endswith((".values", ".mask_bits")) for key in weight_keys(path)):
        return "hf-pruned"
    return "hf"


def describe_folder(path: str | os.PathLike, kind: str | None = None) -> str:
    """``"<path> is <what it is and how to load it>"`` for error messages."""
    kind = folder_kind(path) if kind is None else kind
    return f"{os.fspath(path)} is " + _DESCRIPTIONS[kind].format(path=os.fspath(path))


class OutputDirError(FileExistsError, ValueError):
    """An output folder that already holds files (an ``OSError`` and a ``ValueError``: callers that
    catch either for one-line errors report it)."""


def check_new_output_dir(path: str | os.PathLike, name: str = "output_dir", advice: str | None = None) -> Path:
    """``path`` as a ``Path`` if nothing is there (and no file stands where a parent folder would be made)
    or it is an empty folder; else an :class:`OutputDirError` (one line: ``advice``, or "choose a new
    folder or remove it"). Call it before any work."""
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "exists and is not an empty folder" if path.is_dir() else "exists and is a file"
        raise OutputDirError(f"{name} {os.fspath(path)!r} {what}; {advice or 'choose a new folder or remove it'}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)  # the folder it would be made in
    if parent is not None and not parent.is_dir():
        raise OutputDirError(f"{name} {os.fspath(path)!r} cannot be made: {os.fspath(parent)} is a file, not a folder; "
                             "choose a folder elsewhere")
    return path
