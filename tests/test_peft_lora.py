"""peft's LoRA on a pruned model (``slope.peft.get_peft_model`` with a ``peft.LoraConfig``): SLoPe
layers are wrapped like ``nn.Linear`` targets, compute ``x(W⊙M)ᵀ + b + s·(x Aᵀ)Bᵀ``, train only the
adapters (the 2:4 weights stay as they were), save and load with peft, and refuse to merge."""
import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from slope import prune_model  # noqa: E402
from slope.layer import SparseLinear  # noqa: E402
from slope.peft import SftConfig, get_peft_model, load_peft_model, sparse_lora_config  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]  # lm_head stays nn.Linear when pruning


def _pruned(seed=0):
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=128, vocab_size=256)
    torch.manual_seed(seed)
    return prune_model(transformers.LlamaForCausalLM(config), backend="reference", verbose=False)


def _ids(seed=1):
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _lora(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def test_slope_layers_are_wrapped_and_compute_the_sparse_product_plus_the_adapter():
    model = _pruned()
    wrapped = get_peft_model(model, _lora())
    layer = wrapped.base_model.model.model.layers[1].self_attn.q_proj
    base = layer.get_base_layer()
    assert isinstance(base, SparseLinear) and isinstance(layer, peft.tuners.lora.LoraLayer)
    assert isinstance(wrapped.base_model.model.lm_head.get_base_layer(), nn.Linear)
    with torch.no_grad():  # a non-zero B, so the adapter term shows
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, 64)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    expected = x.double() @ base.dense_weight().double().t() + 2.0 * (x.double() @ a.t()) @ b.t()
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_training_moves_only_the_adapters_and_keeps_the_2to4_weights():
    model = _pruned()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    ids = _ids()
    with torch.no_grad():
        reference_logits = model(input_ids=ids).logits
    wrapped = get_peft_model(model, _lora())
    with torch.no_grad():  # B starts at zero: the wrapped model is the pruned model
        assert torch.equal(wrapped(input_ids=ids).logits, reference_logits)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    base = wrapped.unload()  # the pruned model again, with its own weights
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(isinstance(m, SparseLinear) for n, m in base.named_modules() if n.endswith(("q_proj", "down_proj")))
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, reference_logits)


def test_adapters_save_and_load_onto_a_fresh_pruned_model(tmp_path):
    wrapped = get_peft_model(_pruned(), _lora())
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    wrapped.save_pretrained(tmp_path / "adapter")
    loaded = load_peft_model(_pruned(), tmp_path / "adapter")
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, wrapped(input_ids=ids).logits)
        assert not torch.equal(loaded(input_ids=ids).logits, _pruned()(input_ids=ids).logits)
    with pytest.raises(ValueError, match="not supported"):  # peft's own loader does not know SLoPe layers
        peft.PeftModel.from_pretrained(_pruned(), str(tmp_path / "adapter"))
    from_subfolder = load_peft_model(_pruned(), tmp_path, subfolder="adapter")  # (the config too: peft's kwargs)
    with torch.no_grad():
        assert torch.equal(from_subfolder(input_ids=ids).logits, wrapped(input_ids=ids).logits)


def test_merging_is_refused_in_one_line_and_changes_nothing():
    wrapped = get_peft_model(_pruned(), _lora())
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids = _ids(3)
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
    for merge in (wrapped.merge_and_unload, wrapped.base_model.merge_adapter):
        with pytest.raises(ValueError, match=r"would make its weight dense.*slope\.merge_lora") as info:
            merge()
        assert "\n" not in str(info.value)
    with torch.no_grad():
        assert torch.equal(wrapped(input_ids=ids).logits, before)


def test_unsupported_configs_and_forms_are_refused():
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(_pruned(), _lora(use_dora=True))
    for init in ("pissa", "pissa_niter_4", "olora"):  # (peft writes W - s·BA into layer.weight: a copy, for a SLoPe layer)
        with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' rewrites the base weight"):
            get_peft_model(_pruned(), _lora(init_lora_weights=init))
    with pytest.raises(TypeError, match="LoraConfig"):
        sparse_lora_config(SftConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="SftConfig or a peft LoraConfig"):
        get_peft_model(_pruned(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    from slope import merge_lora

    merged = _pruned()
    for layer in merged.modules():
        if isinstance(layer, SparseLinear):
            layer.add_lora(4)
    merge_lora(merged)
    with pytest.raises(ValueError, match="merged inference form"):
        get_peft_model(merged, _lora())


def test_all_linear_targets_the_same_layers_as_peft_does_on_the_dense_model():
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=128, vocab_size=256)

    def wrapped_names(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))

    dense = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules="all-linear"))
    pruned = prune_model(transformers.LlamaForCausalLM(config), backend="reference", skip=["layers.1.mlp.*"], verbose=False)
    sparse = get_peft_model(pruned, peft.LoraConfig(r=4, target_modules="all-linear"))
    assert wrapped_names(sparse) == wrapped_names(dense) and len(wrapped_names(dense)) == 14
    kinds = {type(m.get_base_layer()).__name__ for m in sparse.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert kinds == {"SparseLinear", "Linear"}  # pruned layers and the ones left dense (layers.1.mlp)


def test_wrapped_slope_layers_are_frozen_no_weight_gradient_and_unload_makes_them_trainable():
    """peft freezes the base model's parameters, but a SLoPe layer's ``values`` never require grad (its
    weight gradient goes to ``values_grad``): without ``sparse_requires_grad=False`` every backward
    computed ``dyᵀx`` for each frozen layer, and ADAMWSparse over the peft model stepped them."""
    from slope import sparse_modules
    from slope.optimizers import ADAMWSparse

    wrapped = get_peft_model(_pruned(), _lora())
    layers = [layer for _, layer in sparse_modules(wrapped)]
    before = [layer.values.detach().clone() for layer in layers]
    ids = _ids()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.values_grad is None for layer in layers)
    assert all(p.grad is not None for n, p in wrapped.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="frozen.*get_peft_model") as info:
        ADAMWSparse(wrapped)
    assert "\n" not in str(info.value)
    assert all(torch.equal(layer.values, v) for layer, v in zip(layers, before))
    base = wrapped.unload()
    assert all(layer.sparse_requires_grad for _, layer in sparse_modules(base))
    ADAMWSparse(base)  # the pruned model trains again


