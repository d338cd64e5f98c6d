"""Data for ``slope train``: the embedded corpus, the shipped tokenizer (or the run's ``--tokenizer``) and the batch samplers."""
from slope.data.dataset import (
    CORPUS_FILE,
    EMBEDDED,
    EOS_TOKEN,
    TOKENIZER_FILE,
    DataError,
    TokenSplits,
    load_splits,
    load_tokenizer,
    perplexity,
    read_documents,
    split_chunks,
    split_stream,
    train_batch,
    unigram_cross_entropy,
    val_batches,
)
from slope.data.tokenizer import TextTokenizer, open_tokenizer

__all__ = [
    "CORPUS_FILE",
    "DataError",
    "EMBEDDED",
    "EOS_TOKEN",
    "TOKENIZER_FILE",
    "TextTokenizer",
    "TokenSplits",
    "load_splits",
    "load_tokenizer",
    "open_tokenizer",
    "perplexity",
    "read_documents",
    "split_chunks",
    "split_stream",
    "train_batch",
    "unigram_cross_entropy",
    "val_batches",
]
