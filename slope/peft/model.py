"""``get_peft_model`` and ``SftModel``: a frozen model with sparse deltas, PEFT-style.

``SftModel`` wraps the model (``.base_model``) and behaves like it (calls and unknown attributes
go through). Its deltas save alone (:meth:`SftModel.save_pretrained`: ``adapter_config.json`` +
``adapter_model.safetensors``, PEFT's file names), load onto a fresh copy of the same base
(:meth:`SftModel.from_pretrained`), merge into the base weights and unmerge exactly.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.nn as nn

from slope.peft.config import CONFIG_NAME, WEIGHTS_NAME, SftConfig
from slope.prune import _set_submodule
from slope.serialization.jsonfile import read_json_object
from slope.peft.delta import SftLinear, SparseDelta, check_indices, refuse_sharded_deltas
from slope.peft.files import read_tensors, tensor_at
from slope.peft.targets import _matches, allocate, find_targets, random_indices

__all__ = ["SftModel", "get_peft_model"]

FINGERPRINT_SAMPLES = 16  # base values per target weight recorded to recognise the base model
FINGERPRINT_RTOL = 1e-2  # loose enough for a base loaded in another float dtype


def fingerprint(weight: torch.Tensor) -> list[float]:
    """``FINGERPRINT_SAMPLES`` values of ``weight`` at fixed positions: recognises a base model's weights."""
    flat = weight.detach().reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES).round().long().to(flat.device)
    return [float(v) for v in flat[positions].float().cpu()]


def plan(model: nn.Module, config: SftConfig) -> tuple[list[tuple[str, nn.Module]], dict[str, nn.Parameter]]:
    """What ``config`` does to ``model``, checked without changing it: the target modules
    ``(name, module)`` and the parameters of the ``modules_to_save`` (``{"<module>.<param>": p}``).

    Targets inside a module to save are left out (the whole module trains densely). An explicit
    ``modules_to_save`` entry that matches nothing is a ``ValueError``; the task type's default
    heads are skipped when the model lacks them (as in PEFT).
    """
    explicit = list(config.modules_to_save or [])
    saved_modules = [(n, m) for n, m in model.named_modules() if n and _matches(n, config.all_modules_to_save())]
    for key in explicit:
        if not any(_matches(n, [key]) for n, _ in saved_modules):
            raise ValueError(f"modules_to_save entry {key!r} matches no module of the model; name a module such as the task head 'classifier'")
    prefixes = [n + "." for n, _ in saved_modules]
    saved_modules = [(n, m) for n, m in saved_modules if not any(n.startswith(p) for p in prefixes)]  # outermost only

    def inside(name: str) -> bool:
        return any(name == n or name.startswith(n + ".") for n, _ in saved_modules)

    targets = find_targets(model, config.target_modules, skip=inside)
    saved = {f"{n}.{pn}": p for n, m in saved_modules for pn, p in m.named_parameters()}
    return targets, saved


def check_all_indices(targets: list[tuple[str, nn.Module]], indices: dict[str, torch.Tensor], where: str = "the deltas") -> None:
    """``ValueError`` unless ``indices`` has valid indices for exactly the ``targets``."""
    names = [name for name, _ in targets]
    extra = sorted(set(indices) - set(names))
    if extra:
        raise ValueError(f"{where}: deltas for modules {extra} have no target in this model (target_modules select {names[:4]}...)")
    for name, module in targets:
        if name not in indices:
            raise ValueError(f"{where}: no delta indices for target module {name!r}")
        check_indices(indices[name], tuple(module.weight.shape), f"{where}: the indices of {name}")


