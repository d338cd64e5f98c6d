"""Data of :func:`slope.dynamic.sparse_finetune`: documents → tokens → epochs of fixed windows.

``dataset`` is ``"embedded"`` (the corpus shipped with slope), a local ``.txt`` / ``.jsonl`` /
``.jsonl.gz`` file, a list of strings, or a Hugging Face dataset name (needs ``datasets`` and a
network). Documents are tokenized with the model's tokenizer, joined with its end-of-text token
and split deterministically into train and validation (:func:`slope.data.split_stream`: every
20th chunk is validation). Training windows (``seq_len + 1`` tokens, non-overlapping) are
shuffled once per epoch by a generator seeded with ``(seed, epoch)``: the micro-batch of a step
is a pure function of ``(seed, step, micro)``, as in ``slope train``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slope.data import DataError, load_splits, open_tokenizer, read_documents, split_stream

__all__ = ["FinetuneData", "load_finetune_data", "resolve_tokenizer"]


def resolve_tokenizer(tokenizer, model_source):
    """A ``transformers`` tokenizer: ``tokenizer`` (an object or a folder), else the one saved beside
    the model (an HF folder), else slope's shipped byte-level BPE (what ``slope train`` uses)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return AutoTokenizer.from_pretrained(str(tokenizer))
    if tokenizer is not None:
        raise TypeError(f"tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}")
    folder = Path(model_source) if isinstance(model_source, (str, Path)) else None
    if folder is not None and folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(str(folder))
    shipped = open_tokenizer("").to_hf()  # (slope.pruning.loading.shipped_tokenizer)
    shipped.slope_shipped = True  # load_finetune_data may reuse slope.data's cached tokenization
    return shipped


def _documents(dataset, text_field: str) -> list[str]:
    if isinstance(dataset, (list, tuple)):
        if not dataset or not all(isinstance(d, str) for d in dataset):
            raise DataError("dataset as a list must hold one or more strings (documents)")
        return list(dataset)
    if isinstance(dataset, (str, Path)):
        return list(read_documents(str(dataset), text_field))
    raise DataError(f"dataset must be 'embedded', a .txt/.jsonl path, a list of strings or a Hugging Face name, got {type(dataset).__name__}")


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len + 1)`` windows of a 1-D stream (window ``i`` starts at ``i·seq_len``)."""
    n = (len(tokens) - 1) // seq_len
    return torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


@dataclass
class FinetuneData:
    """Training windows ``train (n, seq_len+1)`` and validation batches of ``(x, y)``, int64."""

    train: torch.Tensor
    val: list[tuple[torch.Tensor, torch.Tensor]]
    batch_size: int
    seed: int

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    def batch(self, step: int, micro: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``micro`` of (0-based) optimizer step ``step``: ``(x, y)`` of shape ``(b, seq_len)``."""
        index = step * grad_accum + micro
        epoch, within = divmod(index, self.micro_batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train), generator=generator)
        rows = self.train[order[within * self.batch_size : (within + 1) * self.batch_size]]
        return rows[:, :-1], rows[:, 1:]


def load_finetune_data(dataset, tokenizer, *, seq_len: int, batch_size: int, seed: int, eval_batches: int,
                       vocab_size: int, text_field: str = "text", length_name: str = "seq_len",
                       tokenizer_advice: str = "pass the model's own tokenizer (tokenizer=...)") -> FinetuneData:
    """Tokenize ``dataset`` with ``tokenizer`` and cut it into windows (module docstring);
    ``length_name``: what the caller calls ``seq_len`` (for the error of a dataset too small for it);
    ``tokenizer_advice``: what the error of a token id outside the model's vocabulary tells to do."""
    if getattr(tokenizer, "slope_shipped", False) and isinstance(dataset, (str, Path)):
        splits = load_splits(str(dataset), seq_len, text_field, length_name=length_name)  # same tokens, cached per file
        train, val = splits.train, splits.val
    else:
        docs = _documents(dataset, text_field)
        ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]  # whole documents: no length warning
        eos = tokenizer.eos_token_id
        stream = [t for doc in ids for t in (doc + ([eos] if eos is not None else []))]
        train, val = split_stream(torch.tensor(stream, dtype=torch.int64), seq_len, length_name)
    largest = int(max(train.max(), val.max()))
    if largest >= vocab_size:
        raise DataError(
            f"the tokenizer produces token id {largest} but the model's vocabulary has {vocab_size} entries; {tokenizer_advice}"
        )
    val_windows = _windows(val, seq_len)[: eval_batches * batch_size]
    val_batches = [(w[:, :-1], w[:, 1:]) for w in torch.split(val_windows, batch_size)]
    return FinetuneData(_windows(train, seq_len), val_batches, batch_size, seed)