def test_loaded_adapters_leave_the_slope_layers_frozen(tmp_path):
    from slope import sparse_modules

    get_peft_model(_pruned(), _lora()).save_pretrained(tmp_path / "adapter")
    for trainable in (False, True):
        loaded = load_peft_model(_pruned(), tmp_path / "adapter", is_trainable=trainable)
        assert not any(layer.sparse_requires_grad for _, layer in sparse_modules(loaded))


def test_later_adapters_can_target_slope_layers_and_all_linear_includes_them(tmp_path):
    """``add_adapter`` / ``load_adapter`` on the peft model: peft's own injection refused new SLoPe
    targets ("not supported") and expanded ``"all-linear"`` to the already wrapped layers only."""
    from slope.peft.peft_lora import linear_layer_names

    def adapted(model, name):
        return sorted(n for n, _ in model.named_modules() if n.endswith(f"lora_A.{name}"))

    wrapped = get_peft_model(_pruned(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    all_linear = get_peft_model(_pruned(), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert linear_layer_names(wrapped.base_model.model) == linear_layer_names(_pruned()) == [
        n for n, m in all_linear.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    wrapped.add_adapter("b", peft.LoraConfig(r=2, target_modules=["k_proj"]))
    wrapped.add_adapter("c", peft.LoraConfig(r=2, target_modules="all-linear"))
    assert len(adapted(wrapped, "b")) == 2 and len(adapted(wrapped, "c")) == 14  # (2 layers × 7 SLoPe layers)
    get_peft_model(_pruned(), peft.LoraConfig(r=4, target_modules=["up_proj"])).save_pretrained(tmp_path / "up")
    wrapped.load_adapter(str(tmp_path / "up"), adapter_name="up")
    assert len(adapted(wrapped, "up")) == 2
    assert not any(m.sparse_requires_grad for m in wrapped.modules() if isinstance(m, SparseLinear))
    ids = _ids(4)
    wrapped.set_adapter("c")
    wrapped(input_ids=ids, labels=ids).loss.backward()
    assert {n.split(".")[-2] for n, p in wrapped.named_parameters() if p.grad is not None} == {"c"}


def test_a_slope_layer_in_modules_to_save_is_refused_and_a_dense_one_trains():
    """peft's trainable copy of a 2:4 layer (``modules_to_save``) never changed: its kept weights get
    no ``.grad`` for a dense optimizer (they train only with ADAMWSparse)."""
    with pytest.raises(ValueError, match=r"modules_to_save .*o_proj.*LoRA instead") as info:
        get_peft_model(_pruned(), _lora(modules_to_save=["o_proj"]))
    assert "\n" not in str(info.value)
    wrapped = get_peft_model(_pruned(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = wrapped.base_model.model.lm_head.modules_to_save["default"].weight
    before = head.detach().clone()
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(head, before)


def test_unload_leaves_layers_frozen_before_frozen():
    from slope import sparse_modules

    model = _pruned()
    layers = dict(sparse_modules(model))
    user_frozen = "model.layers.0.mlp.up_proj"
    layers[user_frozen].sparse_requires_grad = False
    base = get_peft_model(model, _lora()).unload()
    assert {name: layer.sparse_requires_grad for name, layer in sparse_modules(base)} == {
        name: name != user_frozen for name in layers}


def test_a_whole_peft_model_pickles(tmp_path):
    wrapped = get_peft_model(_pruned(), _lora())
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    torch.save(wrapped, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids = _ids(4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, wrapped(input_ids=ids).logits)
    with pytest.raises(ValueError, match="would make its weight dense"):
        loaded.merge_and_unload()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        self.ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_the_trainer_trains_the_adapters_and_saves_a_checkpoint_that_loads(tmp_path):
    """Hugging Face's Trainer on a peft model of a pruned model: the adapters train, the 2:4 weights and
    masks stay, the checkpoint's adapters load onto a fresh pruned model with the trained logits."""
    from slope import sparse_modules

    wrapped = get_peft_model(_pruned(), _lora())
    base = {n: t.detach().clone() for n, t in wrapped.base_model.model.state_dict().items() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
                                          save_strategy="steps", save_steps=4, logging_steps=1)
    transformers.Trainer(model=wrapped, args=args, train_dataset=_Tokens()).train()
    after = wrapped.base_model.model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in base.items())  # sparse values, masks, everything but the adapters
    assert all(not torch.equal(p, adapters[n]) for n, p in wrapped.named_parameters() if n in adapters and "lora_B" in n)
    assert all(layer.values_grad is None for _, layer in sparse_modules(wrapped))
    loaded = load_peft_model(_pruned(), tmp_path / "run" / "checkpoint-4")
    ids = _ids(5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, wrapped.eval()(input_ids=ids).logits)
