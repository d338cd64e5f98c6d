"""``slope eval`` / ``slope generate`` on a peft LoRA adapter folder: what ``save_pretrained`` of a
:func:`slope.peft.get_peft_model` model writes (``adapter_config.json`` and the adapter weights, no
``config.json``), run on its base model folder (:mod:`slope.inference.folder`).

The base: ``adapter_config.json``'s ``base_model_name_or_path`` when that is a local model folder,
or the one given (``slope eval --base``: it overrides the record, e.g. when the base moved).
Nothing is downloaded: a hub name, a missing folder or no record is a one-line error that says to
pass ``--base``.

Forms: ``unmerged`` (the default when the base is a pruned model's folder) is the base's sparse
model as saved (:func:`slope.from_pretrained`) with the adapters loaded by
:func:`slope.peft.load_peft_model`; ``dense`` is the base's dense form (what plain transformers
loads, ``W⊙M``) with the adapters loaded by plain peft and merged (``merge_and_unload``), the same
function. peft adapters have no merged sparse form (``W⊙M + s·BA`` is dense), so ``merged`` is
refused; on a plain (dense) base, or on a merged export (whose layers take no adapters), only
``dense`` runs. The validation data and settings are the base folder's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from slope.serialization.jsonfile import read_json_object

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE_FOLDERS", "adapter_base", "adapter_modes", "adapter_subfolders",
           "is_adapter_folder", "mode_refusal", "with_adapters"]

#: peft's adapter config file (``peft.utils.CONFIG_NAME``).
ADAPTER_CONFIG = "adapter_config.json"

#: peft's adapter weight files (``peft.utils.SAFETENSORS_WEIGHTS_NAME``, ``WEIGHTS_NAME``): without one, peft
#: would look the folder's name up on the hub.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: Folder kinds (:func:`slope.serialization.folders.folder_kind`) an adapter folder's base may be.
BASE_FOLDERS = ("hf", "slope-export-dense", "slope-pretrained", "slope-pretrained-v1")

#: What to do about a base that cannot be used.
BASE_ADVICE = "pass --base the model folder the adapters were trained on (slope downloads no models)"


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a peft adapter folder (``adapter_config.json``, no ``config.json``:
    :func:`slope.serialization.folders.folder_kind` ``"peft-adapter"``)."""
    from slope.serialization.folders import folder_kind

    return folder_kind(folder) == "peft-adapter"


def adapter_subfolders(folder: str | os.PathLike) -> list[str]:
    """The subfolders of ``folder`` that are adapter folders (peft's ``save_pretrained`` writes an
    adapter named other than ``"default"`` in a subfolder of its name), sorted."""
    root = Path(folder)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_adapter_folder(p)) if root.is_dir() else []


def adapter_base(folder: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The base model folder of the LoRA adapter folder ``folder``: ``base`` if given, else its
    ``adapter_config.json``'s ``base_model_name_or_path``. A one-line
    :class:`slope.config.ConfigError` for an unreadable config, another peft type, a base that is
    not a local model folder, or no adapter weights (:data:`ADAPTER_WEIGHTS`)."""
    from slope.config import ConfigError
    from slope.serialization.folders import describe_folder, folder_kind

    path = Path(folder) / ADAPTER_CONFIG
    config = read_json_object(path, lambda why: ConfigError(f"{path} is corrupt ({why}); save the adapters again"))
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{folder} holds a peft {config.get('peft_type')} adapter; slope eval / generate run LoRA adapters "
                          "(peft_type LORA) only: load others with their own library")
    recorded = config.get("base_model_name_or_path")
    if base is None and not recorded:
        raise ConfigError(f"{path} names no base model (base_model_name_or_path); {BASE_ADVICE}")
    where = "--base" if base is not None else f"base_model_name_or_path in {path}"
    root = Path(base if base is not None else recorded).expanduser()
    if not root.is_dir():
        raise ConfigError(f"the adapters' base {os.fspath(root)} ({where}) is not a local folder; {BASE_ADVICE}")
    kind = folder_kind(root)
    if kind not in BASE_FOLDERS:
        raise ConfigError(f"the adapters' base ({where}): {describe_folder(root, kind)}; {BASE_ADVICE}")
    if not any((Path(folder) / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ConfigError(f"{folder} has no adapter weights ({ADAPTER_WEIGHTS[0]}); save the adapters again (the peft "
                          f"model's save_pretrained writes it beside {ADAPTER_CONFIG})")
    return root


def adapter_modes(base_modes: tuple[str, ...]) -> tuple[str, ...]:
    """The forms adapters run in on a base folder with forms ``base_modes``
    (:func:`slope.inference.folder.folder_modes`): ``unmerged`` where the base has it, and ``dense``."""
    return ("unmerged", "dense") if "unmerged" in base_modes else ("dense",)


def mode_refusal(folder: str | os.PathLike, base: Path, mode: str, base_modes: tuple[str, ...]) -> str:
    """Why the adapter folder ``folder`` on ``base`` (forms ``base_modes``) does not run in ``mode``
    (for :func:`slope.inference.folder.check_mode`'s one-line error)."""
    if mode == "merged":
        return (f"{folder} holds peft LoRA adapters, which have no merged sparse form (merged into the 2:4 weights they "
                "would make them dense)")
    why = ("is a plain model folder: the adapters run on its dense form" if base_modes == ("dense",)
           else "holds slope's merged inference form, which takes no adapters")
    return f"the base {base} of the adapters in {folder} {why}"


def with_adapters(model: nn.Module, folder: str | os.PathLike, base: Path, mode: str) -> nn.Module:
    """``model`` (``base``'s in ``mode``) with the LoRA adapters of ``folder``: ``unmerged``:
    :func:`slope.peft.load_peft_model`; ``dense``: ``peft.PeftModel.from_pretrained`` and
    ``merge_and_unload``. Adapters that do not fit the model, or whose config holds a value of the
    wrong type, are a one-line :class:`slope.config.ConfigError`."""
    from slope.config import ConfigError

    try:
        from peft import PeftModel
    except ImportError as e:
        raise ConfigError(f"{folder} holds peft adapters, and peft is not installed: pip install 'slope[peft]'") from e
    try:
        if mode == "unmerged":
            from slope.peft import load_peft_model

            return load_peft_model(model, folder)
        return PeftModel.from_pretrained(model, os.fspath(folder)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, OSError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = " ".join(lines[:2]) + (" ..." if len(lines) > 2 else "")  # (a state_dict error: its first mismatch)
        if isinstance(e, TypeError):  # (peft uses the config's values as they are: r "4" fails in its layers)
            raise ConfigError(f"the adapters in {folder} cannot be loaded ({reason}): {Path(folder) / ADAPTER_CONFIG} holds a "
                              "value of the wrong type; save the adapters again") from e
        raise ConfigError(f"the adapters in {folder} do not fit the model in {base} ({reason}); {BASE_ADVICE}") from e
