"""`daptq bench` end to end on a toy-sized VLA (worker processes, round-robin, report), and `daptq export`."""

import json

import numpy as np
import pytest
import torch

from daptq.cli import main
from daptq.deploy import OnnxPolicy
from daptq.deploy.bench import BenchError, run_bench, to_markdown, write_report
from daptq.models.registry import load_policy


@pytest.mark.slow
def test_bench_measures_each_variant_in_its_own_process(tmp_path):
    report = run_bench(
        ["toy-vla"],
        ["torch-fp32", "torch-w4a8-fake", "ort-w4a8"],
        rounds=2,
        calls_per_round=1,
        warmup=0,
        group_size=32,
        cache=tmp_path / "cache",
    )
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"torch-fp32", "torch-w4a8-fake", "ort-w4a8"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["calls"] == 2 and row["call_p90_ms"] >= row["call_p50_ms"] > 0
        assert row["action_p50_ms"] == row["call_p50_ms"] / row["n_action_steps"]
        assert row["peak_rss_bytes"] > 0
    assert rows["torch-fp32"]["call_p50_vs_baseline"] == 1.0
    assert rows["ort-w4a8"]["baseline"] == "toy-vla torch-fp32"
    ort = rows["ort-w4a8"]
    assert ort["accuracy_levels"] == [4] and ort["w4_layers"] > 0
    assert 0.25 < ort["w4_deployed_vs_bf16"] < 0.35  # g32 with fp32 scales: 5 bits per weight = 0.3125
    assert len({r["peak_rss_bytes"] for r in rows.values()}) == 3  # separate processes, separate peaks
    write_report(report, tmp_path / "bench")
    assert json.loads((tmp_path / "bench.json").read_text())["threads"] == 1
    assert "ort-w4a8" in to_markdown(report)


def test_bench_refuses_a_bogus_model_and_unknown_variants_before_starting(tmp_path):
    with pytest.raises(BenchError, match="no bundled reference VLA 'ref:no-such-model'.*metaworld-mt10"):
        run_bench(["ref:no-such-model"], ["torch-fp32"], rounds=1, calls_per_round=1, warmup=0)
    with pytest.raises(BenchError, match="unknown bench variant"):
        run_bench(["toy-vla"], ["torch-fp33"])


@pytest.mark.slow
def test_cli_export_float_reference_matches_pytorch(tmp_path):
    out = tmp_path / "fp"
    assert main(["export", "ref:metaworld-mt10", "--format", "onnx", "--out", str(out)]) == 0
    deployed, reference = load_policy(f"onnx:{out}"), load_policy("ref:metaworld-mt10")
    assert isinstance(deployed, OnnxPolicy)
    assert deployed.manifest["layers"] == {"language": [], "condition": [], "denoiser": []}
    rng = np.random.default_rng(0)
    obs = {
        "image": rng.integers(0, 255, reference.config.image_shape, dtype=np.uint8),
        "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32),
        "instruction": "open the drawer",
    }
    with torch.no_grad():
        a = reference.predict_chunk(reference.observation_to_batch(obs), torch.Generator().manual_seed(1))
    b = deployed.predict_chunk(deployed.observation_to_batch(obs), torch.Generator().manual_seed(1))
    assert float((a - b).abs().max()) < 1e-4
    assert main(["export", "ref:metaworld-mt10", "--out", str(out)]) == 2  # exists, no --overwrite
