"""``slope apply`` says each note once per run, not once per train stage (slope.notes.said_once)."""
import warnings

import pytest
import torch
import transformers as T
import yaml

from slope.cli import main
from slope.notes import said_once
from slope.pruning.loading import shipped_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

UNUSED_BACKEND = "note: backend='cutlass' is not used"


def test_two_train_stages_say_a_shared_note_once(tmp_path, capsys):
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                       ).save_pretrained(tmp_path / "dense")
    shipped_tokenizer().save_pretrained(tmp_path / "dense")
    recipe = {"prune": {"run_type": "oneshot", "g": {"MagnitudePruningModifier": {"sparsity": 0.5}}},
              "first": {"run_type": "train", "g": {"ConstantPruningModifier": {"start": 0}}},
              "second": {"run_type": "train", "g": {"ConstantPruningModifier": {"start": 0}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    status = main(["apply", "--model", str(tmp_path / "dense"), "--recipe", str(tmp_path / "r.yaml"),
                   "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--per-device-train-batch-size", "2",
                   "--max-seq-length", "16", "--eval-batches", "1", "--num-calibration-samples", "4",
                   "--backend", "cutlass"])  # backend without --double-pruning: a note every train stage would give
    err = capsys.readouterr().err
    assert status == 0, err
    assert (tmp_path / "out" / "stage_second" / "summary.json").exists()
    assert err.count(UNUSED_BACKEND) == 1, err


def test_said_once_drops_repeats_and_keeps_notes_that_differ():
    def run():
        for text in ("a note", "a note", "another note", "a note"):
            warnings.warn(text, UserWarning)
        warnings.warn("a note", DeprecationWarning)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        said_once()(run)()
        said_once()(run)()  # each call afresh
    shown = [(w.category, str(w.message)) for w in caught]
    assert shown == 2 * [(UserWarning, "a note"), (UserWarning, "another note"), (DeprecationWarning, "a note")]
