"""The ``checkpoint-<step>/`` folders of a fine-tuning run: which names are checkpoints."""
import pytest

from slope.finetune_checkpoints import CHECKPOINT_STATE, checkpoint_step, checkpoint_steps, resolve_checkpoint, rotate_checkpoints
from slope.finetune_run import check_output_dir
from slope.serialization.folders import OutputDirError


def folder(root, name, complete=True):
    (root / name).mkdir(parents=True)
    if complete:
        (root / name / CHECKPOINT_STATE).write_bytes(b"state")
    return root / name


# ---------------------------------------------------------------------- names
@pytest.mark.parametrize("name, step", [("checkpoint-0", 0), ("checkpoint-7", 7), ("checkpoint-120", 120)])
def test_canonical_names_are_checkpoints(name, step):
    assert checkpoint_step(name) == step


@pytest.mark.parametrize("name", ["checkpoint-002", "checkpoint-00", "checkpoint-\u00b2", "checkpoint-\u0663", "checkpoint-\uff13",
                                  "checkpoint-3\n", "checkpoint-", "checkpoint--1", "checkpoint-+1", "checkpoint- 1",
                                  "checkpoint-3.bak", "Checkpoint-3", "checkpoint-best"])
def test_other_names_are_not(name):
    assert checkpoint_step(name) is None


def test_odd_names_are_left_alone_by_resume_rotation_and_the_output_dir_check(tmp_path):
    folder(tmp_path, "checkpoint-\u00b2")  # int() fails on it: resume used to crash with "invalid literal for int()"
    folder(tmp_path, "checkpoint-002")   # a user's copy: used to be taken for step 2
    real = [folder(tmp_path, "checkpoint-1"), folder(tmp_path, "checkpoint-2"), folder(tmp_path, "checkpoint-3")]
    assert checkpoint_steps(tmp_path) == {1: real[0], 2: real[1], 3: real[2]}
    assert resolve_checkpoint(tmp_path) == real[2]
    assert rotate_checkpoints(tmp_path, 1, newest=3) == [real[1], real[0]]  # the real checkpoint-2 goes too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-002", "checkpoint-3", "checkpoint-\u00b2"]
    odd = tmp_path / "odd"
    folder(odd, "checkpoint-\u00b2")
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folder"):
        resolve_checkpoint(odd)
    with pytest.raises(OutputDirError, match="exists and is not an empty folder; choose a new folder or remove it$"):
        check_output_dir(odd)  # a non-empty folder, not an unfinished run
