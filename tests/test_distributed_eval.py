"""``evaluate_loss(..., across_ranks=True)``: each of 2 gloo ranks evaluates its share of the
validation batches (an uneven count: one rank repeats a batch it does not count) and every rank
returns the mean one process computes over all of them, for a plain model and a pruned model
sharded by FSDP2 (whose forwards are collectives, so the ranks' forward counts must pair up). Also:
an inference-only state (no M_t) loaded into the sharded model gets the M_t of its weights, with
the values sharded or replicated."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402

pytestmark = pytest.mark.distributed

WORKER = r'''
import json, sys
import torch, transformers
import slope
from slope.evaluate import evaluate_loss
from slope.parallel import destroy_distributed, init_distributed, wrap_fsdp2

env = init_distributed(backend="gloo")
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
model = slope.prune_model(transformers.LlamaForCausalLM(config), verbose=False)
batches = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))) for _ in range(5)]
forwards = []
model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
one_process = evaluate_loss(model, batches, torch.device("cpu"), "fp32")
across = evaluate_loss(model, batches, torch.device("cpu"), "fp32", across_ranks=True)
plain_forwards = len(forwards) - 5
wrap_fsdp2(model)
sharded = evaluate_loss(model, batches, torch.device("cpu"), "fp32", across_ranks=True)
try:  # ranks holding different batches: one clear error on each rank, not a hang
    evaluate_loss(model, batches[: 4 + env.rank], torch.device("cpu"), "fp32", across_ranks=True)
    mismatch = None
except ValueError as exc:
    mismatch = str(exc)
# the state of an inference-only model (no M_t) loaded into the sharded model: M_t of the loaded
# weights on every rank (the values' owner computes it), as one process gets
import copy
from slope.lora import freeze_for_inference
from slope.parallel import full_model_state_dict, load_full_model_state_dict
torch.manual_seed(1)
other = slope.prune_model(transformers.LlamaForCausalLM(config), verbose=False)
want = {name: layer.mask_t_bits.clone() for name, layer in slope.sparse_modules(other)}
frozen = copy.deepcopy(other)
freeze_for_inference(frozen)
load_full_model_state_dict(model, frozen.state_dict())
got = full_model_state_dict(model)
mask_t_rebuilt = all(torch.equal(got[f"{name}.mask_t_bits"], bits) for name, bits in want.items())
replicated = wrap_fsdp2(slope.prune_model(transformers.LlamaForCausalLM(config), verbose=False), shard_values=False)
load_full_model_state_dict(replicated, frozen.state_dict())  # values on every rank: each rank computes M_t
got = full_model_state_dict(replicated)
mask_t_rebuilt &= all(torch.equal(got[f"{name}.mask_t_bits"], bits) for name, bits in want.items())
result = {"one_process": one_process, "across": across, "sharded": sharded, "forwards": plain_forwards, "mismatch": mismatch,
          "mask_t_rebuilt": mask_t_rebuilt}
(__import__("pathlib").Path(sys.argv[1]) / f"eval_rank{env.rank}.json").write_text(json.dumps(result))
destroy_distributed(env)  # (a rank that exits with the gloo group alive may abort at exit under load)
'''


def test_each_rank_evaluates_its_share_and_all_return_the_mean(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launch([str(worker), str(tmp_path)], tmp_path, world=2, timeout=240)
    results = [json.loads((tmp_path / f"eval_rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["across"] == pytest.approx(result["one_process"], rel=1e-12)
        assert result["sharded"] == pytest.approx(result["one_process"], rel=1e-5)
        assert result["forwards"] == 3  # ceil(5 / 2): rank 0 counts batches 0, 2, 4; rank 1 counts 1, 3 and repeats 0
        assert "different numbers of validation batches" in result["mismatch"]
        assert result["mask_t_rebuilt"]
    assert results[0]["one_process"] == results[1]["one_process"]


def test_one_process_reads_the_batches_as_it_evaluates_them():
    """Without ``across_ranks`` the batches are consumed one at a time (a progress iterator over
    them advances with the work; a generator is not read into memory first)."""
    import torch
    import transformers

    from slope.evaluate import evaluate_loss

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model, events = transformers.LlamaForCausalLM(config), []
    model.register_forward_pre_hook(lambda *args: events.append("forward"))

    def batches():
        for i in range(3):
            events.append(f"batch {i}")
            yield torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))

    evaluate_loss(model, batches(), torch.device("cpu"), "fp32")
    assert events == ["batch 0", "forward", "batch 1", "forward", "batch 2", "forward"]
    with pytest.raises(ValueError, match="no validation batches"):
        evaluate_loss(model, [], torch.device("cpu"), "fp32")
