"""Calibration data, and running a model block by block with hooks on its own modules.

- :func:`calibration_samples`: ``int64 (1, L)`` token windows from a dataset.
- :func:`capture_block_calls`: one forward of the model per sample, stopped before the last
  block runs, records what each block is called with (the hidden states of block 0, and every
  block's other arguments: attention masks, rotary embeddings, ... by reference).
- :class:`BlockRunner`: replays block ``k`` on the current hidden states of every sample, so a
  pipeline holds one block's activations (inputs and outputs of all samples) plus the model.
- :class:`LayerStats`: per-linear statistics gathered by forward hooks during a replay: the
  squared input norms ``Σ x_j²`` (Wanda, OWL) and the Hessian ``2 X Xᵀ / n`` (SparseGPT).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = [
    "BlockCall", "BlockRunner", "CalibrationError", "LayerStats", "attach_stats", "calibration_samples", "capture_block_calls",
]


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message says what to pass instead."""


# ---------------------------------------------------------------------- data
def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode") and not callable(tokenizer):  # tokenizers.Tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # whole documents: no length warning


def _eos_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and hasattr(tokenizer, "token_to_id"):
        eos = tokenizer.token_to_id("<|endoftext|>")
    return eos


def _documents(dataset, text_field: str):
    if isinstance(dataset, str):
        from slope.data import read_documents

        return read_documents(dataset, text_field)
    if isinstance(dataset, (list, tuple)) and all(isinstance(d, str) for d in dataset):
        return iter(dataset)
    raise CalibrationError(
        f"dataset must be 'embedded', a .txt/.jsonl file, a Hugging Face dataset name, a list of strings or an int64 "
        f"tensor of token ids; got {type(dataset).__name__}"
    )


def _windows(stream: torch.Tensor, num_samples: int, length: int, spread: bool) -> list[torch.Tensor]:
    if stream.numel() == 0:
        raise CalibrationError("the calibration set is empty (no tokens); pass text or token ids")
    count = stream.numel() // length
    if count == 0:
        return [stream[None, :]]
    wanted = min(count, num_samples)
    stride = count // wanted if spread else 1
    return [stream[None, i * stride * length : (i * stride + 1) * length] for i in range(wanted)]


