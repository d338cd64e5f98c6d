"""slope.peft.SIFT against a slow dense reference: AdamW on a dense copy whose gradients are masked
to the top-|gradient| entries of the first micro-batch (computed here independently)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from slope.finetune_loop import enable_activation_checkpointing
from slope.peft import SIFT, load_sift

TARGETS = ["q_proj", "v_proj", "down_proj"]
VOCAB = 64


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def batch(step: int, micro: int = 0, rows: int = 2):
    return torch.randint(0, VOCAB, (rows, 10), generator=torch.Generator().manual_seed(1000 * step + micro))


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def reference_run(steps: int, accum: int, rate: float, checkpointing: bool = False):
    """Dense AdamW on a copy; gradients masked to the first micro-batch's top-|g| entries."""
    model = tiny_llama()
    sparse = [n for n, _ in model.named_parameters() if any(t in n for t in TARGETS)]
    probe = copy.deepcopy(model)
    loss_of(probe, batch(0, 0)).backward()
    masks = {}
    for n, p in probe.named_parameters():
        if n in sparse:
            k = min(int(rate * p.numel()) + 1, p.numel())
            top = torch.sort(p.grad.reshape(-1).abs(), descending=True, stable=True).indices[:k]
            masks[n] = torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, top, True).view(p.shape)
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in sparse)
    opt = torch.optim.AdamW([params[n] for n in sparse], lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        for micro in range(accum):
            (loss_of(model, batch(step, micro)) / accum).backward()
        for n in sparse:
            params[n].grad *= masks[n]
        opt.step()
        opt.zero_grad()
    return model, masks


@pytest.mark.parametrize("accum", [1, 2])
def test_sift_matches_dense_masked_adamw(accum):
    steps, rate = 4, 0.05
    ref, masks = reference_run(steps, accum, rate)
    model = tiny_llama()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    sift = SIFT(model, sparse_rate=rate, sparse_module=TARGETS, grad_acc=accum)
    opt = torch.optim.AdamW([p for _, p in sift.named_parameters_in_optimizer()], lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        for micro in range(accum):
            (loss_of(model, batch(step, micro)) / accum).backward()
            assert all(p.grad is None for _, p in sift.named_trainable_parameters())  # full gradients dropped
        opt.step()
        opt.zero_grad()
    sift.apply_pending()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if n.endswith("_sparse"):
            continue
        if n in sift.sparse_mapping:
            sparse = sift.sparse_mapping[n]
            assert sparse.idx.shape == (p.dim(), sparse.train_num)
            chosen = torch.zeros(p.shape, dtype=torch.bool)
            chosen[tuple(sparse.idx)] = True
            assert torch.equal(chosen, masks[n]), f"{n}: other entries than the first batch's top |gradient|"
            changed = p != original[n]
            assert changed.any() and not (changed & ~masks[n]).any(), f"{n}: an unselected entry changed"
            torch.testing.assert_close(p, ref_params[n], atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(p, original[n]), f"{n} is frozen but changed"


def test_sift_with_gradient_checkpointing_matches_plain():
    results = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=True)
            model.train()
        sift = SIFT(model, sparse_rate=0.05, sparse_module=TARGETS, gradient_checkpointing=checkpointing)
        _train_steps(model, sift, 3)
        sift.apply_pending()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("_sparse")})
    moved = 0
    for n, p in results[0].items():
        torch.testing.assert_close(results[1][n], p, atol=1e-6, rtol=1e-5)
        moved += int((p != tiny_llama().state_dict()[n]).sum()) if n.endswith("q_proj.weight") else 0
    assert moved > 0


