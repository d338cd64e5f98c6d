"""slope eval / generate on a peft LoRA adapter folder (slope.inference.adapters): the adapters run on
their base model folder, unmerged on the sparse model and merged into its dense form, with the same
loss; --compare checks that; --base overrides adapter_config.json's base; what cannot run is one line."""
import json
import re
import shutil

import pytest
import torch
import transformers as T

peft = pytest.importorskip("peft")

import slope  # noqa: E402
from slope.cli import main  # noqa: E402
from slope.evaluate import LOSS_TOLERANCE  # noqa: E402
from slope.inference.folder import compare_model_folder, default_mode, eval_model_folder, folder_modes  # noqa: E402
from slope.peft import get_peft_model  # noqa: E402
from slope.serialization.folders import describe_folder, folder_kind  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = ["--device", "cpu", "--eval-batches", "1"]


def tiny_llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))


def save_adapters(base, adapter) -> None:
    """LoRA adapters (r=4, every linear layer, B non-zero) on the pruned model of ``base``, saved in ``adapter``."""
    model = get_peft_model(slope.from_pretrained(base), peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(adapter)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(root, base, adapter)``: a pruned tiny Llama's folder and LoRA adapters saved on it."""
    root = tmp_path_factory.mktemp("adapters")
    slope.save_pretrained(slope.prune_model(tiny_llama(), verbose=False), root / "base")
    save_adapters(root / "base", root / "adapter")
    return root, root / "base", root / "adapter"


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("slope ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"slope {command}: error: "), lines
    return lines[0]


def test_adapters_run_unmerged_and_dense_with_the_same_loss(folders, capsys):
    root, base, adapter = folders
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert folder_kind(adapter) == "peft-adapter" and "slope eval --checkpoint" in describe_folder(adapter)
    assert folder_modes(adapter) == ("unmerged", "dense") and default_mode(adapter) == "unmerged"
    unmerged = eval_model_folder(adapter, "cpu", eval_batches=1, mode="unmerged")
    dense = eval_model_folder(adapter, "cpu", eval_batches=1, mode="dense")
    plain = eval_model_folder(base, "cpu", eval_batches=1, mode="unmerged")
    assert unmerged["base"] == dense["base"] == str(base) and plain["base"] is None
    assert unmerged["settings"] == plain["settings"] and unmerged["val_tokens"] == plain["val_tokens"]  # the base's data
    assert unmerged["sparse_layer_bytes"] > 0 and dense["sparse_layer_bytes"] == 0
    assert abs(unmerged["val_loss"] - dense["val_loss"]) <= LOSS_TOLERANCE["fp32"]
    assert abs(unmerged["val_loss"] - plain["val_loss"]) > 100 * LOSS_TOLERANCE["fp32"]  # the adapters count
    compared = compare_model_folder(adapter, "cpu", eval_batches=1)
    assert tuple(compared["modes"]) == ("unmerged", "dense") and compared["agree"] and compared["note"] is None
    assert compared["modes"]["unmerged"]["val_loss"] == pytest.approx(unmerged["val_loss"], rel=1e-6)
    assert main(["eval", "--checkpoint", str(adapter), *EVAL]) == 0  # unmerged by default
    out = capsys.readouterr().out
    assert f"{adapter} (peft adapters on {base}, unmerged, fp32): validation loss {unmerged['val_loss']:.4f}" in out
    assert main(["eval", "--checkpoint", str(adapter), "--compare", *EVAL]) == 0
    out = capsys.readouterr().out
    assert f"{adapter} (peft adapters on {base}, fp32)" in out and "modes agree" in out
    texts = {}
    for mode in ("unmerged", "dense"):
        assert main(["generate", "--checkpoint", str(adapter), "--prompt", "def f(", "--max-new-tokens", "4",
                     "--temperature", "0", "--device", "cpu", "--mode", mode]) == 0
        texts[mode], err = capsys.readouterr()
        assert texts[mode].startswith("def f(") and f"[peft adapters, {mode}] 4 new tokens" in err
    assert texts["unmerged"] == texts["dense"]


def test_base_overrides_the_recorded_base(folders, capsys):
    root, base, adapter = folders
    moved = root / "moved_adapter"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["eval", "--checkpoint", str(moved), *EVAL]) == 1
    line = one_error_line(capsys, "eval")
    assert f"the adapters' base {root / 'gone'} (base_model_name_or_path in " in line and "pass --base the model folder" in line
    want = eval_model_folder(adapter, "cpu", eval_batches=1, mode="unmerged")["val_loss"]
    assert eval_model_folder(moved, "cpu", eval_batches=1, mode="unmerged", base=base)["val_loss"] == want
    assert main(["eval", "--checkpoint", str(moved), "--base", str(base), "--compare", *EVAL]) == 0
    assert "modes agree" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(moved), "--base", str(base), "--prompt", "x", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    assert "[peft adapters, unmerged] 2 new tokens" in capsys.readouterr().err
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"  # a hub name: never downloaded
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", "--checkpoint", str(moved), "--prompt", "x", "--device", "cpu"]) == 1
    assert "meta-llama/Llama-2-7b-hf (base_model_name_or_path in" in one_error_line(capsys, "generate")


def test_what_cannot_run_is_one_line(folders, capsys):
    root, base, adapter = folders
    refusals = [
        (["eval", "--checkpoint", str(adapter), "--mode", "merged", *EVAL],
         "--mode merged: " + f"{adapter} holds peft LoRA adapters, which have no merged sparse form"),
        (["eval", "--checkpoint", str(base), "--base", str(base), *EVAL], "applies to peft adapter folders"),
        (["eval", "--checkpoint", str(adapter), "--base", str(root / "nothing"), *EVAL], "(--base) is not a local folder"),
        (["eval", "--checkpoint", str(adapter), "--base", str(adapter), *EVAL], f"the adapters' base (--base): {adapter} is a peft adapter folder"),
        (["generate", "--checkpoint", str(adapter), "--prompt", "x", "--compare"], "slope generate --compare applies to"),
    ]
    config = json.loads((adapter / "adapter_config.json").read_text())
    for name, change in (("no_base", {"base_model_name_or_path": None}), ("ia3", {"peft_type": "IA3"})):
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
    refusals += [(["eval", "--checkpoint", str(root / "no_base"), *EVAL], "names no base model (base_model_name_or_path); pass --base"),
                 (["eval", "--checkpoint", str(root / "ia3"), *EVAL], "holds a peft IA3 adapter; slope eval / generate run LoRA")]
    other = root / "other_base"  # a model the adapters do not fit
    slope.save_pretrained(slope.prune_model(T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)), verbose=False), other)
    refusals.append((["eval", "--checkpoint", str(adapter), "--base", str(other), *EVAL],
                     f"the adapters in {adapter} do not fit the model in {other} (Error(s) in loading state_dict for PeftModel: "
                     "size mismatch for "))
    for argv, message in refusals:
        assert main(argv) == 1, argv
        assert message in one_error_line(capsys, argv[0]), argv