def calibration_samples(dataset, tokenizer=None, num_samples: int = 512, max_seq_length: int = 512,
                        text_field: str = "text") -> list[torch.Tensor]:
    """Up to ``num_samples`` windows of ``max_seq_length`` tokens, each ``int64 (1, L)``.

    ``dataset``: an int64 tensor of token ids (``(n, L)``: its first rows, truncated; 1-D: windows spread
    evenly over the stream), or text: ``"embedded"``, a ``.txt`` / ``.jsonl`` file, a Hugging Face
    dataset name (needs internet) or a list of strings, tokenized with ``tokenizer`` (an HF tokenizer
    or a ``tokenizers.Tokenizer``) and concatenated (documents separated by EOS) until there are
    enough tokens; then consecutive windows (a named source: from its training split only, see
    :func:`_text_stream`). A stream shorter than one window is one shorter sample.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise CalibrationError(f"num_calibration_samples must be a positive integer, got {num_samples!r}")
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise CalibrationError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    if dataset is None:
        raise CalibrationError("this recipe needs calibration data: pass dataset= (slope oneshot --dataset): 'embedded', "
                               "a .txt/.jsonl file, a list of strings, or token ids")
    if isinstance(dataset, torch.Tensor):
        if dataset.dtype not in (torch.int64, torch.int32) or dataset.dim() not in (1, 2):
            raise CalibrationError(f"token ids must be an int64 tensor (n, L) or (tokens,), got {dataset.dtype} {tuple(dataset.shape)}")
        if dataset.dim() == 2:
            if dataset.numel() == 0:
                raise CalibrationError("the calibration set is empty (no tokens); pass text or token ids")
            return [row[None, :max_seq_length].long() for row in dataset[:num_samples]]
        return _windows(dataset.long(), num_samples, max_seq_length, spread=True)
    if tokenizer is None:
        raise CalibrationError("tokenizing the calibration text needs a tokenizer: pass tokenizer= (e.g. the model's AutoTokenizer)")
    stream = _text_stream(dataset, tokenizer, num_samples * max_seq_length, text_field)
    return _windows(stream, num_samples, max_seq_length, spread=False)


def _text_stream(dataset, tokenizer, need: int, text_field: str) -> torch.Tensor:
    """``int64 (tokens,)``: the documents tokenized and concatenated (EOS after each). A named source
    (``"embedded"``, a file, a Hugging Face dataset) gives the *training* part of slope's split
    (:func:`slope.data.split_chunks`), so calibration never sees the text ``slope eval`` holds out;
    with slope's own tokenizer that is exactly the stream ``slope train`` trains on. A list of strings
    is the user's calibration set and is used whole."""
    from slope.data.dataset import MAX_CHUNK, VAL_EVERY, split_chunks

    named = isinstance(dataset, str)
    # enough tokens for `need` training tokens, and a prefix long enough to split as the whole stream does
    enough = max(need * VAL_EVERY // (VAL_EVERY - 1) + MAX_CHUNK, VAL_EVERY * MAX_CHUNK) if named else need
    eos, ids = _eos_id(tokenizer), []
    for doc in _documents(dataset, text_field):
        if not named and not doc.strip():
            continue
        ids.extend(_encode(tokenizer, doc))
        if eos is not None:
            ids.append(eos)
        if len(ids) >= enough:
            break
    stream = torch.tensor(ids, dtype=torch.int64)
    return split_chunks(stream)[0] if named else stream


# ---------------------------------------------------------------------- running blocks
@dataclass
class BlockCall:
    """How one block was called for one sample: the positional arguments after the hidden states,
    the keyword arguments, and whether the hidden states were passed as ``hidden_states=``."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool = False


class _Stop(Exception):
    pass


def _forward_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, samples: list[torch.Tensor], device: torch.device
                        ) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """``(hidden, calls)``: ``hidden[i]`` is block 0's input for sample ``i``; ``calls[i][k]`` how block
    ``k`` was called. The forward stops before the last block runs (nothing after it is computed)."""
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = []

    def pre_hook(k):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            as_kwarg = not args
            h = kwargs.pop("hidden_states") if as_kwarg else args[0]
            if k == 0:
                hidden.append(h.detach())
            calls[-1].append(BlockCall(tuple(args[1:]), kwargs, as_kwarg))
            if k == len(blocks) - 1:
                raise _Stop
        return hook

    handles = [block.register_forward_pre_hook(pre_hook(k), with_kwargs=True) for k, block in enumerate(blocks)]
    extra = _forward_kwargs(model)
    try:
        for ids in samples:
            calls.append([])
            try:
                model(input_ids=ids.to(device), **extra)
            except _Stop:
                pass
            if len(calls[-1]) != len(blocks):
                raise RuntimeError(f"{type(model).__name__}'s forward called {len(calls[-1])} of its {len(blocks)} blocks; "
                                   "block-by-block calibration needs every block called once per forward")
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


class BlockRunner:
    """Replays block ``k`` of ``blocks`` for every sample (see :func:`capture_block_calls`)."""

    def __init__(self, blocks: nn.ModuleList, calls: list[list[BlockCall]]):
        self.blocks, self.calls = blocks, calls

    @torch.no_grad()
    def run(self, k: int, hidden: list[torch.Tensor], keep: bool = True) -> list[torch.Tensor]:
        """Block ``k``'s outputs (hidden states) for the inputs ``hidden`` (one tensor per sample);
        ``keep=False`` runs the block for its hooks only and returns ``[]`` (no outputs held)."""
        outputs = []
        for h, per_sample in zip(hidden, self.calls):
            call = per_sample[k]
            out = (self.blocks[k](*call.args, hidden_states=h, **call.kwargs) if call.hidden_as_kwarg
                   else self.blocks[k](h, *call.args, **call.kwargs))
            if keep:
                outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outputs


# ---------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    """Statistics of one linear's inputs ``x (..., in)`` over the calibration tokens (fp32).

    ``kind``: ``"norms"`` (``Σ x_j²`` per input feature) or ``"hessian"`` (``H = 2 X Xᵀ / n`` as a
    running mean, whose diagonal also gives the norms)."""

    name: str
    in_features: int
    kind: str
    device: torch.device
    tokens: int = 0
    _sum: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        shape = (self.in_features,) if self.kind == "norms" else (self.in_features, self.in_features)
        self._sum = torch.zeros(shape, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, self.in_features).float()
        total = self.tokens + X.shape[0]
        if self.kind == "norms":
            self._sum += X.square().sum(0)
        else:
            self._sum.mul_(self.tokens / total).addmm_(X.t(), X, alpha=2.0 / total)
        self.tokens = total

    def squared_norms(self) -> torch.Tensor:
        """``(in,)`` ``Σ_tokens x_j²``."""
        return self._sum if self.kind == "norms" else self._sum.diagonal() * (self.tokens / 2)

    def hessian(self) -> torch.Tensor:
        """``(in, in)`` ``2 X Xᵀ / n``."""
        if self.kind != "hessian":
            raise RuntimeError(f"{self.name}: Hessian requested from norm statistics")
        return self._sum


def attach_stats(layers, kind: str, device: torch.device) -> tuple[dict[str, LayerStats], list]:
    """Forward hooks on ``layers`` (:class:`~slope.pruning.layers.LayerPlan`) gathering ``kind`` statistics;
    returns ``({name: stats}, handles)`` (remove the handles when done)."""
    stats, handles = {}, []
    for layer in layers:
        s = LayerStats(layer.name, layer.shape[1], kind, device)
        stats[layer.name] = s
        handles.append(layer.module.register_forward_hook(lambda mod, args, out, s=s: s.add(args[0])))
    return stats, handles