def test_sift_counts_and_exceptions(capsys):
    model = tiny_llama()
    sift = SIFT(model, sparse_rate=0.01, sparse_module=["q_proj"], exception=["norm"])
    sift.print_trainable_parameters()
    params = dict(tiny_llama().named_parameters())
    k = sum(min(int(0.01 * p.numel()) + 1, p.numel()) for n, p in params.items() if "q_proj" in n)
    norms = sum(p.numel() for n, p in params.items() if "norm" in n)
    total = sum(p.numel() for p in params.values())
    assert sift.get_trainable_num() == k + norms
    assert capsys.readouterr().out.strip() == f"trainable params: {k + norms:,d} || all params: {total:,d} || trainable%: {100 * (k + norms) / total:.4f}"
    in_opt = dict(sift.named_parameters_in_optimizer())
    assert all(p.requires_grad for p in in_opt.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in in_opt and "q_proj" not in n)


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.01])
def test_sift_bad_rate_is_an_error(rate):
    with pytest.raises(ValueError, match=r"sparse_rate must be in \(0, 1\]"):
        SIFT(tiny_llama(), sparse_rate=rate, sparse_module=TARGETS)


def test_sift_module_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        SIFT(tiny_llama(), sparse_rate=0.01, sparse_module=["c_attn"])


def _train_steps(model, sift, steps: int) -> None:
    """``steps`` AdamW steps (lr 1e-2, no decay) of ``sift``'s increments on ``batch(step)``."""
    opt = torch.optim.AdamW(list(sift.parameters_in_optimizer()), lr=1e-2, weight_decay=0.0)
    for step in range(steps):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()


def _trained_sift(steps: int = 3):
    model = tiny_llama()
    sift = SIFT(model, sparse_rate=0.05, sparse_module=TARGETS, exception=["norm"])
    _train_steps(model, sift, steps)
    return model, sift


def test_sift_increments_save_alone_load_onto_a_fresh_base_and_come_off(tmp_path):
    import os

    model, sift = _trained_sift()
    sift.save_pretrained(tmp_path)  # applies the last pending increment first
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("_sparse")}
    base = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    size = os.path.getsize(tmp_path / "sift_delta.safetensors")
    assert size < 0.25 * sum(p.numel() * 4 for p in base.values())  # the increments, not the model
    fresh = load_sift(tiny_llama(), tmp_path)
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=1e-6, msg=name)
        if any(t in name for t in TARGETS):  # only the k chosen entries moved
            assert int((p != base[name]).sum()) <= int(0.05 * p.numel()) + 1 and not torch.equal(p, base[name]), name
    load_sift(fresh, tmp_path, sign=-1)
    for name, p in fresh.named_parameters():
        if any(t in name for t in TARGETS):
            torch.testing.assert_close(p, base[name], rtol=0, atol=1e-6, msg=name)


def test_sift_saving_errors(tmp_path):
    model, sift = _trained_sift(steps=1)
    sift.save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="differ from those of the base model"):
        load_sift(tiny_llama(seed=1), tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="SIFT.save_pretrained"):
        load_sift(tiny_llama(), tmp_path / "missing")
    untrained = SIFT(tiny_llama(), sparse_rate=0.05, sparse_module=TARGETS)
    with pytest.raises(ValueError, match="train at least one step"):
        untrained.save_pretrained(tmp_path / "e")


def test_sift_refuses_the_weights_of_slope_layers():
    """A pruned model's 2:4 values never get a dense gradient: SIFT would train nothing."""
    import slope
    from slope.peft import SIFT

    model = slope.prune_model(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)), verbose=False)
    with pytest.raises(ValueError, match="a SLoPe 2:4 layer's weights"):
        SIFT(model, sparse_rate=0.01, sparse_module=["0."])


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("_sparse")}


def test_state_dict_holds_the_last_step_and_the_entries_not_the_increments(tmp_path):
    """The optimizer's last update waits in the increment until the next forward; saving must include it."""
    model, sift = _trained_sift()
    state = model.state_dict()  # no forward since the last step
    assert not any(k.endswith("_sparse") for k in state)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[f"sift.{name}.indices"], sift.sparse_mapping[name].flat_idx)
    sift.apply_pending()  # (a no-op now: state_dict applied it)
    for n, w in _weights(model).items():
        assert torch.equal(state[n], w), n
    model.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    for n, p in plain.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n]), n
    reloaded = tiny_llama()
    again = SIFT(reloaded, sparse_rate=0.05, sparse_module=TARGETS, exception=["norm"])
    missing, unexpected = reloaded.load_state_dict(state)  # strict: the sift.* keys are taken, *_sparse not missed
    assert torch.equal(again.sparse_mapping[name].flat_idx, sift.sparse_mapping[name].flat_idx)
    assert torch.equal(again.sparse_mapping[name].base_values, sift.sparse_mapping[name].base_values)


