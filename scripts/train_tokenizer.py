"""Regenerate slope/data/tokenizer.json: the byte-level BPE tokenizer shipped with slope.

Trained once on the embedded corpus (slope/data/corpus.jsonl.gz) and committed, so that every
machine tokenizes identically without a download:

    python scripts/train_tokenizer.py [--vocab-size 4096]

Byte-level: any UTF-8 text (your own data too) encodes without unknown tokens. Token 0 is
``<|endoftext|>``, appended after every document.
"""
from __future__ import annotations

import argparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slope.data import EOS_TOKEN, TOKENIZER_FILE, read_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(read_documents("embedded"), trainer=trainer)
    tokenizer.save(str(TOKENIZER_FILE))
    print(f"wrote {TOKENIZER_FILE} (vocab {tokenizer.get_vocab_size()})")


if __name__ == "__main__":
    main()
