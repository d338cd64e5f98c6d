"""``slope eval`` / ``slope generate`` on a model folder: what ``slope oneshot``, ``finetune`` and
``sparse-finetune`` write (plain Hugging Face folders, pruned entries exact zeros), ``slope export
--form dense``, or any causal LM folder with its tokenizer.

Validation data: when the folder's ``summary.json`` names its run's settings (``slope finetune`` /
``sparse-finetune``), those — the dataset's held-out split (:mod:`slope.dynamic.data`: every 20th
chunk), windows of ``max_seq_length`` tokens, the run's batch and ``eval_batches``, its autocast
precision — so the loss is the run's final validation loss again. A ``slope export`` of a ``slope
train`` run (``slope_export.validation`` in ``config.json``): that run's held-out split and
settings (:func:`slope.data.load_splits`, the folder's tokenizer), as ``slope eval`` of the
checkpoint. Otherwise the embedded corpus in windows of 512 tokens (fewer if the model has fewer
positions), 8 batches of 8, fp32.

A folder without tokenizer files is read with slope's shipped tokenizer (what ``slope train``
uses); a tokenizer that does not fit the model's vocabulary is a one-line error.

Forms (``--mode``): every folder runs ``dense``, the model plain transformers loads (the default;
for a pruned model's folder the dense equivalent ``W⊙M + s·B(A⊙M_A)``). A pruned model's folder
(``slope export --form sparse|merged``, ``save_pretrained``: :data:`PRUNED_FOLDERS`) also runs as
the sparse model (:func:`slope.from_pretrained`): ``unmerged`` as saved (not for a merged export)
and ``merged`` (adapters merged, inference-only: :func:`slope.lora.freeze_for_inference`), and
``--compare`` evaluates every form it has and checks that they agree.

A peft LoRA adapter folder (``adapter_config.json``, no ``config.json``) runs on its base model
folder (``base``: ``slope eval --base``, else its record) in the forms and on the data of
:mod:`slope.inference.adapters`.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from slope.serialization.jsonfile import read_json_object

__all__ = ["PRUNED_FOLDERS", "FolderEvalSettings", "check_mode", "compare_model_folder", "default_mode", "eval_model_folder",
           "folder_modes", "generate_from_folder", "load_folder_model"]

#: Folder kinds (:func:`slope.serialization.folders.folder_kind`) that hold a pruned model: they run sparse too.
PRUNED_FOLDERS = ("slope-pretrained", "slope-pretrained-v1")

#: What to do when the tokenizer does not fit the folder's model (``slope eval`` / ``generate`` have no --tokenizer).
TOKENIZER_ADVICE = ("put the model's own tokenizer files (tokenizer.json, tokenizer_config.json: its tokenizer's "
                    "save_pretrained) in the model folder")


@dataclass(frozen=True)
class FolderEvalSettings:
    """What ``slope eval`` validates a model folder on (module docstring)."""

    dataset: str = "embedded"
    seq_len: int = 512
    batch_size: int = 8
    eval_batches: int = 8
    seed: int = 42
    text_field: str = "text"
    precision: str = "fp32"
    from_run: bool = False  # read from the folder's summary.json or slope_export record
    split: str = "finetune"  # "finetune": slope.dynamic.data's held-out chunks; "train": slope train's split

    @classmethod
    def for_folder(cls, summary: dict, model: nn.Module, eval_batches: int | None) -> "FolderEvalSettings":
        """From the run's ``summary`` (its ``summary.json``, ``{}`` if none), the ``slope_export``
        record of ``model``'s config, or the defaults."""
        config = summary.get("config")
        export = getattr(model.config, "slope_export", None)
        validation = export.get("validation") if isinstance(export, dict) else None
        if isinstance(validation, dict) and not isinstance(config, dict):  # a run's own summary comes first
            missing = [k for k in ("dataset", "seq_len", "batch_size", "eval_batches", "text_field", "precision") if k not in validation]
            if missing:
                raise ValueError(f"config.json's slope_export.validation lacks {missing}: re-export the run with slope export")
            return cls(dataset=validation["dataset"], seq_len=int(validation["seq_len"]), batch_size=int(validation["batch_size"]),
                       eval_batches=eval_batches or int(validation["eval_batches"]), text_field=validation["text_field"],
                       precision=validation["precision"], from_run=True, split="train")
        positions = getattr(model.config, "max_position_embeddings", None) or 513
        if not isinstance(config, dict) or not config.get("max_seq_length"):
            return cls(seq_len=min(512, positions - 1), eval_batches=eval_batches or 8)
        return cls(dataset=config.get("dataset") or "embedded", seq_len=int(config["max_seq_length"]),
                   batch_size=int(config.get("global_batch") or config.get("batch_size") or 8),
                   eval_batches=eval_batches or int(config.get("eval_batches") or 8), seed=int(config.get("seed", 42)),
                   text_field=config.get("text_field") or "text",
                   precision=config.get("precision_mode") or config.get("precision") or "fp32", from_run=True)


