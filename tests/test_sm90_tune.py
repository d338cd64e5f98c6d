"""performance_experiments/sm90_tune.py off the GPU: its variant table agrees with the library's
default kernel configuration, it passes every knob of a variant to nvcc, and it refuses bad
options / does nothing without an sm90 GPU."""
import re
import subprocess

import pytest
import torch

from performance_experiments import sm90_tune
from slope.kernels import cutlass_sm90


def _default_config_in_header():
    text = (cutlass_sm90.CUDA_SOURCES / "sm90_sparse_gemm_kernels.h").read_text()
    body = text[text.index("struct DefaultConfig"):]
    body = body[: body.index("};")]
    tile = re.search(r"TileShape = cute::Shape<cute::_(\d+), cute::_(\d+), cute::_(\d+)>", body)
    cluster = re.search(r"ClusterShape = cute::Shape<cute::_(\d+), cute::_(\d+), cute::_1>", body)
    stages = re.search(r"kStages = (\d+);", body)
    scheduler = re.search(r"TileSchedulerTag = cutlass::gemm::(\w+);", body)
    assert scheduler.group(1) in ("PersistentScheduler", "StreamKScheduler")
    return sm90_tune.TileConfig(*(int(g) for g in tile.groups() + cluster.groups()),
                                pingpong=int("Pingpong" in body), stages=int(stages.group(1)),
                                streamk=int(scheduler.group(1) == "StreamKScheduler"))


def test_default_variant_is_the_library_default_config():
    assert sm90_tune.VARIANTS[sm90_tune.DEFAULT_VARIANT] == _default_config_in_header()


def test_variant_names_describe_their_configuration():
    for name, c in sm90_tune.VARIANTS.items():
        expected = (f"{c.tm}x{c.tn}x{c.tk}_{c.cm}x{c.cn}" + (f"_s{c.stages}" if c.stages else "")
                    + ("_sk" if c.streamk else "") + ("_pp" if c.pingpong else ""))
        assert name == expected


def test_build_passes_every_knob_to_nvcc(tmp_path, monkeypatch):
    commands = []

    def failing_nvcc(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "error: not compiled in this test")

    monkeypatch.setattr(sm90_tune.subprocess, "run", failing_nvcc)
    monkeypatch.setattr(sm90_tune.cutlass_sm90, "cutlass_include_dirs", lambda: [])
    path, why, _ = sm90_tune.build_variant("128x256x64_1x1_s3", tmp_path)
    assert path is None and "not compiled in this test" in why
    defines = dict(a[2:].split("=") for a in commands[0] if a.startswith("-DTUNE_"))
    assert defines == {"TUNE_TM": "128", "TUNE_TN": "256", "TUNE_TK": "64", "TUNE_CM": "1", "TUNE_CN": "1",
                       "TUNE_PINGPONG": "0", "TUNE_STAGES": "3", "TUNE_STREAMK": "0"}


def test_unknown_variant_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        sm90_tune.main(["--variants", "999x1x1_1x1", "--out-dir", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_an_sm90_gpu_nothing_is_built_or_written(tmp_path, capsys):
    assert sm90_tune.main(["--out-dir", str(tmp_path), "--build-dir", str(tmp_path / "build")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not any(tmp_path.rglob("*.json")) and not (tmp_path / "build").exists()
