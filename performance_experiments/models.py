"""Llama-style models and training/inference steps shared by e2e.py, memory.py and inference.py.

Models are built from configs with random weights (nothing is downloaded). A "variant" is
``dense`` or a backend name; sparse variants are pruned with :func:`slope.prune_model`
(``simulated`` means ``compress=False``). Precision ``autocast`` keeps fp32 master weights and
computes in bf16 (the usual mixed-precision training); ``bf16``/``fp32`` put the whole model in
that dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from performance_experiments.common import prune_kwargs

#: name -> (hidden, layers, heads, kv_heads, ffn, vocab). "-NL" configs are full-size layers of a
#: larger model, only N of them.
LLAMA_CONFIGS = {
    "llama-smoke": (64, 2, 4, 4, 128, 256),
    "llama-cpu-20m": (512, 4, 8, 8, 1376, 8000),
    "llama-125m": (768, 12, 12, 12, 2048, 32000),
    "llama-1b": (2048, 22, 32, 4, 5632, 32000),
    "llama2-7b-4L": (4096, 4, 32, 32, 11008, 32000),
    "llama3-8b-4L": (4096, 4, 32, 8, 14336, 128256),
}


def llama_config(name: str):
    from transformers import LlamaConfig

    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(LLAMA_CONFIGS)}")
    hidden, layers, heads, kv_heads, ffn, vocab = LLAMA_CONFIGS[name]
    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def describe(name: str) -> dict:
    hidden, layers, heads, kv_heads, ffn, vocab = LLAMA_CONFIGS[name]
    return {"model": name, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "ffn": ffn, "vocab": vocab}


def build_model(name: str, variant: str, device: torch.device, precision: str, *, lora_rank: int = 0, merge_lora: bool = False) -> nn.Module:
    """A randomly initialised Llama ``name`` on ``device``; pruned unless ``variant == "dense"``.

    ``lora_rank > 0`` attaches adapters at prune time (``merge_lora`` builds the merged form).
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(name))
    if precision in ("bf16", "fp16"):
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    if variant != "dense":
        kwargs = prune_kwargs(variant)
        if lora_rank:
            kwargs.update(add_lora=True, lora_rank=lora_rank, merge_lora=merge_lora)
        from slope import prune_model

        prune_model(model, verbose=False, **kwargs)
    return model


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "autocast"``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast")


@dataclass
class Trainer:
    """One training step of a model: loss, backward, sparse + dense optimizer steps (on CUDA the
    dense optimizer is PyTorch's fused AdamW, and ADAMWSparse runs fp32 values through the same kernel)."""

    model: nn.Module
    device: torch.device
    precision: str
    input_ids: torch.Tensor
    mask_change_freq: int = 100

    def __post_init__(self):
        from slope import sparse_modules
        from slope.optimizers import ADAMWSparse

        self.sparse_opt = ADAMWSparse(self.model, lr=1e-5, mask_change_freq=self.mask_change_freq) if any(
            True for _ in sparse_modules(self.model)) else None
        dense_params = [p for p in self.model.parameters() if p.requires_grad]
        # PyTorch's fused AdamW on CUDA (one kernel for all tensors), as ADAMWSparse uses for fp32 values
        self.dense_opt = torch.optim.AdamW(dense_params, lr=1e-5, fused=self.device.type == "cuda" or None)
        self.loss = None

    def step(self) -> None:
        with autocast(self.device, self.precision):
            loss = self.model(input_ids=self.input_ids, labels=self.input_ids, use_cache=False).loss
        loss.backward()
        if self.sparse_opt is not None:
            self.sparse_opt.step()
            self.sparse_opt.zero_grad()
        self.dense_opt.step()
        self.dense_opt.zero_grad(set_to_none=True)
        self.loss = loss.detach()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.sparse_opt, self.dense_opt) if opt is not None]


def random_tokens(vocab: int, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


def _tensors(obj, seen: set, out: list) -> None:
    """Collect distinct tensors reachable from ``obj`` (tensors, tuples/lists/dicts, objects' __dict__)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, nn.Parameter) and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()  # a wrapper subclass (e.g. a semi-structured tensor)
            _tensors([getattr(obj, name) for name in names], seen, out)
            return
        key = (str(obj.device), obj.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, seen, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, seen, out)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        _tensors(vars(obj), seen, out)


def weight_parts(model: nn.Module) -> dict:
    """Bytes of parameters, buffers and cached operands by part, every storage once (the sum is
    :func:`state_bytes`' ``weights + operands``): the SLoPe layers' cached operands first
    (``operand values``: floating storages, which hold ``values`` and ``lora_B`` where a frozen
    layer shares them; ``operand metadata``: integer storages), then each SLoPe layer tensor not
    held by an operand under its attribute name (``values``, ``mask_bits``, ``lora_A``,
    ...), then every other tensor of the model (``dense modules``: embeddings, norms, heads)."""
    from slope import sparse_modules

    seen: set = set()
    parts: dict = {}

    def add(part: str, obj) -> None:
        found: list = []
        _tensors(obj, seen, found)
        size = sum(t.untyped_storage().nbytes() for t in found)
        if size:
            parts[part] = parts.get(part, 0) + size

    layers = [m for _, m in sparse_modules(model)]
    for layer in layers:
        found: list = []
        _tensors(getattr(layer, "_operands", {}), seen, found)
        for t in found:
            part = "operand values" if t.is_floating_point() else "operand metadata"
            parts[part] = parts.get(part, 0) + t.untyped_storage().nbytes()
    for layer in layers:
        for name, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            add(name, tensor)
    add("dense modules", list(model.parameters()) + list(model.buffers()))
    return parts


def state_bytes(model: nn.Module, optimizers=()) -> dict:
    """Bytes held between steps, by kind, counting every storage once.

    ``weights`` (parameters + buffers: masks, metadata), ``grads`` (``.grad`` and the SLoPe layers'
    compressed ``values_grad``), ``optimizer`` (optimizer state), ``operands`` (the SLoPe layers'
    cached backend operands, plain tensors only: a backend's opaque handles are not counted).
    """
    from slope import sparse_modules

    seen: set = set()

    def total(objs) -> int:
        found: list = []
        for obj in objs:
            _tensors(obj, seen, found)
        return sum(t.untyped_storage().nbytes() for t in found)

    layers = [m for _, m in sparse_modules(model)]
    counts = {
        "weights": total(list(model.parameters()) + list(model.buffers())),
        "grads": total([p.grad for p in model.parameters() if p.grad is not None]
                       + [m.values_grad for m in layers if m.values_grad is not None]),
        "optimizer": total([opt.state for opt in optimizers]),
        "operands": total([getattr(m, "_operands", {}) for m in layers]),
    }
    counts["total"] = sum(counts.values())
    return counts