class SftModel(nn.Module):
    """A model whose target linear weights are frozen and carry trainable sparse deltas (and
    whose ``modules_to_save`` train densely)."""

    def __init__(self, model: nn.Module, config: SftConfig, indices: dict[str, torch.Tensor] | None = None):
        super().__init__()
        targets, saved = plan(model, config)  # everything is checked before the model is touched
        if indices is None:
            indices = self._initial_indices(model, config, targets)
        check_all_indices(targets, indices)
        # The base weights' record for save_pretrained, taken now: they stay frozen, and once
        # sharded (shard_sft_model) reading them back would take every rank.
        self.base_fingerprints = {name: fingerprint(module.weight) for name, module in targets}
        self.base_model = model
        self.peft_config = config
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in targets:
            _set_submodule(model, name, SftLinear(module, indices[name]))
        self.saved_parameter_names = sorted(saved)
        for p in saved.values():
            p.requires_grad_(not config.inference_mode)
        if config.inference_mode:
            for _, _, delta in self.active_deltas():
                delta.values.requires_grad_(False)

    @staticmethod
    def _initial_indices(model, config: SftConfig, targets) -> dict[str, torch.Tensor]:
        sizes = [m.weight.numel() for _, m in targets]
        total = config.num_tunable_weights
        if total is None:
            total = max(1, round(float(config.density) * sum(p.numel() for p in model.parameters())))
        shares = allocate(int(total), sizes)
        gen = torch.Generator().manual_seed(int(config.seed))
        return {name: random_indices(size, k, gen).to(m.weight.device) for (name, m), size, k in zip(targets, sizes, shares)}

    # ------------------------------------------------------------------ behaving like the model
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ the deltas
    def sft_layers(self) -> Iterator[tuple[str, SftLinear]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, SftLinear):
                yield name, module

    def active_deltas(self) -> Iterator[tuple[str, str, SparseDelta]]:
        """``(module_name, param_name, delta)`` for every delta (``delta.values``, ``delta.indices``)."""
        for name, layer in self.sft_layers():
            yield name, "weight", layer.sft_delta

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT counts them (deltas included in ``all``)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ merging
    def merge(self) -> None:
        """Add every delta into its base weight (in place; :meth:`unmerge` restores the base exactly)."""
        for _, layer in self.sft_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.sft_layers():
            layer.unmerge()

    def _unload(self, merge: bool) -> nn.Module:
        for name, layer in list(self.sft_layers()):
            if merge:
                layer.merge()
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """The plain model with the deltas added into its weights (the wrappers removed)."""
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """The plain base model without the deltas (merged deltas are removed exactly first)."""
        self.unmerge()
        return self._unload(merge=False)

    # ------------------------------------------------------------------ persistence
    def saved_parameters(self) -> dict[str, nn.Parameter]:
        """The ``modules_to_save`` parameters, ``{"<module>.<param>": p}`` (names in the base model)."""
        params = dict(self.base_model.named_parameters())
        return {name: params[name] for name in self.saved_parameter_names}

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<module>.sft_delta.values": (k,), "<module>.sft_delta.indices": (k,) int64}`` and the
        ``modules_to_save`` parameters ``{"<module>.<param>": tensor}``, on the CPU."""
        refuse_sharded_deltas(delta for _, _, delta in self.active_deltas())
        out = {}
        for name, layer in self.sft_layers():
            out[f"{name}.sft_delta.values"] = layer.sft_delta.values.detach().cpu().contiguous()
            out[f"{name}.sft_delta.indices"] = layer.sft_delta.indices.cpu().contiguous()
        for name, p in self.saved_parameters().items():
            out[name] = p.detach().cpu().contiguous()
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **_ignored) -> None:
        """Write only the deltas and ``modules_to_save`` (safetensors) and the config with the base
        model's fingerprint. ``is_main_process=False`` (PEFT's argument; e.g. on every rank but 0)
        writes nothing; the deltas are the same on every data-parallel rank."""
        from safetensors.torch import save_file

        state = self.delta_state_dict()
        if not is_main_process:
            return
        base = {name: {"shape": list(layer.weight.shape), "samples": self.base_fingerprints[name]} for name, layer in self.sft_layers()}
        os.makedirs(save_directory, exist_ok=True)
        self.peft_config.save_pretrained(save_directory, extra={"base_model": base, "base_model_class": type(self.base_model).__name__})
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt", "peft_type": "SFT"})

    @torch.no_grad()
    def load_deltas(self, directory: str | os.PathLike) -> None:
        """Replace this model's deltas (indices and values) and ``modules_to_save`` by those saved in
        ``directory`` (a checkpoint of this model's training); checked in full before any change."""
        path = os.path.join(directory, WEIGHTS_NAME)
        tensors = read_tensors(path, REMEDY)
        layers = dict(self.sft_layers())
        expected = {f"{n}.sft_delta.{t}" for n in layers for t in ("values", "indices")} | set(self.saved_parameter_names)
        if set(tensors) != expected:
            raise ValueError(f"{path} holds deltas for other modules than this model's {sorted(layers)}; {REMEDY}")
        for name, layer in layers.items():
            values = tensors[f"{name}.sft_delta.values"]
            indices = tensor_at(tensors, f"{name}.sft_delta.indices", path, REMEDY, integer=True)
            if values.shape != layer.sft_delta.values.shape or indices.shape != values.shape:
                raise ValueError(f"{path}: {name} has {values.numel()} entries, this model's delta {layer.sft_delta.values.numel()}")
            check_indices(indices, layer.sft_delta.shape, f"{path}: the indices of {name}")
        saved = self.saved_parameters()
        _check_saved_shapes(saved, tensors, path)
        for name, layer in layers.items():
            layer.sft_delta.indices.copy_(tensors[f"{name}.sft_delta.indices"])
            layer.sft_delta.values.copy_(tensors[f"{name}.sft_delta.values"])
        for name, p in saved.items():
            p.copy_(tensors[name])

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, is_trainable: bool = False) -> "SftModel":
        """Apply deltas saved by :meth:`save_pretrained` to ``model`` (a fresh copy of their base).

        Everything is checked before ``model`` changes: a folder made for another base model (other
        module names or shapes, or other base weights) or a corrupt one is a ``ValueError``.
        """
        config_path, weights_path = os.path.join(model_id, CONFIG_NAME), os.path.join(model_id, WEIGHTS_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: {REMEDY}")
        raw = read_json_object(config_path, lambda why: ValueError(f"{config_path} is corrupt ({why}); {REMEDY}"))
        try:
            config = SftConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: {e}") from e
        config.inference_mode = not is_trainable
        tensors = read_tensors(weights_path, REMEDY)
        if not isinstance(raw.get("base_model"), dict):
            raise ValueError(f"{config_path} lacks the record of the deltas' base model ('base_model'); {REMEDY}")
        _check_base(model, raw["base_model"], model_id)
        try:
            targets, saved = plan(model, config)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from e
        device = next(model.parameters()).device
        indices = {key[: -len(".sft_delta.indices")]: tensor_at(tensors, key, weights_path, REMEDY, integer=True).to(device)
                   for key in tensors if key.endswith(".sft_delta.indices")}
        check_all_indices(targets, indices, str(model_id))
        for name in indices:
            values = tensor_at(tensors, f"{name}.sft_delta.values", weights_path, REMEDY)
            if values.shape != indices[name].shape:
                raise ValueError(f"{weights_path}: {name} has {values.numel()} values for {indices[name].numel()} indices (corrupt file); {REMEDY}")
        _check_saved_shapes(saved, tensors, weights_path)
        sft = cls(model, config, indices=indices)
        with torch.no_grad():
            for name, layer in sft.sft_layers():
                layer.sft_delta.values.copy_(tensors[f"{name}.sft_delta.values"])
            for name, p in sft.saved_parameters().items():
                p.copy_(tensors[name])
        return sft


REMEDY = "pass a folder written by SftModel.save_pretrained (or an SftTrainer checkpoint)"


def _check_saved_shapes(saved: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path) -> None:
    """``ValueError`` unless ``tensors`` holds every ``modules_to_save`` parameter in its shape."""
    for name, p in saved.items():
        value = tensor_at(tensors, name, path, REMEDY)
        if value.shape != p.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, this model's {tuple(p.shape)}; {REMEDY}")


def _check_base(model: nn.Module, recorded: dict, where) -> None:
    """Raise ``ValueError`` unless ``model`` has the recorded target weights (names, shapes, values)."""
    modules = dict(model.named_modules())
    for name, record in recorded.items():
        if not isinstance(record, dict) or not {"shape", "samples"} <= set(record):
            raise ValueError(f"{where}: the base model record of {name} lacks its shape or samples (corrupt {CONFIG_NAME}); {REMEDY}")
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise ValueError(f"{where}: these deltas were made for a base model with a module {name!r}, which this model lacks")
        if list(weight.shape) != record["shape"]:
            raise ValueError(
                f"{where}: {name} has shape {list(weight.shape)} here but {record['shape']} in the deltas' base model: "
                "load the deltas onto the base model they were trained on"
            )
        samples = torch.tensor(fingerprint(weight))
        expected = torch.tensor(record["samples"])
        if not torch.allclose(samples, expected, rtol=FINGERPRINT_RTOL, atol=1e-6):
            raise ValueError(
                f"{where}: the weights of {name} differ from those of the base model the deltas were trained on: "
                "load the deltas onto that base model (a delta only makes sense relative to its base)"
            )


def get_peft_model(model: nn.Module, peft_config, **kwargs):
    """PEFT's entry point. With an :class:`SftConfig`: freeze ``model`` and give each target weight a
    trainable sparse delta (an :class:`SftModel`). With a peft ``LoraConfig``: ``peft.get_peft_model``
    with SLoPe's 2:4 layers as possible targets (:mod:`slope.peft.peft_lora`; ``kwargs`` go to peft)."""
    if type(peft_config).__module__.startswith("peft."):  # (peft imported only for its own configs)
        import peft

        from slope.peft.peft_lora import is_lora_config, sparse_lora_config, sparse_peft_model

        if is_lora_config(peft_config):
            return sparse_peft_model(peft.get_peft_model(model, sparse_lora_config(peft_config, model), **kwargs))
    if not isinstance(peft_config, SftConfig):
        raise TypeError(f"get_peft_model here takes an slope.peft.SftConfig or a peft LoraConfig, got "
                        f"{type(peft_config).__name__} (use peft's get_peft_model for other methods)")
    if kwargs:
        raise TypeError(f"get_peft_model with an SftConfig takes no other arguments, got {sorted(kwargs)}")
    return SftModel(model, peft_config)
