"""Smoke test of benchmarks/family_speed.py at toy size: every family's rows build and run one call, the ONNX
rows of pi0 come from its exports, and the report renders (no timings are checked)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import family_speed as fs  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.parametrize("family", fs.FAMILIES)
def test_torch_rows_build_and_run(family, tmp_path):
    call, info = fs.build_row(family, "torch-fp32", "toy", tmp_path)
    call()
    assert info["parameters"] > 0 and info["config"]
    call, info = fs.build_row(family, "torch-w4a8-fake", "toy", tmp_path)
    call()
    assert info["quantized_layers"] > 0


def test_pi0_onnx_rows_and_report(tmp_path):
    fs.prepare("pi0", "toy", tmp_path)
    rows = []
    for variant in ("ort-fp32", "ort-w4a8", "ort-w4a8-unrolled"):
        call, info = fs.build_row("pi0", variant, "toy", tmp_path)
        call()
        rows.append({**info, "call_p50_ms": 1.0, "peak_rss_bytes": 1 << 28})
    integer = [r["matmul_nbits_layers"] + r["u8s8_layers"] for r in rows]
    assert integer[0] == 0 and integer[1] == integer[2] > 0  # narrow toy layers: per-channel, u8s8
    assert rows[1]["accuracy_levels"] in ([], [4])  # MatMulNBits layers, if any, on the int8-activation path
    base = {"variant": "torch-fp32", "parameters": 1e6, "call_p50_ms": 2.0, "peak_rss_bytes": 1 << 29}
    base["call_ms"] = [2.0, 2.0]
    for r in rows:
        r["call_ms"] = [1.0, 1.0]
    for r in (base, *rows):
        r["call_p50_vs_fp32"] = r["call_p50_ms"] / base["call_p50_ms"]
        r["peak_rss_vs_fp32"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
    report = {"size": "realistic", "only": ["pi0"], "rounds": 1, "warmup": 0}
    report["families"] = [{"family": "pi0", "rows": [base, *rows]}]
    md = fs.to_markdown(report)
    assert "| pi0 | ort-w4a8 | 1.0 | 1 / 1 | 0.50x | 0.50x | 256 | 0.50x |" in md
    assert fs.SIZES["realistic"]["pi0"]["note"] in md


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown family 'pi1'"):
        fs.build_family("pi1", "toy")
