"""Checkpoints of ``slope train``: the model a config describes, and its exact training state.

A checkpoint is a directory::

    model.safetensors   model.state_dict(): dense weights, SLoPe values / mask_bits / mask_t_bits,
                        lora_A / lora_B / lora_A_mask once the adapters are attached
    optimizers.pt       {"dense": AdamW state_dict, "sparse": ADAMWSparse state_dict or None}
    rng.pt              torch (CPU and CUDA) and numpy RNG states
    trainer_state.json  step, tokens, elapsed time, scaler, scheduler, data position, python RNG,
                        the model's transformers config (``model_config``)
    config.json         the TrainConfig
    tokenizer/          the run's ``--tokenizer`` as a Hugging Face folder (only with one)
    manifest.json       format version, step, and the sha256 of every file above

Every file is written and ``fsync``-ed inside a temporary directory, the manifest last, and only
then published under its name (:mod:`slope.checkpoint_store`: a kill or a power loss at any
instant keeps a complete checkpoint, and :func:`~slope.checkpoint_store.latest_checkpoint` finds the
newest). Loading verifies the manifest and every checksum first: a corrupt, incomplete or foreign
directory is a :class:`CheckpointError` that says what is wrong. The manifest's ``serial`` orders
the checkpoints of one folder (one more than any before it).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from slope.config import PATH_KEYS, STRUCTURAL_KEYS, TrainConfig
from slope.filestamp import sha256_file
from slope.serialization.jsonfile import read_json_object

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "attach_lora",
    "build_model",
    "capture_rng",
    "check_compatible",
    "check_model_config",
    "check_state_fits",
    "load_model_state",
    "read_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "saved_config",
    "verify_checkpoint",
]

FORMAT = "slope-train-checkpoint"
VERSION = 1
FILES = ("model.safetensors", "optimizers.pt", "rng.pt", "trainer_state.json", "config.json")


class CheckpointError(RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message says which and what to do."""


# ---------------------------------------------------------------------- the model of a config
def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int, *, lora: bool = False, dense_tail: bool = False,
                model_config: dict | None = None) -> nn.Module:
    """A randomly initialised causal LM of ``cfg``'s architecture (:mod:`slope.model_config`: a Llama
    of ``cfg``'s sizes unless ``cfg.model_config`` names another; fp32, on the CPU), pruned to
    ``cfg.sparsity`` (``cfg.mask_type`` masks, ``cfg.double_pruning``) unless ``cfg.dense``, with
    rank-``cfg.lora_rank`` adapters if ``lora``, and densified (:func:`slope.prune.densify`, the
    final dense phase) if ``dense_tail``. ``model_config``: a checkpoint's stored ``config.to_dict()``,
    built instead of what ``cfg`` names. Initialisation draws from torch's global RNG (seed it first)."""
    from slope.model_config import build_causal_lm, causal_lm_config, config_from_dict
    from slope.prune import densify, prune_model

    config = config_from_dict(model_config) if model_config else causal_lm_config(cfg, vocab_size, eos_id)
    model = build_causal_lm(config)
    if not cfg.dense:
        prune_model(model, compress=cfg.compress, sparsity=cfg.sparsity, backend=cfg.backend, verbose=False,
                    mask_type=cfg.mask_type, double_pruning=cfg.double_pruning)
        if lora:
            attach_lora(model, cfg.lora_rank)
        if dense_tail:
            densify(model)
    return model


def attach_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    """Attach rank-``rank`` adapters to every SLoPe layer (DESIGN §5); returns the new parameters
    (``lora_A``, ``lora_B`` of each layer, in module order). ``lora_A`` draws from torch's RNG."""
    from slope.registry import sparse_modules

    params = []
    for _, layer in sparse_modules(model):
        layer.add_lora(rank)
        params += [layer.lora_A, layer.lora_B]
    return params


