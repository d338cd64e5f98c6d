"""slope.data: the shipped corpus and tokenizer, the deterministic split, batch sampling, baseline."""
import gzip
import json
import math
import random
from collections import Counter

import pytest
import torch

from slope.data import (
    CORPUS_FILE,
    TOKENIZER_FILE,
    DataError,
    load_splits,
    load_tokenizer,
    read_documents,
    split_stream,
    train_batch,
    unigram_cross_entropy,
    val_batches,
)
from slope.data.dataset import DATA_DIR, VAL_EVERY


def test_shipped_data_is_small_and_present():
    shipped = [p for p in DATA_DIR.iterdir() if p.suffix in (".gz", ".json", ".txt")]
    assert CORPUS_FILE in shipped and TOKENIZER_FILE in shipped
    assert sum(p.stat().st_size for p in shipped) <= 5 * 1024 * 1024
    notice = (DATA_DIR / "CORPUS.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in notice


def test_embedded_corpus_is_python_source():
    docs = list(read_documents("embedded"))
    assert len(docs) > 100
    assert any("def " in d and "import " in d for d in docs)


def test_tokenizer_round_trips_arbitrary_text():
    tok = load_tokenizer()
    rng = random.Random(1)
    alphabet = "abcXYZ 019\n\t{}()é漢字🙂\\\"'"
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert max(ids) < tok.get_vocab_size()


def test_split_partitions_the_stream_deterministically():
    tokens = torch.randint(0, 100, (50_000,))
    train, val = split_stream(tokens, seq_len=16)
    assert len(train) + len(val) == len(tokens)
    assert abs(len(val) / len(tokens) - 1 / VAL_EVERY) < 0.02
    # Tag every position: each appears exactly once in train ∪ val.
    positions = torch.arange(len(tokens))
    ptrain, pval = split_stream(positions, seq_len=16)
    assert torch.equal(torch.sort(torch.cat([ptrain, pval])).values, positions)
    assert torch.equal(train, tokens[ptrain]) and torch.equal(val, tokens[pval])
    train2, val2 = split_stream(tokens.clone(), seq_len=16)
    assert torch.equal(train, train2) and torch.equal(val, val2)


def test_split_of_tiny_data_is_a_clear_error():
    with pytest.raises(DataError, match="too small"):
        split_stream(torch.arange(100), seq_len=64)


def test_train_batch_is_a_pure_function_of_seed_and_step():
    stream = torch.randint(0, 1000, (5000,))
    a = train_batch(stream, seed=3, step=7, micro=0, batch_size=4, seq_len=32)
    b = train_batch(stream, seed=3, step=7, micro=0, batch_size=4, seq_len=32)
    c = train_batch(stream, seed=3, step=8, micro=0, batch_size=4, seq_len=32)
    d = train_batch(stream, seed=4, step=7, micro=0, batch_size=4, seq_len=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    x, y = a
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_val_batches_are_disjoint_windows():
    stream = torch.arange(10_000)
    batches = val_batches(stream, batch_size=3, seq_len=50, max_batches=4)
    assert len(batches) == 4 and all(x.shape[1] == 50 for x, _ in batches)
    starts = sorted(int(x[i, 0]) for x, _ in batches for i in range(x.shape[0]))
    assert all(b - a >= 50 for a, b in zip(starts, starts[1:]))
    for x, y in batches:
        assert torch.equal(y, x + 1)


def test_unigram_cross_entropy_matches_counting():
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 7, (500,), generator=gen)
    val = torch.randint(0, 9, (200,), generator=gen)
    counts = Counter(train.tolist())
    total = len(train) + 9
    expected = -sum(math.log((counts[t] + 1) / total) for t in val.tolist()) / len(val)
    assert unigram_cross_entropy(train, val, 9) == pytest.approx(expected, rel=1e-9)


def test_local_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 3)
    assert list(read_documents(str(tmp_path / "a.txt"))) == ["hello world\n" * 3]
    lines = [json.dumps({"text": f"doc {i}", "id": i}) for i in range(3)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert list(read_documents(str(tmp_path / "b.jsonl"))) == ["doc 0", "doc 1", "doc 2"]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"body": f"x{i}"}) for i in range(2)))
    assert list(read_documents(str(tmp_path / "c.jsonl.gz"), text_field="body")) == ["x0", "x1"]


def test_local_file_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_documents(str(tmp_path / "bad.jsonl")))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="string field 'text'"):
        list(read_documents(str(tmp_path / "nofield.jsonl")))
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(str(tmp_path / "missing.txt")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        list(read_documents(str(tmp_path / "x.csv")))


def test_load_splits_of_a_local_file(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "(", ")", ":", "\n"]
    (tmp_path / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(4000)))
    splits = load_splits(str(tmp_path / "t.txt"), seq_len=16)
    assert splits.vocab_size == load_tokenizer().get_vocab_size()
    assert len(splits.val) > 16 and len(splits.train) > 10 * len(splits.val)
    assert splits.train.dtype == torch.int64 and splits.eos_id == 0