def folder_modes(folder: str | Path, base: str | Path | None = None) -> tuple[str, ...]:
    """The forms ``folder`` runs in (module docstring): ``("dense",)`` for a plain model folder (also
    a pruned model's folder re-saved by plain transformers: its masks are gone); for a pruned
    model's, ``unmerged`` (unless it holds the merged form), ``merged`` (when it has SLoPe layers)
    and ``dense``; for an adapter folder on ``base`` (:func:`_adapter_base`), those of
    :func:`slope.inference.adapters.adapter_modes`. An unreadable slope record is a one-line
    :class:`slope.config.ConfigError`."""
    from slope.config import ConfigError
    from slope.inference.adapters import adapter_modes
    from slope.io import _read_slope_config
    from slope.serialization.folders import folder_kind, weight_keys

    base_dir = _adapter_base(folder, base)
    if base_dir is not None:
        return adapter_modes(folder_modes(base_dir))
    if folder_kind(folder) not in PRUNED_FOLDERS or not any(k.endswith(".mask_bits") for k in weight_keys(folder)):
        return ("dense",)
    try:
        layers = _read_slope_config(str(folder))[0]["layers"]
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"{folder}: its slope record cannot be read ({e}); --mode dense runs it as plain transformers loads it") from e
    merged = any(rec.get("merged") or rec.get("inference_only") for rec in layers.values() if isinstance(rec, dict))
    return ("merged", "dense") if merged else ("unmerged", "merged", "dense") if layers else ("unmerged", "dense")


def check_mode(folder: str | Path, mode: str, base: str | Path | None = None) -> None:
    """A one-line :class:`slope.config.ConfigError` unless ``folder`` (an adapter folder: on
    ``base``) runs in ``mode`` (:func:`folder_modes`)."""
    from slope.config import ConfigError
    from slope.inference.adapters import mode_refusal

    base_dir = _adapter_base(folder, base)
    if mode == "dense":  # every folder (needs no slope record)
        return
    modes = folder_modes(folder, base)
    if mode not in modes:
        if base_dir is not None:
            what = mode_refusal(folder, base_dir, mode, folder_modes(base_dir))
        else:
            what = f"{folder} " + ("is a plain model folder: it has one (dense) form" if modes == ("dense",) else
                                   f"holds the forms {', '.join(modes)}")
        raise ConfigError(f"--mode {mode}: {what}; use --mode {' or '.join(modes)}")


def default_mode(folder: str | Path, base: str | Path | None = None) -> str:
    """The form ``slope eval`` / ``generate`` run ``folder`` in without ``--mode``: ``unmerged`` for
    an adapter folder on a pruned model's folder (its adapters as trained), else ``dense``."""
    return "unmerged" if _adapter_base(folder, base) is not None and "unmerged" in folder_modes(folder, base) else "dense"


def _adapter_base(folder: str | Path, base: str | Path | None) -> Path | None:
    """The base model folder of an adapter folder (:func:`slope.inference.adapters.adapter_base`),
    ``None`` for a model folder (given a ``base``: a one-line :class:`slope.config.ConfigError`)."""
    from slope.config import ConfigError
    from slope.inference.adapters import adapter_base, is_adapter_folder

    if is_adapter_folder(folder):
        return adapter_base(folder, base)
    if base is not None:
        raise ConfigError(f"--base {base}: {folder} is a model folder, not a peft adapter folder (adapter_config.json); drop --base")
    return None