# ---------------------------------------------------------------------- RNG states
def capture_rng() -> tuple[dict, dict]:
    """``(tensors, json_able)``: torch/numpy states as tensors, python's as a list."""
    np_state = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    version, internal, gauss = random.getstate()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def restore_rng(tensors: dict, plain: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    name, pos, has_gauss, gauss = plain["numpy_rest"]
    np.random.set_state((name, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------- save / load
def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1).encode("utf-8")


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


#: ``model.safetensors`` metadata: ``{name: name it shares its tensor with}`` (tied weights, stored once).
ALIASES_KEY = "slope_tied_aliases"


def _untied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state without the second name of a tensor stored under two, {second name: first})``:
    safetensors stores a tensor once (tied input / output embeddings: GPT-2, Qwen2-0.5B, ...)."""
    out, aliases, first = {}, {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        out[name] = tensor.contiguous()
    return out, aliases


def _load_model_state(path: Path, device: str) -> dict[str, torch.Tensor]:
    """``model.safetensors`` with the names of tied weights restored (sharing their tensor)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path), device=device)
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
    for name, source in aliases.items():
        state[name] = state[source]
    return state


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    dense_opt: torch.optim.Optimizer,
    sparse_opt: torch.optim.Optimizer | None,
    trainer_state: dict,
    config: TrainConfig,
    model_state: dict | None = None,
    dense_state: dict | None = None,
    sparse_state: dict | None = None,
    keep: int = 1,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write the checkpoint of ``trainer_state["step"]`` to ``directory``, crash-safely replacing
    the one there (:func:`slope.checkpoint_store.publish`; ``keep``: how many complete checkpoints
    the folder keeps, this one included). A full disk is a :class:`slope.durable.StorageError`
    and leaves the previous checkpoint as it was, with no partial files.

    ``model_state`` / ``dense_state`` / ``sparse_state`` replace ``model.state_dict()`` /
    ``dense_opt.state_dict()`` / ``sparse_opt.state_dict()`` when the live objects are sharded
    (DeepSpeed ZeRO: ``slope.parallel.full_*_state_dict``; ``sparse_opt.full_state_dict()``).
    ``extra_files``: more files (relative name, e.g. ``tokenizer/tokenizer.json`` → bytes), written
    and checksummed like the others.
    """
    from safetensors.torch import save as safetensors_bytes

    from slope.checkpoint_store import publish
    from slope.durable import fsync_dir, write_file

    rng_tensors, rng_plain = capture_rng()
    state, aliases = _untied(model.state_dict() if model_state is None else model_state)
    dense = dense_opt.state_dict() if dense_state is None else dense_state
    sparse = sparse_opt.state_dict() if sparse_state is None and sparse_opt is not None else sparse_state
    files = {
        "model.safetensors": lambda: safetensors_bytes(state, metadata={ALIASES_KEY: json.dumps(aliases)} if aliases else None),
        "optimizers.pt": lambda: _torch_bytes({"dense": dense, "sparse": sparse}),
        "rng.pt": lambda: _torch_bytes(rng_tensors),
        "trainer_state.json": lambda: _json_bytes({**trainer_state, "rng": rng_plain}),
        "config.json": lambda: _json_bytes(config.to_dict()),
    }

    extra = dict(extra_files or {})

    def write(tmp: Path, serial: int) -> None:
        digests = {}
        for name in FILES:  # one file in memory at a time, hashed while it is there
            data = files[name]()
            write_file(tmp / name, data)
            digests[name] = hashlib.sha256(data).hexdigest()
        for folder in sorted({(tmp / name).parent for name in extra}):
            folder.mkdir(parents=True, exist_ok=True)
        for name, data in extra.items():
            write_file(tmp / name, data)
            digests[name] = hashlib.sha256(data).hexdigest()
        for folder in sorted({(tmp / name).parent for name in extra} - {tmp}):
            fsync_dir(folder)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": trainer_state["step"],
            "serial": serial,
            "sha256": digests,
        }
        write_file(tmp / "manifest.json", _json_bytes(manifest))  # last: its presence marks a complete write

    return publish(Path(directory), write, keep)


@dataclass
class Checkpoint:
    """A verified checkpoint read into memory."""

    path: Path
    config: TrainConfig
    model_state: dict
    optimizers: dict
    rng_tensors: dict
    trainer_state: dict

    @property
    def step(self) -> int:
        return self.trainer_state["step"]

    @property
    def lora_attached(self) -> bool:
        return self.trainer_state["lora_attached"]

    @property
    def model_config(self) -> dict | None:
        """The model's transformers config (``config.to_dict()``; ``None`` in checkpoints before it was stored)."""
        return self.trainer_state.get("model_config")

    @property
    def tokenizer(self) -> str:
        """The run's tokenizer for :func:`slope.data.open_tokenizer`: the checkpoint's own copy
        (``tokenizer/``) of a ``--tokenizer`` run, ``""`` (the shipped BPE) otherwise."""
        copy = self.path / "tokenizer"
        return str(copy) if self.config.tokenizer and copy.is_dir() else self.config.tokenizer

    @property
    def dense_tail(self) -> bool:
        """Whether the SLoPe layers were already densified (``--dense-tail-fraction``)."""
        return self.trainer_state.get("dense_tail", False)


