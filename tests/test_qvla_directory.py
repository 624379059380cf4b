"""QVLA policy directories: `daptq inspect`, the byte accounting and the benchmark read the per-row widths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from baseline_helpers import toy_calibration
from safetensors import safe_open
from torch import nn

from daptq.methods.qvla import MixedBitLinear, QVLAConfig, mixed_layers, mixed_state
from daptq.methods.workflow import inspect_text, quantize_to_directory
from daptq.models.quantized import TENSORS_FILE
from daptq.models.registry import load_policy
from daptq.quant import ActivationSpec
from daptq.quant.bytes import format_bytes, mixed_weight_bytes, model_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = QVLAConfig(avg_bits=4.0, n_probes=2, exact_top_k=4)


@pytest.fixture(scope="module")
def qvla_dir(tmp_path_factory):
    return quantize_to_directory("toy", CONFIG, tmp_path_factory.mktemp("qvla") / "q", toy_calibration())


def on_disk_weight_bytes(directory: Path, name: str) -> int:
    """Independent count: the nbytes of the layer's weight tensors as they lie in model.safetensors."""
    with safe_open(str(directory / TENSORS_FILE), framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(f"{name}.") and k != f"{name}.bias"]
        return sum(f.get_tensor(k).nbytes for k in keys)