def _saved_backends_run(folder: Path, device: torch.device) -> bool:
    """Whether every compressed layer's saved backend runs on ``device`` (a folder saved on a GPU
    with ``cusparselt``, say, does not on a CPU)."""
    from slope.backends import backend_class
    from slope.io import _read_slope_config

    for rec in _read_slope_config(str(folder))[0]["layers"].values():
        if rec.get("compress") and rec.get("backend") not in (None, "auto"):
            try:
                if backend_class(rec["backend"]).unavailable_reason(device, getattr(torch, rec["dtype"])) is not None:
                    return False
            except (RuntimeError, ValueError, AttributeError):
                return False
    return True


def _sparse_model(folder: Path, mode: str, device: torch.device) -> tuple[nn.Module, object | None]:
    """``(model, tokenizer or None)``: the pruned model of ``folder`` in ``mode`` (``unmerged``: as
    saved; ``merged``: adapters merged, then :func:`freeze_for_inference`), with its saved backends,
    or ``auto`` where one of them does not run on ``device``."""
    from slope.io import from_pretrained
    from slope.lora import MergedSparseLinear, freeze_for_inference, merge_lora
    from slope.pruning.loading import _hf_tokenizer
    from slope.registry import sparse_modules

    check_mode(folder, mode)
    model = from_pretrained(folder, backend=None if _saved_backends_run(folder, device) else "auto")
    if mode == "merged":
        if any(m.lora_rank and not isinstance(m, MergedSparseLinear) for _, m in sparse_modules(model)):
            merge_lora(model)
        freeze_for_inference(model)
    return model, _hf_tokenizer(folder)


def load_folder_model(folder: str | Path, device: str = "auto", mode: str = "dense", base: str | Path | None = None):
    """``(model, tokenizer, device)``: the folder's causal LM in the dtype it was saved in, in eval
    mode on ``device`` (``dense``: :func:`slope.pruning.loading.load_model`; ``unmerged`` /
    ``merged``: the pruned model, module docstring), and its tokenizer (slope's shipped one when the
    folder has none). An adapter folder: its ``base``'s model in ``mode`` with the adapters
    (:func:`slope.inference.adapters.with_adapters`), and the base's tokenizer; a warning when the
    base its record names is not 2:4 pruned (adapters trained after pruning that model in memory)."""
    from slope.dynamic.data import resolve_tokenizer
    from slope.evaluate import resolve_device
    from slope.inference.adapters import with_adapters
    from slope.pruning.loading import load_model

    base_dir = _adapter_base(folder, base)
    if base_dir is not None:
        check_mode(folder, mode, base)
        model, tokenizer, device = load_folder_model(base_dir, device, mode)
        if base is None and mode == "dense" and not _has_24_layers(model):
            warnings.warn(f"the adapters' base {base_dir} (base_model_name_or_path in {Path(folder) / 'adapter_config.json'}) is "
                          "not 2:4 pruned: adapters trained on a pruned model of it (slope.prune_model after from_pretrained) "
                          "run on that model's folder (slope.save_pretrained): pass it as --base", UserWarning, stacklevel=2)
        return with_adapters(model, folder, base_dir, mode).to(device).eval().requires_grad_(False), tokenizer, device
    device = resolve_device(device)
    if mode == "dense":
        model, tokenizer = load_model(folder, device, "auto")
    else:
        model, tokenizer = _sparse_model(Path(folder), mode, device)
        model = model.to(device).eval().requires_grad_(False)
    ratio = getattr(model.config, "topk_attention_ratio", None)
    if ratio is not None:  # fine-tuned with top-k attention (sparse-finetune --use-topk-attention): the config keeps its ratio
        from slope.dynamic.attention import enable_topk_attention

        enable_topk_attention(model, ratio)
        warnings.warn(f"{folder} was fine-tuned with top-k attention (each query attends to its top {ratio:g} of the keys): it runs "
                      "with it again", UserWarning, stacklevel=2)
    tokenizer = tokenizer if tokenizer is not None else resolve_tokenizer(None, folder)
    vocab_size = model.get_input_embeddings().num_embeddings
    if getattr(tokenizer, "slope_shipped", False) and len(tokenizer) > vocab_size:
        from slope.config import ConfigError

        raise ConfigError(f"{folder} has no tokenizer files, and slope's shipped tokenizer ({len(tokenizer)} tokens) is not "
                          f"the model's (its vocabulary has {vocab_size} entries); {TOKENIZER_ADVICE}")
    return model, tokenizer, device


