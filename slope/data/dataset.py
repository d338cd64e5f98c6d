"""Text data for ``slope train``: documents → one token stream → deterministic train/val split.

- ``read_documents(dataset)``: ``"embedded"`` (the shipped corpus, see ``CORPUS.txt``), a local
  ``.txt`` file (one document) or ``.jsonl`` / ``.jsonl.gz`` file (one document per record, field
  ``text``), or otherwise a Hugging Face dataset name (``name`` or ``name:config``; needs the
  ``datasets`` package and a network connection, imported only then).
- ``load_splits``: tokenizes every document (with the shipped byte-level BPE, or the run's
  ``--tokenizer``: :mod:`slope.data.tokenizer`), appends its end-of-text token, concatenates,
  and splits the stream into chunks; every 20th chunk is validation. The split depends only on the text, so it is the same on every machine.
- ``train_batch``: the micro-batch of a training step is a pure function of
  ``(seed, step, micro)``, so a resumed run sees exactly the batches of an uninterrupted one.
- ``val_batches``: a fixed list of non-overlapping validation windows.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CORPUS_FILE",
    "DataError",
    "EMBEDDED",
    "EOS_TOKEN",
    "TOKENIZER_FILE",
    "TokenSplits",
    "load_splits",
    "split_chunks",
    "load_tokenizer",
    "read_documents",
    "split_stream",
    "train_batch",
    "unigram_cross_entropy",
    "val_batches",
    "with_dataset_config",
]

DATA_DIR = Path(__file__).resolve().parent
CORPUS_FILE = DATA_DIR / "corpus.jsonl.gz"
TOKENIZER_FILE = DATA_DIR / "tokenizer.json"
EMBEDDED = "embedded"
EOS_TOKEN = "<|endoftext|>"
VAL_EVERY = 20  # one chunk in VAL_EVERY is validation (5%)
MAX_CHUNK = 2048  # tokens per chunk (smaller for small datasets, so both splits are populated)


class DataError(ValueError):
    """A dataset that cannot be read or is too small; the message says what to change."""


def load_tokenizer(path: str | Path = TOKENIZER_FILE):
    """The shipped byte-level BPE (``tokenizers.Tokenizer``); ``<|endoftext|>`` is its token 0."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _unreadable(path: Path, e: Exception) -> DataError:
    """One line for a file that is not the text its name promises (bad gzip, not UTF-8)."""
    if isinstance(e, UnicodeDecodeError):
        return DataError(f"dataset {path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8")
    hint = "; a .jsonl.gz file must be gzip-compressed JSON lines" if path.suffix == ".gz" else ""
    return DataError(f"dataset {path}: cannot read it ({e}){hint}")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    try:
        yield from _jsonl_records(path, text_field)
    except (UnicodeDecodeError, OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise _unreadable(path, e) from e


def _jsonl_records(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); a .jsonl file holds one JSON object per line") from e
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
            yield record[text_field]


def read_documents(dataset: str, text_field: str = "text") -> Iterator[str]:
    """Yield the documents (strings) of ``dataset`` (see the module docstring)."""
    if dataset == EMBEDDED:
        yield from _read_jsonl(CORPUS_FILE, "text")
        return
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _read_jsonl(path, text_field)
        elif path.suffix == ".txt":
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise _unreadable(path, e) from e
            yield text
        else:
            raise DataError(f"dataset {dataset}: unsupported file type; use a .txt, .jsonl or .jsonl.gz file")
        return
    if path.suffix in (".txt", ".jsonl", ".gz") or path.is_dir() or dataset.startswith((".", "/", "~")):
        raise DataError(f"dataset {dataset}: no such file (give a .txt/.jsonl file, 'embedded', or a Hugging Face dataset name)")
    yield from _read_hf(dataset, text_field)


def with_dataset_config(dataset: str, config: str | None) -> str:
    """``dataset`` with a Hugging Face dataset ``config`` (``--dataset_config_name``, e.g. gsm8k's
    ``main``) as ``name:config``; for the embedded corpus or a local file, which have no configs,
    ``dataset`` itself (a ``UserWarning`` says the config is ignored)."""
    if not config:
        return dataset
    if dataset == EMBEDDED or Path(dataset).expanduser().exists():
        warnings.warn(f"--dataset_config_name {config!r} applies to Hugging Face datasets; ignored for --dataset {dataset}",
                      UserWarning, stacklevel=2)
        return dataset
    return f"{dataset}:{config}"


def _read_hf(name: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"dataset {name}: not a local file, and Hugging Face datasets need the 'datasets' package "
            "(pip install datasets) and a network connection"
        ) from e
    hf_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(hf_name, config or None, split="train")
    except Exception as e:  # noqa: BLE001 (datasets raises many kinds; we re-raise with context)
        raise DataError(f"dataset {name}: could not load the Hugging Face dataset ({e})") from e
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name}: no column {text_field!r} (columns: {ds.column_names}); choose one with text_field (--text-field)")
    for record in ds:
        yield record[text_field]


