"""Validation loss of a model, and a trained checkpoint in its inference forms for ``slope eval`` / ``slope generate``.

A sparse checkpoint loads in three modes (``--mode``), which compute the same function to fp tolerance
(:func:`compare_checkpoint` checks it):

- ``unmerged``: the model as trained: SLoPe layers (adapters ``lora_A``/``lora_B`` if they were
  attached) with their training state (``mask_t``).
- ``merged``: the SLoPe way (DESIGN §5): the model is pruned with adapters, they are merged
  (:func:`slope.lora.merge_lora`: one sparse GEMM on ``[W⊙M ; A⊙M_A]`` plus a fused add-mm per
  layer), the trained state dict is loaded, and :func:`slope.lora.freeze_for_inference` drops the
  training state (``mask_t``, gradients). A checkpoint without adapters (trained without lazy LoRA,
  or stopped before they attached) gets the inference-only sparse form without LoRA.
- ``dense``: a plain Hugging Face model: every SLoPe layer replaced by an ``nn.Linear`` holding its
  effective weight ``W⊙M + (α/r)·B(A⊙M_A)`` (:func:`slope.prune.densify`, the weights
  :func:`slope.export_dense` writes).

A dense checkpoint (``--dense``, or a run that reached its dense tail) has one form only: ``unmerged``
and ``dense`` both load it, ``merged`` is an error.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slope.checkpoint import Checkpoint, CheckpointError, build_model, check_model_config, load_model_state, read_checkpoint, TRAINING_ONLY
from slope.checkpoint_store import latest_checkpoint
from slope.config import ConfigError, TrainConfig
from slope.data import load_splits, open_tokenizer, perplexity, unigram_cross_entropy, val_batches
from slope.lora import MemoryReport, freeze_for_inference, merge_lora
from slope.parallel import get_rank, get_world_size, sum_over_ranks
from slope.progress import Progress, display_for, iterate
from slope.registry import sparse_modules

__all__ = [
    "LOGIT_TOLERANCE",
    "LOSS_TOLERANCE",
    "MODES",
    "Generation",
    "LoadedModel",
    "autocast",
    "compare_checkpoint",
    "eval_checkpoint",
    "evaluate_loss",
    "generate",
    "generate_text",
    "timed_generate",
    "load_trained_model",
    "model_from_checkpoint",
    "open_checkpoint",
    "resolve_device",
]

MODES = ("unmerged", "merged", "dense")
#: Largest |Δ validation loss| (nats/token) between two modes that counts as agreement, per precision.
LOSS_TOLERANCE = {"fp32": 2e-5, "bf16": 1e-2, "fp16": 2e-3}
#: Largest |Δ logit| on the first validation sequence that counts as agreement, per precision.
LOGIT_TOLERANCE = {"fp32": 1e-3, "bf16": 0.125, "fp16": 0.03}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; other names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device 'cpu' (--device cpu)")
    return device


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``fp32``: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches, device: torch.device, precision: str, *, across_ranks: bool = False) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``batches`` of ``(x, y)``.

    ``across_ranks=True`` (every rank of an initialised process group calls it with the same
    ``batches``): rank ``r`` of ``N`` evaluates batches ``r, r + N, …`` and the sums are added over
    the ranks, so each rank does ``1/N`` of the work and all return the mean one process would.
    Every rank runs the same number of forwards (FSDP's all-gathers pair up across ranks): one
    short of a batch repeats its first and does not count it.
    """
    world = get_world_size() if across_ranks else 1
    if world > 1:
        batches = list(batches)
        _check_same_count(len(batches), world)
        rank = get_rank()
        mine = batches[rank::world]
        rounds = [(batch, True) for batch in mine] + [(batches[0], False)] * (-(-len(batches) // world) - len(mine))
    else:
        rounds = ((batch, True) for batch in batches)  # lazily: a progress iterator advances with the work
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for (x, y), counted in rounds:
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = model(input_ids=x).logits
        if counted:
            total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    model.train(was_training)
    if world > 1:
        total, count = sum_over_ranks([total, count])
    if not count:
        raise ValueError("evaluate_loss was given no validation batches (or only empty ones)")
    return total / count


def _check_same_count(n: int, world: int) -> None:
    """A ``ValueError`` on every rank unless all ranks hold ``n`` batches (else FSDP's forwards
    would not pair up and the ranks would wait for each other for ever). Collective."""
    total, squares = sum_over_ranks([n, n * n])
    if squares * world != total * total:  # the mean of the squares is the square of the mean only when all are equal
        raise ValueError(f"the ranks hold different numbers of validation batches ({n} here, {total / world:g} on average); "
                         "evaluate_loss(..., across_ranks=True) needs the same batches on every rank")


@torch.no_grad()
def _logits(model: nn.Module, input_ids: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """fp32 CPU logits ``(batch, seq, vocab)`` of ``input_ids (batch, seq)`` int64."""
    with autocast(device, precision):
        logits = model(input_ids=input_ids.to(device)).logits
    return logits.float().cpu()


# ---------------------------------------------------------------------- loading a checkpoint
@dataclass
class LoadedModel:
    """A checkpoint's model in one inference ``mode`` (see the module docstring), in eval mode on ``device``.

    ``memory``: the :class:`~slope.lora.MemoryReport` of ``freeze_for_inference`` (``merged`` only);
    ``note``: what the mode fell back to, if anything; ``sparse_layers``: names of the checkpoint's
    SLoPe layers (``nn.Linear`` in ``dense`` mode).
    """

    model: nn.Module
    config: TrainConfig
    checkpoint: Checkpoint
    device: torch.device
    mode: str = "unmerged"
    memory: MemoryReport | None = None
    note: str | None = None
    sparse_layers: tuple[str, ...] = ()

    def memory_info(self) -> dict:
        """JSON-able bytes: ``weight_bytes`` (all parameters and buffers: compressed values and
        masks; not the backend operands, which hold an inference-only layer's masks (and stacked
        ``lora_A``) once it has run, :mod:`slope.inference.operand_held`), ``sparse_layer_bytes`` (those of the
        ``sparse_layers``), ``freeze``
        (``None`` or the MemoryReport fields with ``total_before``/``total_after``)."""
        report = self.memory
        freeze = None if report is None else {**asdict(report), "total_before": report.total_before, "total_after": report.total_after}
        layers = [self.model.get_submodule(name) for name in self.sparse_layers]
        return {"weight_bytes": _nbytes(self.model), "sparse_layer_bytes": sum(_nbytes(m) for m in layers), "freeze": freeze}


def _nbytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def open_checkpoint(checkpoint_dir: str | Path) -> Checkpoint:
    """Read and verify a ``slope train`` checkpoint directory, or the newest complete checkpoint of the
    run directory holding it as ``checkpoint/`` (:func:`slope.checkpoint_store.latest_checkpoint`:
    also right after a crash interrupted a save)."""
    path = Path(checkpoint_dir)
    if not (path / "manifest.json").exists() and any((path / name).is_dir() for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old")):
        path = path / "checkpoint"  # a run directory
    if path.is_dir() and not (path / "manifest.json").exists():
        from slope.serialization.folders import describe_folder, folder_kind

        kind = folder_kind(path)
        if kind not in ("slope-train", "unknown"):  # a Hugging Face folder: say how to load it
            raise CheckpointError(f"not a `slope train` checkpoint: {describe_folder(path, kind)}")
    hint = ("pass --checkpoint a checkpoint directory (RUN/checkpoint) or the run directory holding it "
            "(train one with `slope train --out RUN`)")
    return read_checkpoint(latest_checkpoint(path, hint, optional=TRAINING_ONLY), training=False)


def _is_sparse(ckpt: Checkpoint) -> bool:
    return not ckpt.config.dense and not ckpt.dense_tail


def model_from_checkpoint(ckpt: Checkpoint, mode: str = "unmerged", device: str | torch.device = "auto") -> LoadedModel:
    """Build ``ckpt``'s model in ``mode`` (``unmerged``, ``merged`` or ``dense``; module docstring) on ``device``."""
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not an inference mode; choose one of {', '.join(MODES)}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    cfg, state = ckpt.config, ckpt.trainer_state
    check_model_config(ckpt)
    model = build_model(cfg, state["vocab_size"], state["eos_id"], lora=ckpt.lora_attached, dense_tail=ckpt.dense_tail,
                        model_config=ckpt.model_config)
    sparse_layers = tuple(name for name, _ in sparse_modules(model))
    memory = note = None
    if not _is_sparse(ckpt):
        if mode == "merged":
            raise ConfigError(
                f"{ckpt.path} is a dense checkpoint ({'--dense' if cfg.dense else 'its dense tail was reached'}): it has no "
                "sparse layers or adapters to merge; use --mode unmerged or --mode dense"
            )
        load_model_state(model, ckpt)
    elif mode == "merged":
        if ckpt.lora_attached:
            merge_lora(model)  # before loading, as prune_model(..., add_lora=True, merge_lora=True) does
        else:
            note = ("the checkpoint has no LoRA adapters (trained without lazy LoRA, or stopped before they attached): "
                    "merged mode is the inference-only sparse model without adapters")
        load_model_state(model, ckpt)
        memory = freeze_for_inference(model)
    else:
        load_model_state(model, ckpt)
        if mode == "dense":
            from slope.prune import densify

            densify(model)
            model.requires_grad_(False)
    return LoadedModel(model.to(dev).eval(), cfg, ckpt, dev, mode, memory, note, sparse_layers)


def load_trained_model(checkpoint_dir: str | Path, device: str = "auto", mode: str = "unmerged") -> LoadedModel:
    """Read the checkpoint in ``checkpoint_dir`` and build its model in ``mode`` (see :func:`model_from_checkpoint`)."""
    return model_from_checkpoint(open_checkpoint(checkpoint_dir), mode, device)


# ---------------------------------------------------------------------- slope eval
def _validation(cfg: TrainConfig, eval_batches: int | None, tokenizer: str = ""):
    """The run's data (tokenized with the run's ``tokenizer``: :attr:`Checkpoint.tokenizer`) and validation batches."""
    data = load_splits(cfg.dataset, cfg.seq_len, cfg.text_field, tokenizer)
    batches = val_batches(data.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=eval_batches or cfg.eval_batches)
    return data, batches


def _data_note(ckpt: Checkpoint, data) -> str | None:
    """A note when the data (or the tokenizer) are not those the run trained on."""
    trained_on = ckpt.trainer_state.get("data_fingerprint")
    if trained_on is None or trained_on == data.fingerprint:
        return None
    return (f"--dataset {ckpt.config.dataset}: the data (or tokenizer) differ from those the run trained on (fingerprint "
            f"{data.fingerprint}, trained on {trained_on}); the loss is not comparable with the run's")


def _evaluate(loaded: LoadedModel, batches, progress: bool | None = False) -> dict:
    """Loss, throughput and memory of ``loaded`` on ``batches``; a short warm-up forward builds the
    sparse operands first, so tokens/s measures steady-state inference. ``progress``: a bar / plain
    lines (:func:`slope.progress.display_for`)."""
    cfg, dev = loaded.config, loaded.device
    _logits(loaded.model, batches[0][0][:1, :8], dev, cfg.precision)
    _sync(dev)
    start = time.perf_counter()
    shown = iterate(batches, f"slope eval ({loaded.mode})", unit="batch", display=display_for(progress))
    loss = evaluate_loss(loaded.model, shown, dev, cfg.precision)
    _sync(dev)
    seconds = time.perf_counter() - start
    tokens = sum(y.numel() for _, y in batches)
    return {
        "mode": loaded.mode,
        "val_loss": loss,
        "val_ppl": perplexity(loss),
        "val_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        **loaded.memory_info(),
        "note": loaded.note,
    }


def eval_checkpoint(checkpoint_dir: str | Path, device: str = "auto", eval_batches: int | None = None, mode: str = "unmerged",
                    progress: bool | None = False) -> dict:
    """Validation loss / perplexity, tokens/s and parameter memory of a checkpoint in ``mode`` on its
    run's held-out split (``eval_batches`` batches; default: the run's). ``progress``: ``None`` a
    bar on a terminal and plain lines otherwise, ``True`` a bar, ``False`` nothing."""
    ckpt = open_checkpoint(checkpoint_dir)
    loaded = model_from_checkpoint(ckpt, mode, device)
    data, batches = _validation(ckpt.config, eval_batches, ckpt.tokenizer)
    result = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        **_evaluate(loaded, batches, progress),
        "unigram_loss": unigram_cross_entropy(data.train, data.val, data.vocab_size),
    }
    result["note"] = "; ".join(n for n in (result["note"], _data_note(ckpt, data)) if n) or None
    return result


def compare_checkpoint(checkpoint_dir: str | Path, device: str = "auto", eval_batches: int | None = None,
                       progress: bool | None = False) -> dict:
    """Evaluate a checkpoint in every mode (:data:`MODES`; a dense checkpoint: ``dense`` only) and check
    they agree: ``max_loss_diff`` (|Δ validation loss| vs ``unmerged``) ≤ :data:`LOSS_TOLERANCE` and
    ``max_logit_diff`` (|Δ logit| on the first validation sequence) ≤ :data:`LOGIT_TOLERANCE` of the
    run's precision give ``agree``. ``modes`` maps each mode to its :func:`eval_checkpoint`-style result."""
    ckpt = open_checkpoint(checkpoint_dir)
    cfg = ckpt.config
    data, batches = _validation(cfg, eval_batches, ckpt.tokenizer)
    modes = MODES if _is_sparse(ckpt) else ("dense",)
    results, probes = {}, {}
    for mode in modes:
        loaded = model_from_checkpoint(ckpt, mode, device)
        results[mode] = _evaluate(loaded, batches, progress)
        probes[mode] = _logits(loaded.model, batches[0][0][:1], loaded.device, cfg.precision)
        del loaded  # one model in memory at a time
    ref = modes[0]
    loss_diff = max(abs(r["val_loss"] - results[ref]["val_loss"]) for r in results.values())
    logit_diff = max(float((p - probes[ref]).abs().max()) for p in probes.values())
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "precision": cfg.precision,
        "modes": results,
        "max_loss_diff": loss_diff,
        "max_logit_diff": logit_diff,
        "loss_tolerance": LOSS_TOLERANCE[cfg.precision],
        "logit_tolerance": LOGIT_TOLERANCE[cfg.precision],
        "agree": loss_diff <= LOSS_TOLERANCE[cfg.precision] and logit_diff <= LOGIT_TOLERANCE[cfg.precision],
        "note": "; ".join(n for n in (None if _is_sparse(ckpt) else "dense checkpoint: it has one form only", _data_note(ckpt, data))
                          if n) or None,
        "unigram_loss": unigram_cross_entropy(data.train, data.val, data.vocab_size),
    }


# ---------------------------------------------------------------------- slope generate
@dataclass
class Generation:
    """A prompt's continuation: ``text`` (prompt + new tokens, decoded), token counts, decode time."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


class _TokenCounter:
    """A ``generate`` streamer that counts the new tokens on a :class:`~slope.progress.Progress`
    (``put`` gets the prompt first, then each new token)."""

    def __init__(self, progress: Progress):
        self.progress, self.prompt_seen = progress, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.progress.update(value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _check_positions(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """A model with learned position embeddings (GPT-2's ``wpe``) cannot go past its positions."""
    positions = getattr(model.config, "max_position_embeddings", None)
    learned = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == positions
               and m is not model.get_input_embeddings()]
    if learned and prompt_tokens + max_new_tokens > positions:
        room = positions - prompt_tokens
        raise ConfigError(f"the prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} exceed the model's {positions} "
                          "learned positions (its --seq-len); " + (f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"))


@torch.no_grad()
def timed_generate(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float, top_k: int | None,
                   seed: int, pad_token_id: int | None, streamer=None) -> tuple[list[int], float]:
    """Hugging Face ``generate`` (KV cache; ``temperature=0``: greedy) of ``input_ids`` ``(1, prompt)``
    after the position check and a warm-up forward on the prompt (it builds sparse operands);
    returns the prompt's and new tokens' ids and the seconds ``generate`` took."""
    _check_positions(model, input_ids.shape[1], max_new_tokens)
    model(input_ids=input_ids)
    torch.manual_seed(seed)
    sample = temperature > 0
    _sync(input_ids.device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_k=top_k if sample else None, top_p=None,
                         pad_token_id=pad_token_id, streamer=streamer)
    tokens = out[0].tolist()
    return tokens, time.perf_counter() - start


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    progress: bool | None = False,
    cuda_graphs: bool = False,
) -> Generation:
    """Continue ``prompt`` with ``loaded.model`` (Hugging Face ``generate``, KV cache) and the run's
    tokenizer; ``temperature=0`` decodes greedily. A warm-up forward on the prompt builds the sparse
    operands before timing. ``progress``: new tokens as a bar / plain lines (:func:`slope.progress.display_for`).
    ``cuda_graphs``: decode with a static KV cache under a CUDA graph instead
    (:func:`slope.inference.decode.static_decode`; CUDA only, ConfigError elsewhere)."""
    tokenizer = open_tokenizer(loaded.checkpoint.tokenizer)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("--prompt is empty; give some text to continue")
    input_ids = torch.tensor([ids], device=loaded.device)
    if cuda_graphs:
        _check_positions(loaded.model, len(ids), max_new_tokens)
        return _graph_generate(loaded, tokenizer, input_ids, max_new_tokens, temperature, top_k, seed)
    with Progress(max_new_tokens, "slope generate", unit="token", display=display_for(progress)) as shown:
        tokens, seconds = timed_generate(loaded.model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed, pad_token_id=loaded.checkpoint.trainer_state["eos_id"],
                                         streamer=_TokenCounter(shown))
    return Generation(tokenizer.decode(tokens), len(ids), len(tokens) - len(ids), seconds)


def _graph_generate(loaded, tokenizer, input_ids, max_new_tokens, temperature, top_k, seed) -> Generation:
    from slope.inference.decode import static_decode
    from slope.inference.speed import decode_text

    if loaded.device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device, not {loaded.device}; drop the flag or pass --device cuda")
    kw = dict(cuda_graphs=True, temperature=temperature, top_k=top_k, seed=seed)
    static_decode(loaded.model, input_ids, min(max_new_tokens, 4), **kw)  # warm-up: operands, auto, autotuning
    run = static_decode(loaded.model, input_ids, max_new_tokens, **kw)
    text, new = decode_text(tokenizer, run.tokens[0].tolist(), input_ids.shape[1], loaded.checkpoint.trainer_state["eos_id"])
    return Generation(text, input_ids.shape[1], new, run.prefill_s + run.decode_s)


def generate_text(checkpoint_dir: str | Path, prompt: str, *, device: str = "auto", mode: str = "unmerged", **kwargs) -> str:
    """Text of ``prompt`` + its continuation by the checkpoint's model in ``mode`` (``kwargs``: :func:`generate`'s)."""
    return generate(load_trained_model(checkpoint_dir, device, mode), prompt, **kwargs).text