def _has_24_layers(model: nn.Module) -> bool:
    """Whether a linear layer of ``model`` (but its output layer) holds a 2:4 sparse weight."""
    from slope.masks import is_nm_sparse

    output = model.get_output_embeddings()
    return any(is_nm_sparse(m.weight != 0, 2, 4) for m in model.modules() if isinstance(m, nn.Linear) and m is not output)


def _check_token_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    """A one-line :class:`slope.config.ConfigError` when ``ids`` (int64, any shape) hold a token id the
    model's ``vocab_size`` embeddings lack (the folder's tokenizer is not the model's)."""
    from slope.config import ConfigError

    largest = int(ids.max()) if ids.numel() else -1
    if largest >= vocab_size:
        raise ConfigError(f"the tokenizer gives {what} token id {largest} but the model's vocabulary has {vocab_size} entries: "
                          f"it is not the model's tokenizer; {TOKENIZER_ADVICE}")


def eval_model_folder(folder: str | Path, device: str = "auto", eval_batches: int | None = None, mode: str = "dense",
                      base: str | Path | None = None) -> dict:
    """Validation loss / perplexity and tokens/s of the model in ``folder`` (an adapter folder: on
    ``base``) in ``mode`` (module docstring); ``eval_batches`` overrides the number of batches. The
    result has ``slope eval``'s keys (``step``: the run's steps when known) plus ``settings`` and
    ``base`` (an adapter folder's base model folder, else ``None``)."""
    folder = Path(folder)
    base_dir = _adapter_base(folder, base)
    model, tokenizer, device = load_folder_model(folder, device, mode, base)
    summary, settings, val, unigram = _folder_data(base_dir or folder, model, tokenizer, eval_batches)
    return {"checkpoint": str(folder), "base": None if base_dir is None else str(base_dir), **_run_facts(model, summary),
            **_measure(model, val, device, settings.precision), "mode": mode, "unigram_loss": unigram,
            "settings": asdict(settings), "note": None}


def compare_model_folder(folder: str | Path, device: str = "auto", eval_batches: int | None = None,
                         base: str | Path | None = None) -> dict:
    """:func:`eval_model_folder` in every form of ``folder`` (an adapter folder: on ``base``;
    :func:`folder_modes`), one model in memory at a time, and whether they agree as
    :func:`slope.evaluate.compare_checkpoint`'s modes must (same keys: ``modes``,
    ``max_loss_diff``, ``max_logit_diff``, tolerances, ``agree``)."""
    from slope.evaluate import LOGIT_TOLERANCE, LOSS_TOLERANCE, _logits

    folder = Path(folder)
    base_dir = _adapter_base(folder, base)
    results, probes, data = {}, {}, None
    for mode in folder_modes(folder, base):
        model, tokenizer, dev = load_folder_model(folder, device, mode, base)
        data = data or _folder_data(base_dir or folder, model, tokenizer, eval_batches)
        summary, settings, val, unigram = data
        results[mode] = {**_measure(model, val, dev, settings.precision), "mode": mode, "note": None}
        probes[mode] = _logits(model, val[0][0][:1], dev, settings.precision)
        dtype = next(model.parameters()).dtype
        facts = _run_facts(model, summary)
        del model
    ref, precision = next(iter(results)), _compare_precision(settings.precision, dtype)
    loss_diff = max(abs(r["val_loss"] - results[ref]["val_loss"]) for r in results.values())
    logit_diff = max(float((p - probes[ref]).abs().max()) for p in probes.values())
    one_form = "peft adapters on a plain model folder" if base_dir is not None else "a plain model folder"
    return {"checkpoint": str(folder), "base": None if base_dir is None else str(base_dir), "step": facts["step"],
            "precision": precision, "modes": results, "max_loss_diff": loss_diff, "max_logit_diff": logit_diff,
            "loss_tolerance": LOSS_TOLERANCE[precision], "logit_tolerance": LOGIT_TOLERANCE[precision],
            "agree": loss_diff <= LOSS_TOLERANCE[precision] and logit_diff <= LOGIT_TOLERANCE[precision],
            "note": f"{one_form}: it has one (dense) form" if len(results) == 1 else None,
            "unigram_loss": unigram, "settings": asdict(settings)}


