"""The cached calibration split grows on demand: a cache smaller than asked for is extended (same seeds, the
old episodes byte for byte), concurrent callers take turns, and an interrupted extension leaves it valid."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import daptq.data.generate as generate
from daptq.data.calibration import _CacheLock, ensure_calibration_dataset, sample_calibration
from daptq.data.format import read_shard

SIZE = 16  # px: rendering is not what these tests are about


def _shard(root):
    (path,) = sorted((root / "calib").glob("reach-*.npz"))
    return path


def _same_episode(a, b) -> None:
    assert a.seed == b.seed
    for name in ("images", "states", "actions", "ee_pos", "executed_actions", "step_success"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.slow
def test_a_small_cache_is_extended_with_the_same_seeds_not_refused(tmp_path, monkeypatch):
    root = ensure_calibration_dataset(SIZE, "corner3", 1, ["reach"], tmp_path / "cache", progress=False)
    (first,) = read_shard(_shard(root))
    before = sample_calibration(root, 1, chunk_size=4, seed=0)

    # An extension that dies midway (the second new episode) leaves the old cache as it was and usable.
    real = generate.rollout_episode
    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "rollout_episode", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        ensure_calibration_dataset(SIZE, "corner3", 3, ["reach"], tmp_path / "cache", progress=False)
    monkeypatch.setattr(generate, "rollout_episode", real)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["complete"] and info["splits"]["calib"]["episodes_per_task"] == 1
    (still,) = read_shard(_shard(root))
    _same_episode(still, first)
    assert sample_calibration(root, 1, chunk_size=4, seed=0).provenance == before.provenance

    # Asking for more extends the cache; the first episode stays, the new ones are a fresh run's.
    again_root = ensure_calibration_dataset(SIZE, "corner3", 3, ["reach"], tmp_path / "cache", progress=False)
    assert again_root == root
    extended = read_shard(_shard(root))
    assert len(extended) == 3
    _same_episode(extended[0], first)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["complete"] and info["splits"]["calib"]["episodes_per_task"] == 3
    fresh = read_shard(
        _shard(ensure_calibration_dataset(SIZE, "corner3", 3, ["reach"], tmp_path / "fresh", progress=False))
    )
    for a, b in zip(extended, fresh, strict=True):
        _same_episode(a, b)
    # Sampling restricted to the episodes the small cache had gives the set it gave then.
    again = sample_calibration(root, 1, chunk_size=4, seed=0, episodes_per_task=1)
    assert again.provenance["episodes"] == before.provenance["episodes"]
    np.testing.assert_array_equal(again.batches[0]["image"], before.batches[0]["image"])
    assert len(sample_calibration(root, 3, chunk_size=4, seed=0).provenance["episodes"]) == 3


def test_extension_plans_only_the_missing_episodes(tmp_path):
    """The planner extends a short shard and leaves complete ones alone (no simulator needed)."""
    from daptq.data.format import Episode, write_shard

    def episode(seed):
        z = np.zeros((2, 4), np.float32)
        img = np.zeros((2, 8, 8, 3), np.uint8)
        return Episode("reach", "reach", seed, True, img, z, z, z[:, :3], z, np.zeros(2, bool))

    root = tmp_path / "ds"
    write_shard(root / "calib" / "reach-0000.npz", [episode(100_000)], [])
    write_shard(root / "calib" / "push-0000.npz", [episode(100_000), episode(100_002)], [100_001])
    cfg = {"image_size": 8, "camera": "corner3", "noise_std": 0.2, "episodes_per_shard": 25}
    jobs = generate._pending_jobs(generate._plan_jobs(root, ["reach", "push"], {"calib": 2}, cfg))
    assert [(j["task"], j.get("extend", False)) for j in jobs] == [("reach", True)]


def test_concurrent_callers_wait_for_the_lock_then_reuse_the_cache(tmp_path, monkeypatch):
    """A second caller blocks while another process holds the cache's lock, then re-checks and finds the
    split made: it generates nothing itself."""
    from daptq.envs.tasks import SCENE_VERSION

    root = tmp_path / "cache" / f"calib-corner3-{SIZE}px-s{SCENE_VERSION}"
    root.mkdir(parents=True)
    made = []

    def fake_generate(root_, tasks, splits, **kwargs):
        made.append(splits)
        return root_

    monkeypatch.setattr(generate, "generate_dataset", fake_generate)
    result = {}
    with _CacheLock(root, progress=False):
        worker = threading.Thread(
            target=lambda: result.setdefault(
                "root", ensure_calibration_dataset(SIZE, "corner3", 2, ["reach"], tmp_path / "cache")
            )
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive(), "the second caller did not wait for the lock"
        # what the holder makes meanwhile
        (root / "meta").mkdir()
        info = {"complete": True, "tasks": ["reach"], "splits": {"calib": {"episodes_per_task": 2}}}
        (root / "meta" / "info.json").write_text(json.dumps(info))
    worker.join(timeout=30)
    assert not worker.is_alive() and result["root"] == root
    assert made == []  # it found the holder's cache and generated nothing
