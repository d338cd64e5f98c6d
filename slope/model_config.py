"""The architecture ``slope train`` builds (``--model-config PATH_OR_TYPE``): any Hugging Face causal LM.

- ``""`` (the default): a Llama of ``TrainConfig``'s sizes (``hidden_size``, ``intermediate_size``,
  ``num_layers``, ``num_heads``; one KV head per head; untied embeddings).
- a model type name that transformers knows (``qwen2``, ``mistral``, ``gpt2``, ``gemma``, ...): that
  architecture with the same sizes, mapped onto the config's own names (GPT-2's ``n_embd``,
  ``n_inner`` ...); its other settings are transformers' defaults for the type.
- a config JSON file, or a folder holding ``config.json``: the architecture and sizes as written
  (the size flags do not apply).

Always: the vocabulary is the tokenizer's (``vocab_size``, with its end-of-text token as BOS, EOS and
PAD) and there are at least ``seq_len`` positions. The resolved config is stored in every checkpoint
(``trainer_state.json``, ``model_config``), so eval, generate, export and resume rebuild exactly
this architecture (:func:`config_from_dict`) whatever happens to the file later.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from slope.config import ConfigError, TrainConfig
from slope.masks import parse_sparsity
from slope.serialization.jsonfile import read_json_object

__all__ = ["build_causal_lm", "causal_lm_config", "check_sparse_sizes", "config_from_dict", "describe", "size_mismatch"]

#: Names of the MLP width in transformers configs (the first one a config has is set).
_MLP_WIDTH = ("intermediate_size", "n_inner", "ffn_dim")


def _sized(cfg: TrainConfig, model_type: str):
    """``model_type``'s config with ``cfg``'s sizes (checked: a type that ignores one is an error)."""
    from transformers import AutoConfig

    try:
        base = AutoConfig.for_model(model_type)
    except ValueError as e:
        raise ConfigError(f"model_config = {model_type!r} is neither a file nor a model type transformers knows; give a config "
                          "JSON file or folder, or a type such as llama, qwen2, mistral, gpt2") from e
    sizes = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
             "max_position_embeddings": cfg.seq_len, "tie_word_embeddings": False}
    width = next((name for name in _MLP_WIDTH if hasattr(base, name)), None)
    if width is not None:
        sizes[width] = cfg.intermediate_size
    if hasattr(base, "num_key_value_heads"):
        sizes["num_key_value_heads"] = cfg.num_heads
    if hasattr(base, "head_dim"):
        sizes["head_dim"] = cfg.hidden_size // cfg.num_heads
    alias = getattr(base, "attribute_map", {})
    try:
        config = AutoConfig.for_model(model_type, **{alias.get(k, k): v for k, v in sizes.items()})
    except Exception as e:  # noqa: BLE001 (as in _from_file)
        raise ConfigError(f"model_config = {model_type!r} with the size flags: transformers rejects it ({' '.join(str(e).split())[:300]}); "
                          "change --hidden-size / --num-heads / --intermediate-size") from e
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if getattr(config, key, None) != sizes[key]:
            raise ConfigError(f"model_config = {model_type!r}: its config does not take {key} = {sizes[key]} (it has "
                              f"{getattr(config, key, None)!r}); give a config JSON file with the sizes you want")
    return config


def _from_file(spec: str, path: Path):
    from transformers import AutoConfig

    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"model_config = {spec!r}: the folder has no config.json; give a config JSON file, its folder, or a model type")
    model_type = read_json_object(file, lambda why: ConfigError(f"model_config = {spec!r}: {file} is not a JSON object ({why})")).get("model_type")
    if not model_type:
        raise ConfigError(f"model_config = {spec!r}: {file} has no \"model_type\" (e.g. \"qwen2\"); add it")
    try:
        return AutoConfig.from_pretrained(str(file))
    except Exception as e:  # noqa: BLE001 (transformers' validators also raise huggingface_hub's StrictDataclass errors)
        raise ConfigError(f"model_config = {spec!r}: transformers cannot read it ({' '.join(str(e).split())[:300]})") from e


def causal_lm_config(cfg: TrainConfig, vocab_size: int, eos_id: int):
    """The ``transformers`` config ``cfg.model_config`` names (module docstring), with the tokenizer's
    ``vocab_size`` and ``eos_id`` and at least ``cfg.seq_len`` positions."""
    spec = cfg.model_config
    path = Path(spec).expanduser()
    if not spec:
        config = _sized(cfg, "llama")
    elif path.exists():
        config = _from_file(spec, path)
    elif path.suffix == ".json" or "/" in spec:
        raise ConfigError(f"model_config = {spec!r}: no such file or folder; give a config JSON file, its folder, or a model type")
    else:
        config = _sized(cfg, spec)
    config.vocab_size = vocab_size
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos_id
    if getattr(config, "max_position_embeddings", cfg.seq_len) < cfg.seq_len:
        config.max_position_embeddings = cfg.seq_len
    return config


def config_from_dict(values: dict):
    """A config stored by :func:`causal_lm_config`'s caller (``config.to_dict()``) back as an object."""
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def size_mismatch(cfg: TrainConfig, stored: dict) -> str | None:
    """Where ``cfg``'s size flags disagree with a stored config built from them (the default Llama or a
    model type; a file's sizes are its own): ``"hidden_size = 64 (stored 128)"``, or ``None``."""
    spec = cfg.model_config
    if spec and (Path(spec).expanduser().exists() or stored.get("model_type") != spec):
        return None
    config = config_from_dict(stored)
    width = next((name for name in _MLP_WIDTH if hasattr(config, name)), None)
    pairs = [("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads")]
    for ours, theirs in pairs + ([("intermediate_size", width)] if width else []):
        if getattr(config, theirs) is not None and getattr(cfg, ours) != getattr(config, theirs):
            return f"{ours} = {getattr(cfg, ours)} (the stored model config has {getattr(config, theirs)})"
    return None


