"""A recipe name that matches no module gets a hint naming the model's own block list and linears
(GPT-2's transformer.h.N, not Llama's model.layers.N)."""
import re

import pytest
import transformers as T

from slope.pruning import RecipeError, oneshot
from slope.pruning.layers import is_linear, match_targets, matching_modules, name_hint
from slope.recovery.distill import Distiller
from slope.recovery.modifiers import OutputDistillationModifier


def gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def llama():
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()


def recipe(**params):
    return {"s": {"g": {"MagnitudePruningModifier": {"sparsity": 0.5, **params}}}}


def hinted_names(message):
    """The block regex and the linear name the hint gives; both must select something real."""
    found = re.search(r"\(re:(\S+)\)", message), re.search(r"linears like (\S+?)\)", message)
    assert all(found), message
    return found[0].group(1), found[1].group(1)


@pytest.mark.parametrize("build,blocks,linear", [(gpt2, "transformer.h", "transformer.h.0.attn.c_attn"),
                                                 (llama, "model.layers", "model.layers.0.self_attn.q_proj")])
def test_hint_names_the_models_own_blocks_and_linears(build, blocks, linear):
    model = build()
    assert name_hint(model) == f"its blocks are {blocks}.0, {blocks}.1, ... (re:{blocks}.\\d+$) and its linears like {linear}"
    errors = []
    for call in (lambda: match_targets(model, ["re:layerz.\\d+$"], "M"),
                 lambda: matching_modules(model, ["blocks.0"], "M"),
                 lambda: oneshot(model, recipe(ignore=["nothing.0"]), verbose=False),
                 lambda: oneshot(model, recipe(targets=["re:nothing.\\d+$"]), verbose=False)):
        with pytest.raises(RecipeError, match="matches no module") as info:
            call()
        errors.append(str(info.value))
    for message in errors:
        assert "\n" not in message
        regex, example = hinted_names(message)
        # the hinted names select the blocks and a linear of *this* model
        block_linears = [n for n, m in model.named_modules() if n.startswith(blocks + ".") and is_linear(m)]
        assert sorted(match_targets(model, ["re:" + regex], "M")) == sorted(block_linears)
        assert list(match_targets(model, [example], "M")) == [example]
        other = "model.layers" if blocks == "transformer.h" else "transformer.h"
        assert other not in message


def test_distillation_target_hint_names_the_student():
    model = gpt2()
    with pytest.raises(RecipeError, match=r"'model.layers.1' matches no module of GPT2LMHeadModel.*transformer.h.0"):
        Distiller(model, gpt2(), OutputDistillationModifier(targets=["model.layers.1"]))


def test_model_without_blocks_lists_its_linears():
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(RecipeError, match=r"its linear modules are named 0, 2"):
        match_targets(model, ["fc1"], "M")