def test_mixed_bytes_by_hand():
    # 10 rows x 24: map 10 B; 8-bit 2 x 24 B; 4-bit 3 x 12 B; 2-bit 2 x 6 B; 16-bit 2 x 48 B; 7 bf16 scales
    bits = [16, 8, 4, 2, 0, 4, 4, 2, 8, 16]
    assert mixed_weight_bytes(bits, 24) == (64 * 24 // 8 + 7 * 2, 10 + 48 + 36 + 12 + 96 + 7 * 2)
    # fan-in 5: 3 rows at 4 bits = 15 codes -> 8 B, 2 rows at 2 bits = 10 codes -> 3 B (groups padded)
    assert mixed_weight_bytes([4, 2, 2, 4, 4], 5) == (math.ceil(16 * 5 / 8) + 10, 5 + 8 + 3 + 10)
    with pytest.raises(ValueError, match=r"widths \[3\]"):
        mixed_weight_bytes([4, 3], 8)
    for bits, fan_in in (([16, 8, 4, 2, 0, 4, 4, 2, 8, 16], 24), ([4, 2, 2, 4, 4], 5)):
        layer = MixedBitLinear.from_float(nn.Linear(fan_in, len(bits)), torch.tensor(bits), ActivationSpec(8))
        stored = sum(t.nbytes for t in mixed_state(layer, "m").values())
        assert mixed_weight_bytes(bits, fan_in)[1] == stored  # the formula is what the format writes


def test_model_bytes_counts_mixed_layers(qvla_dir):
    policy = load_policy(str(qvla_dir))
    layers = mixed_layers(policy.model)
    assert sorted(layers) == ["net.0", "net.2", "net.4"]
    rows = {r.name: r for r in model_bytes(policy.model).rows}
    for name, layer in layers.items():
        bits = layer.row_bits.tolist()
        row = rows[name]
        assert row.kind == "mixed-width" and row.spec.startswith("mixed rows 16:")
        assert row.rows_by_bits == {b: bits.count(b) for b in (16, 8, 4, 2, 0)}
        assert row.ideal_bytes == math.ceil(sum(bits) * layer.in_features / 8) + 2 * sum(
            bits.count(b) for b in (8, 4, 2)
        )
        assert row.stored_bytes == on_disk_weight_bytes(qvla_dir, name)
    n_weights = sum(m.weight.numel() for m in layers.values())
    code_bits = sum(int(m.row_bits.long().sum()) * m.in_features for m in layers.values())
    assert code_bits == 4 * n_weights  # the budget, met exactly


def test_inspect_shows_bit_histograms_and_honest_bytes(qvla_dir):
    policy = load_policy(str(qvla_dir))
    text = inspect_text(qvla_dir)
    assert "## Mixed-width layers (3)" in text and "W4c-sym" not in text.split("## Decisions")[0]
    for name, layer in mixed_layers(policy.model).items():
        bits = layer.row_bits.tolist()
        counts = " | ".join(str(bits.count(b)) for b in (16, 8, 4, 2, 0))
        ideal, stored = mixed_weight_bytes(bits, layer.in_features)
        assert stored == on_disk_weight_bytes(qvla_dir, name)
        avg = sum(bits) / len(bits)
        byte_cells = f"{format_bytes(ideal)} | {format_bytes(stored)}"
        assert f"| {name} | {len(bits)} | {counts} | {avg:.3f} | {byte_cells} |" in text
    total_stored = sum(on_disk_weight_bytes(qvla_dir, n) for n in ("net.0", "net.2", "net.4"))
    assert f"| {format_bytes(total_stored)} |  |" in text.split("## Mixed-width")[0]


def test_benchmark_counts_mixed_layers(qvla_dir):
    from benchmark_helpers import load_benchmark

    mcl = load_benchmark("methods_closed_loop")
    policy = load_policy(str(qvla_dir))
    report = model_bytes(policy.model)
    assert mcl.in_scope_bytes(qvla_dir) == (report.fp16_bytes, report.ideal_bytes, report.stored_bytes)
    config = mcl.method_config("qvla", "avg2")
    assert config.avg_bits == 2.0 and config.spec.activation is None
    assert mcl.method_config("quantvla", "w4a4").spec.activation.bits == 4


@pytest.fixture(scope="module")
def calib_dataset(tmp_path_factory):
    """A two-task calibration split of straight-line episodes (the toy reads only states and instructions)."""
    import json

    import numpy as np

    from daptq.data.format import FORMAT_VERSION, Episode, shard_path, write_shard

    root = tmp_path_factory.mktemp("calib-ds")
    rng = np.random.default_rng(3)
    for task in ("reach", "push"):
        eps = []
        for i in range(8):
            goal = np.array([rng.uniform(-0.4, 0.4), rng.uniform(0.35, 0.9), rng.uniform(0.05, 0.3)])
            t = np.linspace(0, 1, 12, dtype=np.float32)[:, None]
            ee = (np.array([0.0, 0.6, 0.15]) + t * (goal - [0.0, 0.6, 0.15])).astype(np.float32)
            eps.append(
                Episode(
                    task=task,
                    instruction=f"{task} the goal",
                    seed=100_000 + i,
                    success=True,
                    images=np.zeros((12, 8, 8, 3), np.uint8),
                    states=np.concatenate([ee, np.ones((12, 1), np.float32)], axis=1),
                    actions=rng.uniform(-1, 1, (12, 4)).astype(np.float32),
                    ee_pos=ee,
                    executed_actions=np.zeros((12, 4), np.float32),
                    step_success=np.zeros(12, bool),
                )
            )
        write_shard(shard_path(root, "calib", task, 0), eps, [])
    info = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "tasks": ["reach", "push"],
        "splits": {"calib": {"episodes_per_task": 8, "seed_start": 100_000}},
        "action_names": ["dx", "dy", "dz", "grip"],
    }
    (root / "meta").mkdir()
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


def test_cli_quantize_qvla_then_eval_and_inspect(calib_dataset, tmp_path, capsys):
    from daptq.cli import main

    out = tmp_path / "toy-qvla"
    args = ["quantize", "toy", "--method", "qvla", "--avg-bits", "4", "--out", str(out)]
    assert main([*args, "--calibration", str(calib_dataset), "--trajectories", "8"]) == 0
    assert load_policy(str(out)).quant_record.decisions["average_bits"] == 4.0
    assert main(["inspect", str(out)]) == 0
    assert "## Mixed-width layers (3)" in capsys.readouterr().out
    run = tmp_path / "run"
    ev = ["eval", str(out), "--reference", "toy", "--tasks", "reach", "--episodes", "1", "--max-steps", "12"]
    assert main([*ev, "--out", str(run), "--no-progress"]) == 0
    assert (run / "summary.json").is_file()
