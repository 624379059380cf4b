"""`daptq quantize` memory options: --sequential, --max-memory refusal, --device cuda without CUDA, and the
per-stage table (time and peak resident memory) it prints and records."""

from __future__ import annotations

import pytest
import torch
from test_cli_validation import QUANT, assert_error

from daptq.methods.workflow import parse_size


def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_error([*QUANT, "--device", "cuda", "--out", str(tmp_path / "q")], capsys, "CUDA is not available")
    assert not (tmp_path / "q").exists()


def test_max_memory_refuses_with_the_estimate(tmp_path, capsys):
    err = assert_error([*QUANT, "--max-memory", "1K", "--out", str(tmp_path / "q")], capsys, "--max-memory")
    assert "needs about" in err and "--sequential" in err
    assert_error([*QUANT, "--max-memory", "lots", "--out", str(tmp_path / "r")], capsys, "not a size")


def test_parse_size():
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("100") == 100
    with pytest.raises(ValueError, match="positive"):
        parse_size("-1G", "--max-memory")


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_quantize_prints_and_records_time_and_peak_memory_per_stage(tmp_path, capsys, sequential):
    from daptq.models.quantized import read_quantized_policy_config

    out = tmp_path / "q"
    argv = [*QUANT, "--max-memory", "64G", "--out", str(out)] + (["--sequential"] if sequential else [])
    from daptq.cli import main

    assert main(argv) in (0, None)
    table = capsys.readouterr().out
    for stage in ("prepare", "calibrate", "apply", "save"):
        assert f"| {stage} |" in table, table
    assert "peak RSS MB" in table
    _, qconfig = read_quantized_policy_config(out)
    timings = qconfig["record"]["timings"]
    for stage in ("prepare", "calibrate", "apply"):
        assert timings[f"{stage}_s"] >= 0 and timings[f"{stage}_peak_rss_mb"] > 0
    assert ("sequential" in qconfig["record"]["decisions"]) == sequential