#: Files that only resuming training needs: evaluation, generation and export load without them.
TRAINING_ONLY = ("optimizers.pt", "rng.pt")


def damage_advice(directory: Path) -> str:
    """What to do about a damaged checkpoint ``directory``: use an older copy kept beside it
    (``--keep-checkpoints``), else delete it and retrain."""
    from slope.checkpoint_store import kept_checkpoints

    base = directory.name.split("-step")[0]
    older = [p.name for p in kept_checkpoints(directory.parent / base) if p != directory]
    if not older:
        return "delete the checkpoint and retrain"
    return (f"older checkpoints are kept beside it ({', '.join(older[-3:])}): move {directory.name} aside and "
            "--resume continues from the newest of them (slope eval / export: pass one to --checkpoint)")


def verify_checkpoint(directory: str | Path, optional: tuple[str, ...] = ()) -> dict:
    """Check that ``directory`` holds a complete slope checkpoint (manifest, format, every file and
    its sha256); returns the manifest or raises :class:`CheckpointError` saying what is wrong.
    A file already hashed in this process and unchanged since is not read again
    (:func:`slope.filestamp.sha256_file`): finding, recovering and reading a checkpoint hash it once.
    Files named in ``optional`` may be missing (e.g. :data:`TRAINING_ONLY` for inference); present,
    they are checked like the others."""
    directory = Path(directory)
    manifest_file = directory / "manifest.json"
    if not directory.is_dir():
        from slope.checkpoint_store import checkpoints_beside

        raise CheckpointError(f"no checkpoint at {directory}{checkpoints_beside(directory)}; train without --resume first (or "
                              "point --out at the run's directory)")
    if not manifest_file.is_file():
        from slope.serialization.folders import describe_folder, folder_kind

        kind = folder_kind(directory)
        if kind in ("unknown", "missing"):
            raise CheckpointError(f"{directory} is not a slope checkpoint (no manifest.json); it is incomplete or from another tool")
        raise CheckpointError(f"{describe_folder(directory, kind)} (it is not a slope checkpoint: no manifest.json)")
    manifest = read_json_object(manifest_file, lambda why: CheckpointError(
        f"{manifest_file} is corrupt ({why}); {damage_advice(directory)}"))
    if not isinstance(manifest.get("sha256"), dict):
        raise CheckpointError(f"{manifest_file} is corrupt (expected a JSON object with a 'sha256' table); {damage_advice(directory)}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {manifest.get('format')!r} v{manifest.get('version')} is not "
            f"{FORMAT!r} v{VERSION}; it was written by another version of slope"
        )
    for name in (*FILES, *(n for n in manifest["sha256"] if n not in FILES)):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{manifest_file} is corrupt (it names the file {name!r} outside the checkpoint); {damage_advice(directory)}")
        if not path.is_file():
            if name in optional:
                continue
            needed = " (resuming training needs it; evaluation and export do not)" if name in TRAINING_ONLY else ""
            raise CheckpointError(f"{directory}: {name} is missing; the checkpoint is incomplete{needed}")
        if sha256_file(path) != manifest["sha256"].get(name):  # hashed once per file state
            raise CheckpointError(f"{directory}: {name} is corrupt (sha256 does not match the manifest); {damage_advice(directory)}")
    return manifest


def read_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu", training: bool = True) -> Checkpoint:
    """Read and verify the checkpoint in ``directory`` (see the module docstring). With
    ``training=False`` (evaluation, generation, export) the :data:`TRAINING_ONLY` files may be
    missing: ``optimizers`` / ``rng_tensors`` are then empty."""
    directory = Path(directory)
    verify_checkpoint(directory, optional=() if training else TRAINING_ONLY)

    def load_optional(name: str, location) -> dict:
        return torch.load(directory / name, map_location=location, weights_only=True) if (directory / name).is_file() else {}

    try:
        config = TrainConfig(**read_json_object(directory / "config.json", ValueError))
        model_state = _load_model_state(directory / "model.safetensors", str(map_location))
        optimizers = load_optional("optimizers.pt", map_location)
        rng_tensors = load_optional("rng.pt", "cpu")
        trainer_state = read_json_object(directory / "trainer_state.json", ValueError)
    except Exception as e:  # noqa: BLE001 (checksums matched, so this is a foreign or buggy writer)
        raise CheckpointError(f"{directory}: cannot read the checkpoint ({type(e).__name__}: {e})") from e
    return Checkpoint(directory, config, model_state, optimizers, rng_tensors, trainer_state)


