"""Top-k attention as a transformers attention implementation (``"slope_topk"``).

Each query attends only to its ``k = ⌈ratio · L⌉`` highest-scoring keys (``L``: the key length;
a query allowed fewer keys by the causal or padding mask attends to all of those), with the
softmax over the kept scores. :func:`enable_topk_attention` registers the function with
``transformers.AttentionInterface`` (and a boolean mask builder with ``AttentionMaskInterface``)
and switches a model to it, so every model that dispatches attention through the interface —
Llama, Mistral, Qwen2, Gemma (its ``softcap`` of the scores is honoured), … — uses it without
patching. Attention sinks (gpt-oss's ``s_aux``) are refused: the kept keys would need the sink in
their softmax, which this function does not model. The ratio lives in the model's
config (``topk_attention_ratio``); it is saved with the config, the implementation choice is not
(re-enable after loading; ``slope eval`` / ``slope generate`` on a model folder do, with a note).

Like eager attention it materialises the ``(batch, heads, q, L)`` scores; it is a quality knob
(sparse attention patterns), not a speed-up.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TOPK_ATTENTION", "enable_topk_attention", "topk_attention", "topk_keep"]

#: The attention implementation's name in transformers' registries.
TOPK_ATTENTION = "slope_topk"


def topk_keep(scores: torch.Tensor, allowed: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the kept keys: the ``⌈ratio·L⌉`` largest ``scores (..., q, L)`` of each query
    row, among the ``allowed`` ones (bool, broadcastable to ``scores``)."""
    length = scores.shape[-1]
    k = min(length, max(1, math.ceil(ratio * length)))
    masked = scores.masked_fill(~allowed, float("-inf"))
    top = masked.topk(k, dim=-1).indices
    return torch.zeros_like(masked, dtype=torch.bool).scatter_(-1, top, True) & allowed


def _allowed_and_bias(attention_mask, module: nn.Module, q_len: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(allowed bool, additive float bias or None)`` from the mask transformers passes: ``None``
    (causal if the module is), boolean (True = attend) or additive float (0 / large negative)."""
    if attention_mask is None:
        if not getattr(module, "is_causal", True):
            return torch.ones(q_len, kv_len, dtype=torch.bool, device=device), None
        offset = kv_len - q_len  # queries are the last q_len positions
        rows = torch.arange(q_len, device=device)[:, None] + offset
        return torch.arange(kv_len, device=device)[None, :] <= rows, None
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask, None
    return mask > torch.finfo(mask.dtype).min / 2, mask.float()


def topk_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   softcap: float | None = None, s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers attention function: ``query (b, h, q, d)``, ``key`` / ``value (b, h_kv, L, d)``
    (grouped-query heads repeated), mask as :func:`_allowed_and_bias` reads it; ``softcap`` (Gemma 2):
    scores become ``softcap · tanh(scores / softcap)`` before the mask, as in eager attention;
    ``s_aux`` (attention sinks) is an error. Returns the output ``(b, q, h, d)`` in ``query``'s dtype
    and the attention weights ``(b, h, q, L)``. Scores and softmax run in fp32."""
    ratio = getattr(module.config, "topk_attention_ratio", None)
    if ratio is None:
        raise ValueError(f"{TOPK_ATTENTION} attention needs config.topk_attention_ratio; use slope.dynamic.enable_topk_attention(model, ratio)")
    if s_aux is not None:
        raise ValueError(f"{TOPK_ATTENTION} attention does not support attention sinks (s_aux, as in gpt-oss); "
                         "keep this model's own attention implementation (use_topk_attention=False)")
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed, bias = _allowed_and_bias(attention_mask, module, query.shape[2], key.shape[2], query.device)
    if bias is not None:
        scores = scores + bias
    keep = topk_keep(scores, allowed, ratio)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a query with no allowed key (fully padded row)
    weights = F.dropout(weights, p=dropout, training=module.training).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _bool_mask(*args, **kwargs):
    """Always-materialised boolean masks (True = attend) for :func:`topk_attention`."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def enable_topk_attention(model: nn.Module, ratio: float) -> nn.Module:
    """Make ``model`` (a transformers model) use top-k attention keeping ``⌈ratio·L⌉`` keys per query.

    Registers :data:`TOPK_ATTENTION` with transformers (idempotent), stores ``ratio`` in
    ``model.config.topk_attention_ratio`` and calls ``model.set_attn_implementation``. Returns the model.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"topk_ratio must be in (0, 1] (the fraction of keys each query attends to), got {ratio!r}")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"top-k attention needs a transformers model (PreTrainedModel), got {type(model).__name__}")
    AttentionInterface.register(TOPK_ATTENTION, topk_attention)
    AttentionMaskInterface.register(TOPK_ATTENTION, _bool_mask)
    for config in _configs(model.config):
        config.topk_attention_ratio = float(ratio)
    model.set_attn_implementation(TOPK_ATTENTION)
    return model


def _configs(config):
    """``config`` and its sub-configs (multimodal models keep the text model's in ``text_config``)."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            yield from _configs(sub)
