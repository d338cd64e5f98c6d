"""slope.progress: rate and ETA on a fake clock, plain lines vs tqdm bar, and its users (train, eval,
generate, oneshot's block loop) in a log that is not a terminal."""
import re

import pytest

import slope.progress as progress_module
from slope.progress import Progress, clock, iterate


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    monkeypatch.delenv("SLOPE_PROGRESS_INTERVAL", raising=False)
    return fake


def test_clock():
    assert clock(0) == "00:00" and clock(65.4) == "01:05" and clock(3 * 3600 + 62) == "3:01:02"
    assert clock(float("nan")) == "?" and clock(float("inf")) == "?"


def test_plain_lines_give_count_rate_elapsed_eta(fake_time):
    lines = []
    p = Progress(5, "job", unit="batch", display="lines", interval_s=0, log=lines.append)
    fake_time.now += 4.0
    p.update(2, loss="1.5")  # 2 batches in 4 s: 0.5/s, 3 left: 6 s
    assert lines == ["job: 2/5 batches (40%) | 2.00 s/batch | 00:04 elapsed | ETA 00:06 | loss=1.5"]
    fake_time.now += 1.0
    p.update(3)  # 5 in 5 s: 1/s; done: no ETA; the postfix stays
    assert lines[-1] == "job: 5/5 batches (100%) | 1.00 batches/s | 00:05 elapsed | loss=1.5"
    p.close()
    assert len(lines) == 2  # the last line is not repeated


def test_plain_lines_are_throttled_and_close_prints_the_end(fake_time):
    lines = []
    with Progress(100, "train", unit="step", display="lines", interval_s=10, log=lines.append) as p:
        for _ in range(25):
            fake_time.now += 1.0
            p.update()
    assert [line.split(" | ")[0] for line in lines] == ["train: 10/100 steps (10%)", "train: 20/100 steps (20%)",
                                                        "train: 25/100 steps (25%)"]
    assert "ETA 01:15" in lines[-1]  # 75 steps left at 1 step/s


def test_a_resumed_run_rates_only_its_own_steps(fake_time):
    p = Progress(10, "train", unit="step", initial=6, display="lines", interval_s=None, log=print)
    fake_time.now += 2.0
    p.update(2)  # 2 steps in 2 s (not 8), 2 left
    assert p.rate() == 1.0 and p.eta() == "00:02"


def test_short_jobs_print_nothing_in_a_log_and_off_prints_nothing(fake_time, capsys):
    with Progress(3, "quick", display="lines", interval_s=30) as p:
        p.update(3)
    assert list(iterate(range(4), "silent", display="off")) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


def test_env_sets_the_interval(fake_time, monkeypatch):
    monkeypatch.setenv("SLOPE_PROGRESS_INTERVAL", "0")
    lines = []
    assert list(iterate("ab", "x", unit="item", display="lines", log=lines.append)) == ["a", "b"]
    assert [line.split(" | ")[0] for line in lines] == ["x: 1/2 items (50%)", "x: 2/2 items (100%)"]
    monkeypatch.setenv("SLOPE_PROGRESS_INTERVAL", "often")
    with pytest.raises(ValueError, match="SLOPE_PROGRESS_INTERVAL='often' is not a number of seconds"):
        Progress(1, "x", display="lines")


def test_bar_mode_is_tqdm_on_stderr(capsys):
    with Progress(2, "barred", unit="step", display="bar") as p:
        p.write("a log line")
        p.update(2, loss="3.0")
    captured = capsys.readouterr()
    assert "barred" in captured.err and "2/2" in captured.err and "loss=3.0" in captured.err
    assert "a log line" in captured.out + captured.err
    with pytest.raises(ValueError, match="display 'fancy'"):
        Progress(1, "x", display="fancy")


def test_auto_is_lines_when_stderr_is_not_a_terminal(capsys):
    assert Progress(1, "x").display == "lines"  # pytest captures stderr: not a terminal


def test_oneshot_block_loop_prints_a_line_per_block(capsys):
    from slope.pruning.report import progress

    assert list(progress(range(3), "SparseGPTModifier")) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" | ")[0] for line in err] == [f"SparseGPTModifier: {i}/3 blocks ({p}%)" for i, p in ((1, 33), (2, 67), (3, 100))]
    assert "ETA" in err[0] and re.search(r"blocks/s|s/block", err[0])
    assert list(progress(range(2), "quiet", enabled=False)) == [0, 1] and capsys.readouterr().err == ""


TINY = ["--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "1", "--num-heads", "2", "--seq-len", "16",
        "--batch-size", "2", "--eval-batches", "2", "--log-every", "1", "--eval-every", "100", "--save-every", "0"]


def test_train_eval_generate_show_progress_in_a_log(tmp_path, capsys, monkeypatch):
    """Not a terminal: the train step lines carry the ETA; eval and generate print plain progress lines
    to stderr (every unit with SLOPE_PROGRESS_INTERVAL=0); stdout stays what it was."""
    from slope.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "3", *TINY]) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("step ") and "/3 |" in line]
    assert len(steps) == 3
    assert all(re.search(r"\| ETA \d\d:\d\d$", line) for line in steps[:2]) and "ETA" not in steps[2]

    monkeypatch.setenv("SLOPE_PROGRESS_INTERVAL", "0")
    assert main(["eval", "--checkpoint", str(run)]) == 0
    captured = capsys.readouterr()
    assert "validation loss" in captured.out
    assert [line.split(" | ")[0] for line in captured.err.splitlines() if line.startswith("slope eval")] == [
        "slope eval (unmerged): 1/2 batches (50%)", "slope eval (unmerged): 2/2 batches (100%)"]
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def f(x):", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(x):")
    counted = [line.split(" | ")[0] for line in captured.err.splitlines() if line.startswith("slope generate")]
    assert counted == ["slope generate: 1/3 tokens (33%)", "slope generate: 2/3 tokens (67%)", "slope generate: 3/3 tokens (100%)"]
