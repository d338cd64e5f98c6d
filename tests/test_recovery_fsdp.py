"""slope.finetune under FSDP2: the seed's `accelerate launch` with an FSDP config gives the run of one
process (weights, held zeros, checkpoints that resume in one process); the launcher's settings."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranks import launch  # noqa: E402
from test_recovery import pruned_pair, recipe, run  # noqa: E402

from slope.parallel import accelerate_fsdp  # noqa: E402
from slope.pruning.recipe import parse_recipe, recipe_yaml  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Distillation by MSE (a mean over all rows: ranks' means average to the global one; SquareHead's
# ratio of means would not), joint clipping that bites (0.5), a checkpoint half-way.
OPTIONS = dict(adam_epsilon=1e-4, device="cpu", max_grad_norm=0.5, save_steps=2,
               rec=recipe(distill=["model.layers.0", "model"], comparison="mse"))
# What `accelerate launch --config_file example_fsdp_config.yaml` exports for the seed's config.
SEED_FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "1",
                 "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "false"}


def _launch(out: Path, *extra: str, env: dict | None = None) -> None:
    launch([__file__, str(out), *extra], out.parent, env=env or SEED_FSDP_ENV, name=out.name)  # logs beside the output folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return T.AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.distributed
def test_fsdp_under_the_seeds_launch_is_the_run_of_one_process(tmp_path):
    _launch(tmp_path / "fsdp")
    student, teacher = pruned_pair()
    single = run(student, tmp_path / "single", teacher=teacher, per_device_train_batch_size=4, **OPTIONS)
    assert single.finetune_summary["config"]["world_size"] == 1

    sharded = _weights(tmp_path / "fsdp")
    _assert_same(_weights(tmp_path / "single"), sharded)
    # the zeros of the unstructured (masked) block and the 2:4 block stayed zeros under sharding
    pruned, _ = pruned_pair()
    for name, before in pruned.state_dict().items():
        if ".layers." in name and name.endswith("proj.weight") and "down_proj" not in name:
            assert bool((sharded[name][before == 0] == 0).all()), name
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["config"]["world_size"] == 2
    assert summary["constant_pruning"] == single.finetune_summary["constant_pruning"]
    sharded_memory, whole = summary["memory_per_rank"], single.finetune_summary["memory_per_rank"]
    # rank 0 holds half of the weights (the 2:4 block's kept values too: each SLoPe layer's on one
    # rank), of the dense weights' state, of the masks and of the teacher
    for part in ("parameters", "dense_optimizer", "masks", "teacher"):
        assert 0.4 < sharded_memory[part] / whole[part] < 0.6, (part, sharded_memory[part] / whole[part])
    assert 0.3 < sharded_memory["sparse_values"] / whole["sparse_values"] < 0.7
    # the 2:4 block's moments: each SLoPe layer's on one rank (the step counters, a few bytes, on both)
    assert 0.3 < sharded_memory["sparse_optimizer"] / whole["sparse_optimizer"] < 0.7

    # its half-way checkpoint (single-process layout) resumes to the same weights in one process,
    # and sharded again (the checkpoint's weights and AdamW state split over the ranks)
    # (with the config's activation checkpointing on this time: the same weights, and recorded so)
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "again" / "checkpoint-2")
    _launch(tmp_path / "again", "resume", env={**SEED_FSDP_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true"})
    _assert_same(_weights(tmp_path / "single"), _weights(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["config"]["gradient_checkpointing"] is True
    resumed_student, teacher = pruned_pair()
    options = {**OPTIONS, "save_steps": None}
    run(resumed_student, tmp_path / "fsdp", teacher=teacher, per_device_train_batch_size=4,
        resume_from_checkpoint=str(tmp_path / "fsdp" / "checkpoint-2"), **options)
    _assert_same(_weights(tmp_path / "single"), _weights(tmp_path / "fsdp"))


SEED_ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
downcast_bf16: 'no'
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch_policy: BACKWARD_PRE
  fsdp_cpu_ram_efficient_loading: false
  fsdp_forward_prefetch: false
  fsdp_offload_params: false
  fsdp_sharding_strategy: 1
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_sync_module_states: true
  fsdp_use_orig_params: false
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: true
"""


