"""Calibration sampling: the calib split only, stratified by end-effector motion, chunks, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daptq.data.calibration import (
    SPATIAL_BINS,
    CalibrationSet,
    sample_calibration,
    spatial_bins,
    stratified_pick,
)
from daptq.data.chunks import episode_chunks
from daptq.data.format import FORMAT_VERSION, Episode, shard_path, write_shard
from daptq.methods import quantize_policy
from daptq.methods.rtn import RTNConfig
from daptq.models.toy import ToyPolicy
from daptq.quant import ActivationSpec, QuantSpec, WeightSpec


def _episode(task: str, seed: int, goal: np.ndarray, length: int = 12) -> Episode:
    t = np.linspace(0, 1, length, dtype=np.float32)[:, None]
    start = np.array([0.0, 0.6, 0.15])
    ee = (start + t * (goal - start)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return Episode(
        task=task,
        instruction=f"do {task}",
        seed=seed,
        success=True,
        images=rng.integers(0, 255, (length, 8, 8, 3), dtype=np.uint8),
        states=np.concatenate([ee, np.ones((length, 1), np.float32)], axis=1),
        actions=np.arange(length * 4, dtype=np.float32).reshape(length, 4) / 100,
        ee_pos=ee,
        executed_actions=np.zeros((length, 4), np.float32),
        step_success=np.zeros(length, bool),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two tasks x 12 calib episodes towards seeded random goals; 9 of 'reach' crowd one corner."""
    root = tmp_path_factory.mktemp("calib-ds")
    rng = np.random.default_rng(7)
    for task in ("reach", "push"):
        eps = []
        for i in range(12):
            if task == "reach" and i < 9:
                goal = np.array([0.3, 0.85, 0.1]) + rng.normal(0, 0.005, 3)  # far right, crowded
            else:
                goal = np.array([rng.uniform(-0.4, 0.4), rng.uniform(0.35, 0.9), rng.uniform(0.05, 0.3)])
            eps.append(_episode(task, 100_000 + i, goal))
        write_shard(shard_path(root, "calib", task, 0), eps, [])
    info = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "tasks": ["reach", "push"],
        "splits": {"calib": {"episodes_per_task": 12, "seed_start": 100_000}},
        "action_names": ["dx", "dy", "dz", "grip"],
    }
    (root / "meta").mkdir()
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


def test_spatial_bins_split_x_at_the_median_and_y_in_tertiles():
    pos = np.array([[x, y, 0.1] for x in (-0.2, 0.2) for y in (0.4, 0.6, 0.8)])
    assert spatial_bins(pos).tolist() == [0, 1, 2, 3, 4, 5] and len(SPATIAL_BINS) == 6
    assert SPATIAL_BINS[spatial_bins(pos)[5]] == "right-far"


def test_stratified_pick_covers_every_bin_first():
    bins = [0] * 20 + [1, 2, 3, 4, 5]
    picked = stratified_pick(bins, 6, seed=0)
    assert sorted(bins[i] for i in picked) == [0, 1, 2, 3, 4, 5]
    assert stratified_pick(bins, 6, seed=0) == picked and len(set(stratified_pick(bins, 25, 1))) == 25


def test_sample_is_stratified_deterministic_and_has_chunks(dataset):
    cal = sample_calibration(dataset, 6, chunk_size=5, frames_per_trajectory=3, batch_size=4, seed=3)
    assert cal.provenance["bins"] == dict.fromkeys(SPATIAL_BINS, 1)  # 6 trajectories, one per spatial bin
    assert cal.provenance["split"] == "calib" and all(s >= 100_000 for _, s in cal.provenance["episodes"])
    assert cal.num_samples == 18 and [len(b["state"]) for b in cal.batches] == [4, 4, 4, 4, 2]
    b = cal.batches[0]
    assert b["image"].shape == (4, 8, 8, 3) and b["actions"].shape == (4, 5, 4)
    again = sample_calibration(dataset, 6, chunk_size=5, frames_per_trajectory=3, batch_size=4, seed=3)
    assert again.provenance == cal.provenance
    assert all(
        np.array_equal(x["state"], y["state"]) for x, y in zip(cal.batches, again.batches, strict=True)
    )
    other = sample_calibration(dataset, 6, chunk_size=5, frames_per_trajectory=3, batch_size=4, seed=4)
    assert other.provenance["episodes"] != cal.provenance["episodes"]