def test_trainer_resume_continues_on_the_same_entries(tmp_path):
    """8 Trainer steps straight == 4 steps, then a resumed run's 4 (AdamW moments on the same entries)."""
    ids = torch.randint(0, VOCAB, (32, 10), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in ids]

    def run(out, resume=None):
        model = tiny_llama()
        sift = SIFT(model, sparse_rate=0.02, sparse_module=TARGETS)
        opt = torch.optim.AdamW(list(sift.parameters_in_optimizer()), lr=1e-2, weight_decay=0.0)
        args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=8, save_steps=4,
                                              lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train(resume_from_checkpoint=resume)
        sift.apply_pending()
        return model, sift

    straight, s1 = run(tmp_path / "a")
    resumed, s2 = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    for name, sparse in s1.sparse_mapping.items():
        assert torch.equal(sparse.flat_idx, s2.sparse_mapping[name].flat_idx), name
    resumed_weights = _weights(resumed)
    for n, w in _weights(straight).items():
        torch.testing.assert_close(resumed_weights[n], w, rtol=0, atol=1e-7, msg=n)


def test_bf16_increments_reload_bit_exact(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    sift = SIFT(model, sparse_rate=0.05, sparse_module=TARGETS)
    _train_steps(model, sift, 3)
    sift.save_pretrained(tmp_path)
    fresh = load_sift(tiny_llama().to(torch.bfloat16), tmp_path)
    trained = _weights(model)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, trained[n]), n
    load_sift(fresh, tmp_path, sign=-1)
    for n, p in tiny_llama().to(torch.bfloat16).named_parameters():
        assert torch.equal(dict(fresh.named_parameters())[n], p), n


def test_a_user_set_idx_is_trained_and_checked():
    """SIFT's "customize the selection": set sparse_mapping[n].idx ((ndim, k) coordinates) before training."""
    import numpy as np

    model, base = tiny_llama(), _weights(tiny_llama())
    sift = SIFT(model, sparse_rate=0.05, sparse_module=["q_proj"])
    name = "model.layers.0.self_attn.q_proj.weight"
    sparse, p = sift.sparse_mapping[name], dict(model.named_parameters())[name]
    chosen = np.arange(sparse.train_num) * 3
    sparse.idx = np.stack(np.unravel_index(chosen, tuple(p.shape)))
    _train_steps(model, sift, 2)
    sift.apply_pending()
    moved = (p != base[name]).reshape(-1).nonzero().reshape(-1)
    assert moved.numel() > 0 and set(moved.tolist()) <= set(chosen.tolist())
    sparse.idx = sparse.idx[:, :1]
    with pytest.raises(ValueError, match="idx was changed after SIFT chose its entries"):
        loss_of(model, batch(0)).backward()
    other = SIFT(tiny_llama(), sparse_rate=0.05, sparse_module=["q_proj"])
    other.sparse_mapping[name].idx = np.zeros((2, 3), dtype=np.int64)  # 3 entries, not k
    with pytest.raises(ValueError, match="SIFT trains .* entries of .*q_proj.weight"):
        loss_of(other.model, batch(0)).backward()


def test_tied_weights_hint_and_load_sift_file_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="lm_head.weight is tied to transformer.wte.weight.*name it instead"):
        SIFT(gpt2, sparse_rate=0.01, sparse_module=["lm_head"])
    model, sift = _trained_sift(steps=1)
    sift.save_pretrained(tmp_path)
    weights, config = tmp_path / "sift_delta.safetensors", tmp_path / "sift_config.json"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(".values"))
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match=f"sift_delta.safetensors lacks the tensor '{key}'"):
        load_sift(fresh, tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), tiny_llama().parameters()))  # untouched
    data = open(weights, "rb").read()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="sift_delta.safetensors is not a readable safetensors file"):
        load_sift(tiny_llama(), tmp_path)
    config.write_text('{"sparse_rate": 0.05}')
    with pytest.raises(ValueError, match="sift_config.json lacks the record of the increments' base model"):
        load_sift(tiny_llama(), tmp_path)