def build_causal_lm(config) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)``, random init from torch's global RNG (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ConfigError(f"model_config: transformers has no causal-LM model for the type {config.model_type!r} "
                          "(AutoModelForCausalLM); choose a decoder such as llama, qwen2, mistral, gpt2") from e


def check_sparse_sizes(cfg: TrainConfig, config) -> str | None:
    """Before any work: a :class:`ConfigError` naming the first linear layer of ``config``'s model that
    ``cfg`` prunes (every one but the vocabulary projection and tied weights) whose in or out size is not
    divisible by M (``prune_model`` would leave it dense: a run that says "SLoPe 2:4" with dense layers).
    Under compressed storage, a one-line note when a sparse layer's size is not a multiple of 64 (the
    compressed backends pad or mask it: exact, with some wasted work), else ``None``. Builds the model
    on the meta device (no memory, no RNG draws)."""
    if cfg.dense:
        return None
    from slope.prune import default_plan, size_reason

    with torch.device("meta"):
        decisions = default_plan(build_causal_lm(config), cfg.sparsity)
    m = parse_sparsity(cfg.sparsity)[1]
    source = f"model_config = {cfg.model_config!r}" if cfg.model_config else "the model of the size flags"
    bad = [d for d in decisions if d.reason == size_reason(m)]
    if bad:
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise ConfigError(f"{source}: layer {bad[0].name} is {bad[0].shape[0]}x{bad[0].shape[1]} (out x in){more}, not divisible by {m}, "
                          f"so {cfg.sparsity} would leave it dense; choose sizes (hidden_size, intermediate_size, heads x head_dim) "
                          f"that are multiples of {m}, or train with --dense")
    odd = [d for d in decisions if d.pruned and (d.shape[0] % 64 or d.shape[1] % 64)]
    if not cfg.compress or not odd:
        return None
    return (f"note: {source}: {len(odd)} sparse layers have a size that is not a multiple of 64 (e.g. {odd[0].name} "
            f"{odd[0].shape[0]}x{odd[0].shape[1]}); compressed 2:4 runs them exactly, the GPU backends pad or mask the edges "
            "(the size flags ask for multiples of 64)")


def describe(config) -> str:
    """``Llama 4x128 (mlp 384)``: the architecture in a few words, for the run's log."""
    name = type(config).__name__.removesuffix("Config")
    width = next((getattr(config, k) for k in _MLP_WIDTH if getattr(config, k, None)), None)
    return f"{name} {config.num_hidden_layers}x{config.hidden_size}" + (f" (mlp {width})" if width else "")