def _compare_precision(precision: str, dtype: torch.dtype) -> str:
    """The precision whose tolerances apply: the autocast setting, or the weights' own half dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, precision) if precision == "fp32" else precision


def _folder_data(folder: Path, model: nn.Module, tokenizer, eval_batches: int | None) -> tuple[dict, FolderEvalSettings, list, float]:
    """``(summary.json's record, settings, validation batches, unigram baseline)`` of ``folder``."""
    summary = read_json_object(folder / "summary.json") or {}
    settings = FolderEvalSettings.for_folder(summary, model, eval_batches)
    val, unigram = _validation_data(folder, settings, tokenizer, model.get_input_embeddings().num_embeddings)
    return summary, settings, val, unigram


def _run_facts(model: nn.Module, summary: dict) -> dict:
    """The run's ``step`` (summary.json or the export record) and its reported final validation loss."""
    export = getattr(model.config, "slope_export", None) or {}
    return {"step": summary.get("steps", export.get("step")), "run_final_val_loss": summary.get("final_val_loss")}


def _measure(model: nn.Module, val: list, device: torch.device, precision: str) -> dict:
    """Loss, tokens/s (after a short warm-up forward, which builds sparse operands) and weight bytes."""
    from slope.data import perplexity
    from slope.evaluate import _nbytes, _sync, evaluate_loss
    from slope.registry import sparse_modules

    evaluate_loss(model, [(val[0][0][:1, :8], val[0][1][:1, :8])], device, precision)  # warm-up
    _sync(device)
    start = time.perf_counter()
    loss = evaluate_loss(model, val, device, precision)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(y.numel() for _, y in val)
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9), "weight_bytes": _nbytes(model),
            "sparse_layer_bytes": sum(_nbytes(m) for _, m in sparse_modules(model)), "freeze": None}


def _validation_data(folder: Path, settings: FolderEvalSettings, tokenizer, vocab_size: int) -> tuple[list, float]:
    """The validation batches ``[(x, y)]`` (``int64 (b, seq_len)`` each) of ``settings`` and the
    unigram baseline of its training split."""
    from slope.data import unigram_cross_entropy

    if settings.split == "train":  # slope train's split, tokenized as the run did (the folder holds its tokenizer)
        from slope.config import TrainConfig
        from slope.evaluate import _validation

        run = TrainConfig(dataset=settings.dataset, seq_len=settings.seq_len, text_field=settings.text_field,
                          batch_size=settings.batch_size, eval_batches=settings.eval_batches)
        # the tokenizer load_folder_model resolved: the folder's, or slope's shipped one ("") when it has none
        splits, val = _validation(run, None, "" if getattr(tokenizer, "slope_shipped", False) else folder)
        _check_token_ids(torch.cat([splits.train, splits.val]), vocab_size, "the validation data")
        return val, unigram_cross_entropy(splits.train, splits.val, splits.vocab_size)
    from slope.dynamic.data import load_finetune_data

    data = load_finetune_data(settings.dataset, tokenizer, seq_len=settings.seq_len, batch_size=settings.batch_size,
                              seed=settings.seed, eval_batches=settings.eval_batches, vocab_size=vocab_size,
                              text_field=settings.text_field, tokenizer_advice=TOKENIZER_ADVICE)
    targets = torch.cat([y.flatten() for _, y in data.val])
    return data.val, unigram_cross_entropy(data.train[:, 1:].flatten(), targets, vocab_size)


@torch.no_grad()
def generate_from_folder(folder: str | Path, prompt: str, *, device: str = "auto", max_new_tokens: int = 64,
                         temperature: float = 0.8, top_k: int | None = 50, seed: int = 0, mode: str = "dense",
                         base: str | Path | None = None) -> tuple[str, int, float]:
    """Continue ``prompt`` with the folder's model (an adapter folder: on ``base``) in ``mode``
    (``generate``, KV cache; ``temperature=0``: greedy); returns ``(text, new tokens, seconds)``."""
    from slope.config import ConfigError
    from slope.evaluate import timed_generate

    model, tokenizer, device = load_folder_model(folder, device, mode, base)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    if ids.numel() == 0:
        raise ConfigError("--prompt is empty; give some text to continue")
    _check_token_ids(ids, model.get_input_embeddings().num_embeddings, "the --prompt")
    tokens, seconds = timed_generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     seed=seed, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(tokens), len(tokens) - ids.shape[1], seconds
