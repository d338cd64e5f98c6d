"""Decoding with a static KV cache, optionally under a CUDA graph: no host work per token.

:func:`static_decode` prefills ``input_ids (B, P)`` into a Hugging Face ``StaticCache`` of
``P + max_new_tokens`` positions, then decodes one token per step. Every step reuses the same input
tensors (``ids (B, 1)`` and ``cache_position (1,)``, advanced in place on the device) and the
same cache, so with ``cuda_graphs=True`` the step is captured once into a ``torch.cuda.CUDAGraph``
and replayed: one launch of the whole model per token, nothing rebuilt on the host (slope's layers
look up their operands only while capturing; the cutlass-sm90 GEMMs are bound once,
:class:`slope.kernels.cutlass_sm90_lib.Sm90Library`). Tokens are chosen on the device (greedy
``argmax`` or temperature / top-k sampling) and read back once at the end: no host sync per token,
so every sequence gets ``max_new_tokens`` (text is cut at the end-of-sequence token afterwards).

The first decode step runs eagerly on a side stream before capture (the warm-up CUDA graphs need;
also where ``backend="auto"`` times the decode shapes and Triton autotunes), and its token is kept.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["DecodeResult", "cache_keyword", "static_decode"]


@dataclass
class DecodeResult:
    """``tokens (B, P + new)`` int64 on the CPU (prompt then new tokens); timings in seconds:
    ``prefill_s`` (prompt forward and first token), ``decode_s`` (the remaining ``new - 1`` steps)."""

    tokens: torch.Tensor
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    cuda_graphs: bool

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.tokens.shape[0] * self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (all sequences of the batch)."""
        return self.tokens.shape[0] * max(self.new_tokens - 1, 0) / max(self.decode_s, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _choose(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """``(B,)`` next tokens from ``logits (B, vocab)``, on the device, without a host sync."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


@torch.no_grad()
def static_decode(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, cuda_graphs: bool = False,
    temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
) -> DecodeResult:
    """Greedy (``temperature=0``) or sampled continuation of ``input_ids (B, P)`` int64 by a Hugging
    Face causal LM ``model`` (in eval mode, on ``input_ids``' device); see the module docstring.
    ``cuda_graphs`` needs a CUDA device (ValueError otherwise)."""
    return _static_decode(model, input_ids, max_new_tokens, cuda_graphs, temperature, top_k, seed)


def cache_keyword(model: nn.Module) -> str:
    """The keyword (and output field) of a Hugging Face causal LM's KV cache: ``"cache"`` since
    transformers 5.25 (``past_key_values`` is deprecated there, removed in 5.40), before it
    ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _static_decode(model, input_ids, max_new_tokens, cuda_graphs, temperature, top_k, seed) -> DecodeResult:
    from transformers import StaticCache

    device = input_ids.device
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, the model runs on {device}: drop --cuda-graphs or use --device cuda")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt) with a non-empty prompt, got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, prompt = input_ids.shape
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = {cache_keyword(model): StaticCache(config=model.config, max_cache_len=prompt + max_new_tokens)}
    out_tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)

    _sync(device)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, **cache, use_cache=True,
                   cache_position=torch.arange(prompt, device=device)).logits[:, -1]
    out_tokens[:, 0] = _choose(logits, temperature, top_k, generator)
    _sync(device)
    prefill_s = time.perf_counter() - start

    ids = out_tokens[:, :1].clone()  # the step's static inputs, advanced in place
    position = torch.full((1,), prompt, dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        logits = model(input_ids=ids, **cache, use_cache=True, cache_position=position).logits[:, -1]
        position.add_(1)
        return logits

    start = time.perf_counter()
    first = 1
    if cuda_graphs and max_new_tokens > 1:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: a real step (its token is kept)
            out_tokens[:, 1] = _choose(step(), temperature, top_k, generator)
            ids.copy_(out_tokens[:, 1:2])
        torch.cuda.current_stream(device).wait_stream(side)
        first = 2
        graph = torch.cuda.CUDAGraph()
        # "relaxed": the capture may bind a cutlass-sm90 GEMM for the graph pool's addresses, whose
        # CUTLASS initialize() sets a kernel attribute (a host-side call, not a stream operation)
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            static_logits = step()
        position.fill_(prompt + 1)  # capturing did not run the step
        run = lambda: (graph.replay(), static_logits)[1]  # noqa: E731
    else:
        run = step
    for i in range(first, max_new_tokens):
        out_tokens[:, i] = _choose(run(), temperature, top_k, generator)
        ids.copy_(out_tokens[:, i : i + 1])
    _sync(device)
    decode_s = time.perf_counter() - start
    tokens = torch.cat([input_ids, out_tokens], dim=1).cpu()
    return DecodeResult(tokens, prompt, max_new_tokens, prefill_s, decode_s, cuda_graphs)