@pytest.mark.distributed
def test_the_seeds_accelerate_command_runs_as_written(tmp_path):
    """Seed 002 step 3's `accelerate launch --config_file example_fsdp_config.yaml --no_python ... finetune`
    with slope's command in place of SparseML's (the config as in the guide, on CPUs)."""
    from slope.pruning.loading import shipped_tokenizer

    student, teacher = pruned_pair()
    for model, folder in ((student, "student"), (teacher, "teacher")):
        model.save_pretrained(tmp_path / folder)
        shipped_tokenizer().save_pretrained(tmp_path / folder)
    (tmp_path / "fsdp.yaml").write_text(SEED_ACCELERATE_CONFIG)
    (tmp_path / "recipe.yaml").write_text(recipe_yaml(parse_recipe(recipe(distill=["model.layers.0", "model"]), kind="finetune")))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "fsdp.yaml", "--no_python", "slope", "finetune",
               "--model", "student", "--dataset", "embedded", "--output_dir", "out", "--splits", "train", "--num_train_epochs", "2",
               "--precision", "bfloat16", "--gradient_checkpointing", "True", "--bf16", "True", "--learning_rate", "0.00005",
               "--lr_scheduler_type", "linear", "--max_seq_length", "32", "--per_device_train_batch_size", "2",
               "--max_grad_norm", "None", "--warmup_steps", "1", "--distill_teacher", "teacher", "--recipe", "recipe.yaml",
               "--max-steps", "3"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("done: 3 steps") == 1, done.stdout  # said once, by rank 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["config"]["world_size"] == 2 and summary["config"]["bf16"] is True
    assert summary["config"]["fsdp"] is True and summary["config"]["data_parallel"] == "fsdp"  # from the launcher, no --fsdp
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    trained = _weights(tmp_path / "out")
    for name, before in student.state_dict().items():
        if name.endswith("q_proj.weight"):
            assert bool((trained[name][before == 0] == 0).all()) and not torch.equal(trained[name], before), name


def test_the_accelerate_fsdp_settings(monkeypatch):
    for name in [n for n in os.environ if n.startswith(("FSDP_", "ACCELERATE_"))]:
        monkeypatch.delenv(name)
    assert accelerate_fsdp() is None
    for name, value in SEED_FSDP_ENV.items():
        monkeypatch.setenv(name, value)
    assert accelerate_fsdp() == {"reshard_after_forward": True, "activation_checkpointing": False}
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert accelerate_fsdp() == {"reshard_after_forward": False, "activation_checkpointing": True}
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    assert accelerate_fsdp()["reshard_after_forward"] is True
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "3")
    with pytest.raises(ValueError, match="FULL_SHARD"):
        accelerate_fsdp()
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "1")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match="offload"):
        accelerate_fsdp()


def test_fsdp_in_one_process_says_it_trains_unsharded_and_refuses_fp16():
    student, _ = pruned_pair()
    with pytest.warns(UserWarning, match="nothing to shard"):
        run(student, fsdp=True, max_steps=1, rec=recipe())
    with pytest.raises(ValueError, match="fp16"):
        run(pruned_pair()[0], fsdp=True, fp16=True, max_steps=1)
    with pytest.raises(ValueError, match="fsdp must be True or False"):
        run(pruned_pair()[0], fsdp="yes", max_steps=1)


def test_the_accelerate_configs_mixed_precision_autocasts(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.warns(UserWarning, match="mixed precision bf16 from the accelerate config"):
        model = run(pruned_pair()[0], rec=recipe(), max_steps=1)
    assert model.finetune_summary["config"]["precision_mode"] == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert run(pruned_pair()[0], rec=recipe(), max_steps=1).finetune_summary["config"]["precision_mode"] == "fp32"


if __name__ == "__main__":  # an FSDP worker (launched by the test above)
    warnings.simplefilter("ignore")
    student, teacher = pruned_pair()
    resume = {"resume_from_checkpoint": True} if sys.argv[2:] == ["resume"] else {}
    run(student, Path(sys.argv[1]), teacher=teacher, per_device_train_batch_size=2, **OPTIONS, **resume)