@dataclass(frozen=True)
class TokenSplits:
    """Token streams of one dataset: ``train`` and ``val`` are 1-D ``int64`` tensors."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    eos_id: int
    fingerprint: str  # sha256 of both streams: identifies the data in checkpoints


def split_chunks(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` of a 1-D token stream, with no size check: chunk ``i`` is validation iff
    ``i % VAL_EVERY == VAL_EVERY // 2``; chunks are ``MAX_CHUNK`` tokens, or fewer for small data
    (streams under ``VAL_EVERY · MAX_CHUNK`` tokens). From that length on the chunks are fixed, so a
    prefix of at least that many tokens splits exactly as the whole stream does."""
    chunk = max(1, min(MAX_CHUNK, len(tokens) // VAL_EVERY))
    chunks = torch.split(tokens, chunk)
    val = [c for i, c in enumerate(chunks) if i % VAL_EVERY == VAL_EVERY // 2]
    train = [c for i, c in enumerate(chunks) if i % VAL_EVERY != VAL_EVERY // 2]
    return (torch.cat(train) if train else tokens[:0]), (torch.cat(val) if val else tokens[:0])


def split_stream(tokens: torch.Tensor, seq_len: int, length_name: str = "--seq-len") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_chunks`, refusing a split with less than one ``seq_len + 1`` window on either side
    (``length_name``: what the caller calls ``seq_len``, for the error)."""
    train_t, val_t = split_chunks(tokens)
    need = seq_len + 1
    if len(train_t) < need or len(val_t) < need:
        raise DataError(
            f"dataset too small: {len(tokens)} tokens give {len(train_t)} train / {len(val_t)} validation tokens, "
            f"but each split needs at least {need} ({length_name} + 1); use more text or a smaller {length_name}"
        )
    return train_t, val_t


def _stamp(path: Path) -> tuple | None:
    """What identifies a file's (or a folder's files') version: sizes and modification times."""
    if path.is_file():
        return (path.stat().st_mtime_ns, path.stat().st_size)
    if path.is_dir():
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.iterdir()) if p.is_file())
    return None


@lru_cache(maxsize=4)
def _tokenize(dataset: str, text_field: str, tokenizer: str, stamp: tuple | None,
              tokenizer_stamp: tuple | None) -> tuple[torch.Tensor, int, int]:
    """The whole dataset as one ``int64`` stream, its vocabulary size and EOS id (cached per version
    of the data and tokenizer files, the stamps: tokenizing the corpus takes seconds, and tests
    train many times in one process)."""
    from slope.data.tokenizer import open_tokenizer

    tok = open_tokenizer(tokenizer)
    docs = list(read_documents(dataset, text_field))
    if not docs:
        raise DataError(f"dataset {dataset}: no documents found")
    ids: list[int] = []
    for doc_ids in tok.encode_batch(docs):
        ids.extend(doc_ids)
        ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.int64), tok.vocab_size, tok.eos_id


def load_splits(dataset: str, seq_len: int, text_field: str = "text", tokenizer: str | Path = "",
                length_name: str = "--seq-len") -> TokenSplits:
    """Tokenize ``dataset`` with ``tokenizer`` (:func:`slope.data.tokenizer.open_tokenizer`: ``""`` is
    the shipped BPE, else a tokenizer.json file or a Hugging Face tokenizer folder) and split it
    deterministically (see :func:`split_stream`; ``length_name`` names ``seq_len`` in its error)."""
    path = CORPUS_FILE if dataset == EMBEDDED else Path(dataset).expanduser()
    tokenizer = str(tokenizer)
    tokenizer_stamp = _stamp(Path(tokenizer).expanduser()) if tokenizer else None
    tokens, vocab_size, eos_id = _tokenize(dataset, text_field, tokenizer, _stamp(path), tokenizer_stamp)
    train, val = split_stream(tokens, seq_len, length_name)
    digest = hashlib.sha256(train.numpy().tobytes())
    digest.update(val.numpy().tobytes())
    return TokenSplits(train, val, vocab_size, eos_id, digest.hexdigest()[:16])


def train_batch(train: torch.Tensor, *, seed: int, step: int, micro: int, batch_size: int, seq_len: int):
    """Micro-batch ``micro`` of optimizer step ``step``: random windows drawn with an RNG seeded by
    ``(seed, step, micro)`` only. Returns ``(x, y)``, ``int64 (batch_size, seq_len)``, y = x shifted."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(train) - seq_len, size=batch_size)
    windows = torch.stack([train[s : s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def val_batches(val: torch.Tensor, *, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_batches`` batches of non-overlapping windows spread evenly over ``val``
    (each ``(x, y)`` is ``int64 (b, seq_len)``, the last batch may be smaller)."""
    n_windows = (len(val) - 1) // seq_len
    wanted = min(n_windows, max_batches * batch_size)
    stride = n_windows // wanted
    starts = [i * stride * seq_len for i in range(wanted)]
    windows = torch.stack([val[s : s + seq_len + 1] for s in starts])
    return [(w[:, :-1], w[:, 1:]) for w in torch.split(windows, batch_size)]


def unigram_cross_entropy(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``val`` of the add-one-smoothed unigram distribution of
    ``train``: the loss of a model that ignores context, the baseline a trained LM must beat."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[val].mean())


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` on overflow."""
    return math.exp(loss) if loss < 700 else math.inf
