"""Tokens per second of a checkpoint in each inference mode (``slope generate --compare``).

Every mode (``dense``, ``unmerged``, ``merged``; a dense checkpoint has one form) is loaded in turn,
decodes the same prompt, repeated ``batch`` times, with :func:`~slope.inference.decode.static_decode`
(the same loop for all, optionally under CUDA graphs), after one untimed warm-up decode (operands
built, ``auto``'s choices and Triton autotuning made there). Reported: prefill and decode tokens/s,
the weights' bytes, the greedy text (modes compute the same function, so greedy texts agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slope.config import ConfigError

__all__ = ["ModeSpeed", "compare_speed", "decode_text"]


@dataclass
class ModeSpeed:
    mode: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    weight_bytes: int
    text: str
    new_tokens: int


def decode_text(tokenizer, tokens: list[int], prompt_tokens: int, eos_id: int) -> tuple[str, int]:
    """``(text, new tokens)`` of ``tokens`` (prompt then new ones), cut after the first end-of-sequence."""
    new = tokens[prompt_tokens:]
    if eos_id in new:
        new = new[: new.index(eos_id) + 1]
    return tokenizer.decode(tokens[:prompt_tokens] + new), len(new)


def compare_speed(checkpoint_dir, prompt: str, *, device: str = "auto", max_new_tokens: int = 64, batch: int = 1,
                  cuda_graphs: bool = False, modes: tuple[str, ...] | None = None) -> list[ModeSpeed]:
    """A :class:`ModeSpeed` per inference mode of the checkpoint (module docstring)."""
    from slope.data import open_tokenizer
    from slope.evaluate import MODES, _is_sparse, model_from_checkpoint, open_checkpoint, resolve_device

    from .decode import static_decode

    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    dev = resolve_device(device)
    if cuda_graphs and dev.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device, not {dev}; drop the flag or pass --device cuda")
    ckpt = open_checkpoint(checkpoint_dir)
    modes = modes or (MODES if _is_sparse(ckpt) else ("dense",))
    tokenizer = open_tokenizer(ckpt.tokenizer)  # the run's own (a --tokenizer run keeps a copy)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("--prompt is empty; give some text to continue")
    input_ids = torch.tensor([ids] * batch, device=dev)
    eos = ckpt.trainer_state["eos_id"]
    results = []
    for mode in modes:
        loaded = model_from_checkpoint(ckpt, mode, dev)
        static_decode(loaded.model, input_ids, min(max_new_tokens, 4), cuda_graphs=cuda_graphs)  # warm-up
        run = static_decode(loaded.model, input_ids, max_new_tokens, cuda_graphs=cuda_graphs)
        text, new = decode_text(tokenizer, run.tokens[0].tolist(), len(ids), eos)
        results.append(ModeSpeed(mode, run.prefill_tokens_per_s, run.decode_tokens_per_s,
                                 loaded.memory_info()["weight_bytes"], text, new))
        del loaded
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results