def test_adapters_on_a_plain_base_run_dense(tmp_path, capsys):
    """A plain (dense) base, e.g. the pruned model re-saved by transformers, has one form: the adapters
    merged into it; so has a merged export (its layers take no adapters)."""
    from slope.serialization.export import export_model

    slope.save_pretrained(slope.prune_model(tiny_llama(), verbose=False), tmp_path / "base")
    save_adapters(tmp_path / "base", tmp_path / "adapter")
    T.AutoModelForCausalLM.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "dense")  # W⊙M in nn.Linear
    want = eval_model_folder(tmp_path / "adapter", "cpu", eval_batches=1, mode="unmerged")["val_loss"]
    on_dense = ["--checkpoint", str(tmp_path / "adapter"), "--base", str(tmp_path / "dense")]
    assert folder_modes(tmp_path / "adapter", tmp_path / "dense") == ("dense",)
    assert default_mode(tmp_path / "adapter", tmp_path / "dense") == "dense"
    got = eval_model_folder(tmp_path / "adapter", "cpu", eval_batches=1, base=tmp_path / "dense")
    assert abs(got["val_loss"] - want) <= LOSS_TOLERANCE["fp32"]
    assert main(["eval", *on_dense, "--compare", *EVAL]) == 0
    assert "note: peft adapters on a plain model folder: it has one (dense) form" in capsys.readouterr().out
    assert main(["eval", *on_dense, "--mode", "unmerged", *EVAL]) == 1
    line = one_error_line(capsys, "eval")
    assert f"the base {tmp_path / 'dense'} of the adapters in" in line and "is a plain model folder" in line
    assert line.endswith("use --mode dense")
    export_model(tmp_path / "base", tmp_path / "merged", "merged")
    assert folder_modes(tmp_path / "merged") == ("merged", "dense")
    assert folder_modes(tmp_path / "adapter", tmp_path / "merged") == ("dense",)
    got = eval_model_folder(tmp_path / "adapter", "cpu", eval_batches=1, base=tmp_path / "merged")
    assert abs(got["val_loss"] - want) <= LOSS_TOLERANCE["fp32"]
    assert main(["eval", "--checkpoint", str(tmp_path / "adapter"), "--base", str(tmp_path / "merged"), "--mode", "unmerged", *EVAL]) == 1
    assert "holds slope's merged inference form, which takes no adapters; use --mode dense" in one_error_line(capsys, "eval")


