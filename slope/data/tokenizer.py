"""The tokenizer of a run (``slope train --tokenizer PATH``): the shipped BPE, a ``tokenizer.json``
file, or a Hugging Face tokenizer folder, behind one small interface.

:func:`open_tokenizer` returns a :class:`TextTokenizer`: ``encode_batch`` (texts → token ids, no
special tokens added), ``decode``, ``vocab_size`` (the model's vocabulary: every id the tokenizer
can produce, added tokens included), ``eos_id`` (the document separator, also BOS/PAD of the
models slope builds) and :meth:`TextTokenizer.to_hf` (a ``transformers`` tokenizer to save beside
a model). Fast tokenizers encode through their ``tokenizers.Tokenizer`` directly, exactly as the
shipped BPE always did; others through ``transformers``.

A checkpoint of a run with ``--tokenizer`` holds a copy (:func:`tokenizer_files`, written into its
``tokenizer/`` folder), so ``slope eval`` / ``generate`` / ``export`` use the same tokenizer even
if the original moves.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EOS_CANDIDATES", "TextTokenizer", "open_tokenizer", "tokenizer_files"]

#: End-of-text tokens looked for (in this order) when a tokenizer does not name its EOS token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>", "[SEP]")


@dataclass(frozen=True)
class TextTokenizer:
    """``source``: the path given (``""``: the shipped BPE); ``fast``: a ``tokenizers.Tokenizer`` or
    ``None``; ``hf``: the ``transformers`` tokenizer of a folder (``None`` for a file)."""

    source: str
    fast: object | None
    hf: object | None
    vocab_size: int
    eos_id: int
    eos_token: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (``list[int]``), without special tokens."""
        if self.fast is not None:
            return [enc.ids for enc in self.fast.encode_batch(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        if self.fast is not None:
            return self.fast.decode(ids)
        return self.hf.decode(ids)

    def to_hf(self, model_max_length: int | None = None):
        """A ``transformers`` tokenizer with this EOS as its BOS/EOS (and PAD if it has none), to save
        with ``save_pretrained`` beside a model. The shipped BPE and a ``tokenizer.json`` file pad on the
        left, as batched ``model.generate`` over prompts of different lengths needs for the decoder-only
        models slope builds (right padding makes the shorter prompts continue after pad tokens: wrong
        text); slope's own batches are packed windows, never padded. A folder's tokenizer keeps its own
        ``padding_side``."""
        kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
        if self.hf is None:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_object=self.fast, bos_token=self.eos_token, eos_token=self.eos_token,
                                           pad_token=self.eos_token, unk_token=self.eos_token, padding_side="left", **kwargs)
        tok = copy.deepcopy(self.hf)
        if model_max_length is not None:
            tok.model_max_length = model_max_length
        if tok.eos_token is None:
            tok.eos_token = self.eos_token
        if tok.pad_token is None:
            tok.pad_token = self.eos_token
        return tok


def _eos(spec: str, named: str | None, vocab: dict) -> tuple[int, str]:
    for token in ([named] if named else []) + list(EOS_CANDIDATES):
        if token in vocab:
            return vocab[token], token
    from slope.data.dataset import DataError

    raise DataError(f"--tokenizer {spec}: no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}); slope separates "
                    "documents with one: give a tokenizer that has one, or a folder whose tokenizer_config.json names its eos_token")


def _from_file(spec: str, path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    from slope.data.dataset import DataError

    try:
        fast = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception on bad JSON)
        raise DataError(f"--tokenizer {spec}: not a tokenizers JSON file ({' '.join(str(e).split())}); give a tokenizer.json "
                        "or a Hugging Face tokenizer folder") from e
    eos_id, eos = _eos(spec, None, fast.get_vocab(with_added_tokens=True))
    return TextTokenizer(spec, fast, None, fast.get_vocab_size(with_added_tokens=True), eos_id, eos)


def _from_folder(spec: str, path: Path) -> TextTokenizer:
    from transformers import AutoTokenizer

    from slope.data.dataset import DataError

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds for a folder it cannot read)
        raise DataError(f"--tokenizer {spec}: cannot load a Hugging Face tokenizer from this folder "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
    eos_id, eos = _eos(spec, tok.eos_token, tok.get_vocab())
    fast = tok.backend_tokenizer if getattr(tok, "is_fast", False) else None
    return TextTokenizer(spec, fast, tok, len(tok), eos_id, eos)


def open_tokenizer(spec: str | Path = "") -> TextTokenizer:
    """The tokenizer ``spec`` names: ``""`` the shipped BPE (:data:`slope.data.TOKENIZER_FILE`), a
    ``.json`` file (``tokenizers`` format) or a Hugging Face tokenizer folder. Errors are
    :class:`slope.data.DataError` lines that say what to give instead."""
    from slope.data.dataset import TOKENIZER_FILE, DataError

    spec = str(spec)
    if not spec:
        return _from_file("", TOKENIZER_FILE)
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(spec, path)
    if path.is_dir():
        return _from_folder(spec, path)
    raise DataError(f"--tokenizer {spec}: no such file or folder (give a Hugging Face tokenizer folder or a tokenizer.json file)")


def tokenizer_files(tokenizer: TextTokenizer, folder: str, model_max_length: int | None = None) -> dict[str, bytes]:
    """The files of ``tokenizer`` as a Hugging Face folder (``save_pretrained``) named ``folder``:
    ``"folder/name"`` → bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.to_hf(model_max_length).save_pretrained(tmp)
        return {f"{folder}/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
