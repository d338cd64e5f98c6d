"""The ``slope`` command: smoke runs of every mode, config precedence, eval/generate, error messages."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from slope.cli import build_parser, main, resolve_train_config

TINY = ["--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2",
        "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--log-every", "1", "--eval-every", "3",
        "--save-every", "0"]


def run(tmp_path, *args, name="run"):
    return main(["train", "--out", str(tmp_path / name), *TINY, *args])


def read_records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "mode",
    [
        ["--precision", "fp32"],
        ["--precision", "bf16"],
        ["--dense"],
        ["--compress", "--sparsity", "2:4"],
        ["--no-compress", "--sparsity", "2:8"],
    ],
    ids=["fp32-compressed", "bf16-compressed", "dense", "compressed", "no-compress-2:8"],
)
def test_smoke_runs(tmp_path, capsys, mode):
    assert run(tmp_path, "--max-steps", "3", *mode) == 0
    out = tmp_path / "run"
    recs = read_records(out)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all({"step", "loss", "lr", "tokens", "elapsed_s"} <= r.keys() for r in train)
    assert train[-1]["tokens"] == 3 * 2 * 16
    val = [r for r in recs if "val_loss" in r]
    assert len(val) == 1 and 0 < val[0]["val_loss"] < 20
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint" / "manifest.json").exists()
    saved = json.loads((out / "checkpoint" / "config.json").read_text())
    assert saved["dense"] == ("--dense" in mode)
    assert "--no-compress" not in mode or (saved["compress"] is False and saved["sparsity"] == "2:8")
    assert "done: 3 steps" in capsys.readouterr().out


def test_config_file_and_flag_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.01\nmax_steps: 4\nseq-len: 16\nprecision: bf16\n")
    args = build_parser().parse_args(["train", "--config", str(yaml_file), "--lr", "0.002"])
    cfg = resolve_train_config(args)
    assert (cfg.lr, cfg.max_steps, cfg.seq_len, cfg.precision) == (0.002, 4, 16, "bf16")
    assert cfg.batch_size == 16  # untouched default
    yaml_file.write_text("lr: 1e-3\n")  # YAML 1.1 reads this as a string
    assert resolve_train_config(build_parser().parse_args(["train", "--config", str(yaml_file)])).lr == 1e-3
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"max_steps": 5, "dense": True}))
    cfg = resolve_train_config(build_parser().parse_args(["train", "--config", str(json_file), "--no-dense"]))
    assert cfg.max_steps == 5 and cfg.dense is False


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.01\nlearning_rate: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(bad)])
    assert e.value.code == 2
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "missing.yaml")])
    assert "no such file" in capsys.readouterr().err
    typed = tmp_path / "typed.json"
    typed.write_text('{"max_steps": "ten"}')
    with pytest.raises(SystemExit):
        main(["train", "--config", str(typed)])
    assert "max_steps = 'ten' is invalid: expected an integer" in capsys.readouterr().err
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("sparsity: 2:4\n")  # YAML 1.1 reads it as 2*60 + 4
    with pytest.raises(SystemExit):
        main(["train", "--config", str(unquoted)])
    assert 'sparsity 124 is a number; quote it, e.g. sparsity: "2:4"' in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-steps", "0"], "max_steps = 0 is invalid: must be >= 1"),
        (["--sparsity", "2:8"], "compressed storage is 2:4 only; add --no-compress"),
        (["--no-compress", "--sparsity", "4:4"], "sparsity = '4:4' is invalid"),
        (["--lazy-lora-fraction", "1.5"], "lazy_lora_fraction = 1.5 is invalid: must be in [0, 1]"),
        (["--hidden-size", "96"], "hidden_size = 96 is invalid: must be a positive multiple of 64"),
        (["--no-compress", "--hidden-size", "62", "--num-heads", "2"], "hidden_size = 62 is invalid: must be a multiple of 4"),
        (["--max-steps", "5", "--stop-after", "9"], "stop_after = 9 is invalid: must be between 1 and max_steps (5)"),
        (["--no-compress", "--backend", "reference"], "applies to compressed storage"),
        pytest.param(["--backend", "cutlass"], "backend = 'cutlass' is invalid here",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the backends run on a GPU")),
        (["--precision", "fp8"], "invalid choice: 'fp8'"),
        (["--lr", "fast"], "invalid float value: 'fast'"),
    ],
)
def test_bad_flag_values(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "x"), *flags])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_checkpoint_errors(tmp_path, capsys):
    assert run(tmp_path, "--resume") == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert run(tmp_path, "--max-steps", "4", "--stop-after", "2", "--no-compress") == 0
    capsys.readouterr()
    assert run(tmp_path, "--resume", "--sparsity", "2:8") == 1
    err = capsys.readouterr().err
    assert "sparsity='2:4'" in err and "sparsity='2:8'" in err and "drop --sparsity" in err
    assert run(tmp_path, "--resume", "--hidden-size", "128") == 1
    assert "hidden_size=64" in capsys.readouterr().err
    weights = tmp_path / "run" / "checkpoint" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert run(tmp_path, "--resume") == 1
    assert "model.safetensors is corrupt" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "run")]) == 1
    assert "corrupt" in capsys.readouterr().err


def test_resume_uses_the_checkpoint_settings(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "4", "--stop-after", "2", "--no-compress", "--lr", "0.002") == 0
    capsys.readouterr()
    # Only --out and --resume: the checkpoint's flags (simulated, lr 0.002, tiny model) carry over.
    assert main(["train", "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    assert saved["lr"] == 0.002 and saved["compress"] is False and saved["stop_after"] is None
    assert [r["step"] for r in read_records(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_eval_and_generate(tmp_path, capsys):
    assert run(tmp_path, "--max-steps", "3", "--lazy-lora-fraction", "0.5") == 0
    last_val = [r for r in read_records(tmp_path / "run") if "val_loss" in r][-1]["val_loss"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3 and result["val_loss"] == pytest.approx(last_val, rel=1e-6)
    assert result["unigram_loss"] > 0
    args = ["generate", "--checkpoint", str(tmp_path / "run" / "checkpoint"), "--prompt", "def main(",
            "--max-new-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def main(") and len(first) > len("def main(\n")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy decoding is deterministic


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "slope", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--max-steps", "--stop-after", "--resume", "--no-compress", "--lazy-lora-fraction", "--config", "--dense"):
        assert flag in out.stdout


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    import slope
    from slope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"slope {slope.__version__}" == f"slope {version('slope')}"


def test_deepspeed_is_told_the_cpu_on_a_machine_without_accelerator(monkeypatch):
    from slope.cli import _quiet_deepspeed_without_accelerator

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    _quiet_deepspeed_without_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")  # a user's choice stays
    _quiet_deepspeed_without_accelerator()
    assert os.environ["DS_ACCELERATOR"] == "xpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    _quiet_deepspeed_without_accelerator()
    assert "DS_ACCELERATOR" not in os.environ


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-k", "-5"], "--top-k must be >= 0"),
])
def test_generate_refuses_bad_sampling_settings(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "def", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_script_works_in_the_callers_folder(tmp_path):
    """`bash /path/to/scripts/train.sh --dataset my.txt --out r` from another folder reads and writes
    there (it used to change to the repository first: 'no such file', outputs in the repository)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train.sh"
    (tmp_path / "my.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    tiny = ["--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-batches", "1", "--max-steps", "1", "--device", "cpu"]
    out = subprocess.run(["bash", str(script), "--dataset", "my.txt", "--out", "r", *tiny], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "r" / "metrics.jsonl").is_file() and f"data: {tmp_path / 'my.txt'}:" in out.stdout  # stored absolute


def test_sparse_only_settings_with_dense_are_refused(tmp_path, capsys):
    """--dense ignores the sparse settings: given by flag or config file, they are an error, not a no-op."""
    config = tmp_path / "c.yaml"
    config.write_text("dense: true\nmask_type: transposable\n")
    for argv, named in ((["--dense", "--sparsity", "1:4", "--lazy-lora-fraction", "0.1"], "--sparsity, --lazy-lora-fraction"),
                        (["--config", str(config)], "--mask-type")):
        with pytest.raises(SystemExit) as info:  # a settings error: argparse's usage line, then the error
            main(["train", "--out", str(tmp_path / "r"), *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"error: {named} applies to sparse runs and --dense ignores it" in err, err
    assert not (tmp_path / "r").exists()


def test_a_copied_finished_run_resumes_as_itself_in_its_new_folder(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "a"), *TINY, "--max-steps", "2"]) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "b"), "--resume", "--lr", "0.001"]) == 0
    out = capsys.readouterr().out
    assert f"outputs in {tmp_path / 'b'}" in out and f"outputs in {tmp_path / 'a'}" not in out, out
    assert "resuming with changed settings" not in out  # nothing trains: no settings apply
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "c"), "--lr", "inf"])
    assert "lr = inf is invalid: expected a finite number" in capsys.readouterr().err


def test_errors_are_said_once_and_recorded_for_torchrun(tmp_path, monkeypatch, capsys):
    """Under a launcher only the first rank prints the one-line error; every rank records it in torchrun's
    error file, which names the cause of a rank that failed alone in the launcher's summary."""
    from slope.notes import report_error

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    report_error("finetune", OSError("no space left on device"))
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "error.json").read_text())["message"]["message"] == "OSError: no space left on device"
    monkeypatch.setenv("RANK", "0")
    report_error("finetune", ValueError("a bad\n  value"))
    assert capsys.readouterr().err == "slope finetune: error: a bad value\n"