def test_missing_adapter_weights_are_one_line_and_nothing_downloads(folders, capsys, monkeypatch):
    """Without its adapter_model.safetensors peft would look the folder's name up on the hub."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("slope downloaded adapter weights")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr("peft.utils.save_and_load.hf_hub_download", no_download)
    root, base, adapter = folders
    shutil.copytree(adapter, root / "no_weights")
    (root / "no_weights" / "adapter_model.safetensors").unlink()
    for argv in (["eval", "--checkpoint", str(root / "no_weights"), *EVAL],
                 ["eval", "--checkpoint", str(root / "no_weights"), "--mode", "dense", *EVAL],
                 ["generate", "--checkpoint", str(root / "no_weights"), "--prompt", "x", "--device", "cpu"]):
        assert main(argv) == 1, argv
        line = one_error_line(capsys, argv[0])
        assert f"{root / 'no_weights'} has no adapter weights (adapter_model.safetensors)" in line and "save the adapters" in line


def test_a_named_adapters_subfolder_is_pointed_to(folders, tmp_path, capsys):
    """peft saves an adapter named other than "default" in a subfolder of that name."""
    root, base, adapter = folders
    model = get_peft_model(slope.from_pretrained(base), peft.LoraConfig(r=4, target_modules="all-linear"), adapter_name="other")
    model.save_pretrained(tmp_path / "named")
    assert (tmp_path / "named" / "other" / "adapter_config.json").is_file()
    for argv in (["eval", "--checkpoint", str(tmp_path / "named"), *EVAL],
                 ["eval", "--checkpoint", str(tmp_path / "named"), "--base", str(base), *EVAL],
                 ["generate", "--checkpoint", str(tmp_path / "named"), "--prompt", "x", "--device", "cpu"]):
        assert main(argv) == 1, argv
        line = one_error_line(capsys, argv[0])
        assert f"{tmp_path / 'named'} holds peft adapters in a subfolder (other)" in line
        assert f"--checkpoint {tmp_path / 'named' / 'other'}" in line
    assert main(["eval", "--checkpoint", str(tmp_path / "named" / "other"), *EVAL]) == 0


@pytest.mark.parametrize("mode", ["unmerged", "dense"])
def test_a_config_value_of_the_wrong_type_is_one_line(folders, capsys, mode):
    root, base, adapter = folders
    bad = root / f"bad_rank_{mode}"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": "4"}))
    assert main(["eval", "--checkpoint", str(bad), "--mode", mode, *EVAL]) == 1
    line = one_error_line(capsys, "eval")
    assert f"the adapters in {bad} cannot be loaded (" in line and f"{bad / 'adapter_config.json'} holds" in line
    assert "save the adapters again" in line


def test_a_recorded_dense_base_of_a_pruned_model_is_warned_of(tmp_path, capsys):
    """from_pretrained(dense folder), prune_model, peft: adapter_config.json names the unpruned folder,
    which would silently run the adapters on the model before pruning."""
    import warnings

    tiny_llama().save_pretrained(tmp_path / "dense")
    model = slope.prune_model(T.AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), verbose=False)
    slope.save_pretrained(model, tmp_path / "pruned")
    get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "dense")
    recorded = re.escape(f"the adapters' base {tmp_path / 'dense'} (")
    with pytest.warns(UserWarning, match=recorded + ".* is not 2:4 pruned.*pass it as --base"):
        eval_model_folder(tmp_path / "adapter", "cpu", eval_batches=1)
    assert main(["eval", "--checkpoint", str(tmp_path / "adapter"), *EVAL]) == 0
    assert "is not 2:4 pruned" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:  # the base given: as asked
        warnings.simplefilter("always")
        eval_model_folder(tmp_path / "adapter", "cpu", eval_batches=1, base=tmp_path / "dense")
        eval_model_folder(tmp_path / "adapter", "cpu", eval_batches=1, mode="dense", base=tmp_path / "pruned")
    assert not [w for w in caught if "2:4 pruned" in str(w.message)]


def test_sparse_finetune_names_an_adapter_folder_given_as_its_model(folders):
    from slope.dynamic.finetune import _check_model_path

    _, _, adapter = folders
    with pytest.raises(FileNotFoundError, match=r"--model: .* is a peft adapter folder .*slope eval --checkpoint") as info:
        _check_model_path(adapter, str(adapter))
    assert "\n" not in str(info.value)
