"""Batched ``model.generate`` with slope's tokenizers: prompts of different lengths are padded on the
left, so each row continues exactly as its prompt alone does (decoder-only models)."""
import copy

import pytest
import torch
import transformers as T

from slope.data import open_tokenizer
from slope.dynamic.data import resolve_tokenizer
from slope.prune import prune_model
from slope.pruning.loading import shipped_tokenizer

PROMPTS = ["def add(a, b):", "import os\nimport sys\nfrom pathlib import Path\n\nclass Loader:", "x = 1"]


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.eos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return T.LlamaForCausalLM(config).eval()


def greedy(model, tok, prompts, new=8):
    enc = tok(prompts, padding=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, min_new_tokens=new)
    return [row[enc["input_ids"].shape[1]:].tolist() for row in out]


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "slope-2:4"])
def test_batched_greedy_equals_one_prompt_at_a_time(pruned):
    tok = shipped_tokenizer()
    model = tiny_llama(tok)
    if pruned:
        model = prune_model(copy.deepcopy(model), compress=True, verbose=False)
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == 3  # different lengths: the batch is padded
    alone = [greedy(model, tok, [p])[0] for p in PROMPTS]
    assert greedy(model, tok, PROMPTS) == alone  # right padding (the old default) changed the shorter prompts' texts


def test_every_tokenizer_slope_builds_pads_on_the_left_and_keeps_it_when_saved(tmp_path):
    shipped = shipped_tokenizer()
    shipped.save_pretrained(tmp_path / "saved")  # what slope export / oneshot / finetune write beside a model
    from_file = open_tokenizer(str(tmp_path / "saved" / "tokenizer.json")).to_hf()  # a --tokenizer tokenizer.json
    for tok in (shipped, T.AutoTokenizer.from_pretrained(tmp_path / "saved"), from_file, resolve_tokenizer(None, None)):
        assert tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id
        ids = tok(PROMPTS, padding=True)["input_ids"]
        assert ids[2][0] == tok.pad_token_id and ids[2][-1] != tok.pad_token_id


def test_a_folder_tokenizer_keeps_its_own_padding_side(tmp_path):
    shipped = shipped_tokenizer()
    shipped.padding_side = "right"
    shipped.save_pretrained(tmp_path / "right")
    assert open_tokenizer(str(tmp_path / "right")).to_hf().padding_side == "right"  # the user's choice