def test_chunks_repeat_the_last_label_past_the_episode_end():
    actions = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunks = episode_chunks(actions, np.array([0, 3]), 4)
    expected = np.stack([actions[[0, 1, 2, 3]], actions[[3, 4, 4, 4]]])
    assert np.array_equal(chunks, expected)


def test_task_subset_and_errors(dataset):
    cal = sample_calibration(dataset, 4, tasks=["reach"], seed=0)
    assert cal.provenance["tasks"] == ["reach"]
    with pytest.raises(ValueError, match="asked for 13 .* has 12 for tasks"):
        sample_calibration(dataset, 13, tasks=["reach"])
    with pytest.raises(ValueError, match="not in this dataset"):
        sample_calibration(dataset, 1, tasks=["door-open"])
    with pytest.raises(ValueError, match="evaluation split"):
        sample_calibration(dataset, 1, split="eval")
    with pytest.raises(ValueError, match="positive integer"):
        sample_calibration(dataset, 0)


def test_sampled_set_calibrates_a_policy(dataset):
    cal = sample_calibration(dataset, 6, chunk_size=4, seed=0)
    p = ToyPolicy()
    record = quantize_policy(
        p, RTNConfig(spec=QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))), cal
    )
    assert record.calibration["trajectories"] == 6 and record.calibration["samples"] == 24
    assert p.net[0].act_scale is not None


def test_calibration_set_check_names_the_problem():
    ok = {"state": np.zeros((2, 4), np.float32), "instruction": ["a", "b"]}
    with pytest.raises(ValueError, match="'instruction' must be 2"):
        CalibrationSet([{**ok, "instruction": ["a"]}]).check(None)
    with pytest.raises(ValueError, match="'image' has 1 rows"):
        CalibrationSet([{**ok, "image": np.zeros((1, 8, 8, 3), np.uint8)}]).check(None)


def test_first_use_generates_the_calibration_split_then_reuses_it(tmp_path, monkeypatch):
    from daptq.data.calibration import ensure_calibration_dataset

    root = ensure_calibration_dataset(48, "corner3", 1, ["reach"], tmp_path, progress=False)
    shards = sorted((root / "calib").glob("*.npz"))
    assert len(shards) == 1 and json.loads((root / "meta" / "info.json").read_text())["complete"]
    stamp = shards[0].stat().st_mtime_ns
    import daptq.data.generate as generate

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached calibration split should have been reused")

    monkeypatch.setattr(generate, "generate_dataset", no_generation)
    assert ensure_calibration_dataset(48, "corner3", 1, ["reach"], tmp_path, progress=False) == root
    assert shards[0].stat().st_mtime_ns == stamp  # reused, not regenerated
    cal = sample_calibration(root, 1, chunk_size=4, seed=0)
    assert cal.batches[0]["image"].shape[1:] == (48, 48, 3) and cal.provenance["episodes"][0][1] >= 100_000


def test_cli_quantize_samples_calibration_from_a_dataset(dataset, tmp_path):
    """Static activation scales need data: `daptq quantize --calibration DATASET` samples and records it."""
    from daptq.cli import main
    from daptq.models.registry import load_policy

    cfg = RTNConfig(spec=QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor")))
    (tmp_path / "rtn.yaml").write_text(cfg.to_yaml())
    out = tmp_path / "q"
    args = ["quantize", "toy", "--method", "rtn", "--config", str(tmp_path / "rtn.yaml"), "--out", str(out)]
    assert main([*args, "--calibration", str(dataset), "--trajectories", "6", "--calib-tasks", "push"]) == 0
    policy = load_policy(str(out))
    record = policy.quant_record
    assert record.calibration["tasks"] == ["push"] and record.calibration["trajectories"] == 6
    assert sum(record.calibration["bins"].values()) == 6 and policy.net[0].act_scale is not None
    assert (
        main([*args, "--calibration", str(dataset), "--trajectories", "50"]) == 2
    )  # more than the split has
