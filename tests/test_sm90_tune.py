"""performance_experiments/sm90_tune.py off the GPU: its variant table agrees with the library's
default kernel configuration, and it refuses bad options / does nothing without an sm90 GPU."""
import re

import pytest
import torch

from performance_experiments import sm90_tune
from slope.kernels import cutlass_sm90


def _default_config_in_header():
    text = (cutlass_sm90.CSRC / "sm90_sparse_gemm_kernels.h").read_text()
    body = text[text.index("struct DefaultConfig"):]
    body = body[: body.index("};")]
    tile = re.search(r"TileShape = cute::Shape<cute::_(\d+), cute::_(\d+), cute::_(\d+)>", body)
    cluster = re.search(r"ClusterShape = cute::Shape<cute::_(\d+), cute::_(\d+), cute::_1>", body)
    pingpong = "Pingpong" in body
    return tuple(int(g) for g in tile.groups()) + tuple(int(g) for g in cluster.groups()) + (int(pingpong),)


def test_default_variant_is_the_library_default_config():
    assert sm90_tune.VARIANTS[sm90_tune.DEFAULT_VARIANT] == _default_config_in_header()


def test_variant_names_describe_their_configuration():
    for name, (tm, tn, tk, cm, cn, pp) in sm90_tune.VARIANTS.items():
        assert name.startswith(f"{tm}x{tn}x{tk}_{cm}x{cn}")
        assert name.endswith("_pp") == bool(pp)


def test_unknown_variant_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        sm90_tune.main(["--variants", "999x1x1_1x1", "--out-dir", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_an_sm90_gpu_nothing_is_built_or_written(tmp_path, capsys):
    assert sm90_tune.main(["--out-dir", str(tmp_path), "--build-dir", str(tmp_path / "build")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not any(tmp_path.rglob("*.json")) and not (tmp_path / "build").exists()