def saved_config(directory: str | Path) -> TrainConfig:
    """The TrainConfig stored in the checkpoint ``directory`` (full verification: :func:`read_checkpoint`)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        if Path(directory).is_dir() and any(Path(directory).iterdir()):
            raise CheckpointError(f"{path} is missing; {damage_advice(Path(directory))}")
        raise CheckpointError(f"no checkpoint at {directory}; train without --resume first (or point --out at the run's directory)")
    def corrupt(why) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt or from another version of slope ({why}); {damage_advice(Path(directory))}")

    try:
        return TrainConfig(**read_json_object(path, corrupt))
    except TypeError as e:  # keys of another version
        raise corrupt(e) from e


def check_state_fits(ckpt: Checkpoint, model: nn.Module, dense_opt: torch.optim.Optimizer | None = None,
                     sparse_opt: torch.optim.Optimizer | None = None) -> None:
    """Raise :class:`CheckpointError` naming the file and layer unless ``ckpt``'s model state (and,
    if given, both optimizer states) fit ``model`` / ``dense_opt`` / ``sparse_opt`` exactly (keys,
    shapes, dtypes, N:M masks): checked before anything is loaded (:mod:`slope.statecheck`)."""
    from slope.statecheck import StateDictError, check_model_state, check_optimizer_state

    names = {id(p): name for name, p in model.named_parameters()}
    checks = [("model.safetensors", lambda: check_model_state(model, ckpt.model_state))]
    if dense_opt is not None:
        dense_names = [names.get(id(p), "?") for g in dense_opt.param_groups for p in g["params"]]
        checks.append(("optimizers.pt (AdamW)", lambda: check_optimizer_state(dense_opt, ckpt.optimizers["dense"], dense_names)))
    if sparse_opt is not None:
        checks.append(("optimizers.pt (ADAMWSparse)", lambda: check_optimizer_state(
            sparse_opt, ckpt.optimizers["sparse"], [layer.layer_name for layer in sparse_opt.layers()], sparse_opt.param_shapes())))
    for what, check in checks:
        try:
            check()
        except (StateDictError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt.path}: {what} does not match the model its config.json describes: {e}") from e


def check_model_config(ckpt: Checkpoint) -> None:
    """Raise :class:`CheckpointError` if ``config.json``'s sizes disagree with the model config stored
    in ``trainer_state.json`` (an edited or corrupt checkpoint): the model is built from the latter."""
    from slope.model_config import size_mismatch

    mismatch = ckpt.model_config and size_mismatch(ckpt.config, ckpt.model_config)
    if mismatch:
        raise CheckpointError(f"{ckpt.path}: trainer_state.json's model config does not match the model its config.json describes: "
                              f"{mismatch}; the checkpoint was edited or is corrupt")


def load_model_state(model: nn.Module, ckpt: Checkpoint) -> None:
    """``model.load_state_dict(ckpt.model_state)`` once :func:`check_state_fits` accepts it."""
    check_state_fits(ckpt, model)
    model.load_state_dict(ckpt.model_state)


def _same_path(a: str, b: str) -> bool:
    """Whether two settings name the same existing file or folder (``small.txt``, ``./small.txt``, its absolute path)."""
    try:
        return bool(a and b) and os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def check_compatible(saved: TrainConfig, requested: TrainConfig) -> None:
    """Raise :class:`CheckpointError` if ``requested`` changes the model, sparsity or data of ``saved``."""
    for key in STRUCTURAL_KEYS:
        old, new = getattr(saved, key), getattr(requested, key)
        if old != new and not (key in PATH_KEYS and _same_path(old, new)):
            flag = "--" + key.replace("_", "-")
            why = " (the seed fixes the data order: the resumed run would not be the run that stopped)" if key == "seed" else ""
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with {key}={old!r} but this run asks for {key}={new!r}{why}; "
                f"drop {flag} to continue the checkpoint's run, or use another --out to start a new one"
            )
