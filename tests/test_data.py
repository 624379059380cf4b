"""daptq.data: generation round trip, resumable re-runs, statistics and clear errors on bad datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from daptq.data import Episode, compute_stats, generate_dataset, open_dataset, read_shard, rollout_episode
from daptq.data.format import DEMO_VERSION, STEP_FIELDS, write_shard
from daptq.envs import SCENE_VERSION, SEED_SPLITS, TASKS, make_env

pytestmark = pytest.mark.slow  # runs the simulator

TINY = {"image_size": 24, "episodes_per_shard": 1, "noise_std": 0.2, "progress": False}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "tiny"
    generate_dataset(root, ["reach"], {"train": 2, "calib": 1}, **TINY)
    return root


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.npz"))


def test_layout_and_info(tiny_root):
    assert [p.relative_to(tiny_root).as_posix() for p in _shards(tiny_root)] == [
        "calib/reach-0000.npz",
        "train/reach-0000.npz",
        "train/reach-0001.npz",
    ]
    ds = open_dataset(tiny_root)
    assert ds.info["complete"] and ds.info["image_size"] == 24 and ds.info["camera"] == "corner3"
    assert ds.info["instructions"] == {"reach": TASKS["reach"]}
    train = ds.info["splits"]["train"]
    assert train["episodes"] == 2 and train["tasks"]["reach"]["expert_success_rate"] == 1.0
    assert set(ds.stats) >= {"state", "action"}


def test_round_trip_matches_a_fresh_rollout(tiny_root):
    episodes = list(open_dataset(tiny_root).episodes("train"))
    assert [ep.seed for ep in episodes] == [SEED_SPLITS["train"], SEED_SPLITS["train"] + 1000]
    env = make_env("reach", image_size=24, max_steps=500, terminate_on_success=False)
    try:
        fresh = rollout_episode(env, episodes[1].seed, noise_std=0.2)
    finally:
        env.close()
    stored = episodes[1]
    assert (stored.task, stored.instruction, stored.success) == (fresh.task, fresh.instruction, True)
    for name in ("images", "states", "actions", "ee_pos", "executed_actions", "step_success"):
        a, b = getattr(stored, name), getattr(fresh, name)
        assert a.dtype == b.dtype == STEP_FIELDS[name], name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert stored.images.shape == (len(stored), 24, 24, 3)
    # Labels are the clean expert actions; the executed ones had noise added.
    assert not np.allclose(stored.actions, stored.executed_actions)


def test_recording_stops_a_few_steps_after_success(tiny_root):
    post = open_dataset(tiny_root).info["config"]["post_success_steps"]
    for ep in open_dataset(tiny_root).episodes("train"):
        first_success = int(np.argmax(ep.step_success))
        assert ep.step_success[first_success] and len(ep) == first_success + 1 + post


def test_task_filter_and_unknown_split(tiny_root):
    ds = open_dataset(tiny_root)
    assert len(list(ds.episodes("calib", tasks=["reach"]))) == 1
    with pytest.raises(ValueError, match="'push'"):
        list(ds.episodes("train", tasks=["push"]))
    with pytest.raises(ValueError, match="'eval'"):
        list(ds.episodes("eval"))


def test_stats_match_the_train_episodes(tiny_root):
    episodes = list(open_dataset(tiny_root).episodes("train"))
    actions = np.concatenate([ep.actions for ep in episodes]).astype(np.float64)
    stats = compute_stats(tiny_root, ["reach"])
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["max"], actions.max(0))
    assert stats["state"]["count"] == len(actions)
    assert json.loads((tiny_root / "meta" / "stats.json").read_text()) == stats


def test_rerun_skips_existing_shards_and_regenerates_missing_ones(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    before = {p: p.stat().st_mtime_ns for p in _shards(root)}
    generate_dataset(root, ["reach"], {"train": 2, "calib": 1}, **TINY)
    assert {p: p.stat().st_mtime_ns for p in _shards(root)} == before
    missing = root / "train" / "reach-0001.npz"
    original = read_shard(missing)
    missing.unlink()
    generate_dataset(root, ["reach"], {"train": 2, "calib": 1}, **TINY)
    assert (root / "train" / "reach-0000.npz").stat().st_mtime_ns == before[root / "train" / "reach-0000.npz"]
    np.testing.assert_array_equal(read_shard(missing)[0].images, original[0].images)


def test_rerun_with_other_settings_is_refused(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    with pytest.raises(ValueError, match="image_size"):
        generate_dataset(root, ["reach"], {"train": 2}, **{**TINY, "image_size": 32})


def test_rerun_with_more_tasks_merges_them_into_one_dataset(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    generate_dataset(root, ["push"], {"train": 1, "calib": 1}, **TINY)
    ds = open_dataset(root)
    assert ds.tasks == ["reach", "push"]  # MT10 order, old and new
    assert ds.info["instructions"] == {"reach": TASKS["reach"], "push": TASKS["push"]}
    train = ds.info["splits"]["train"]
    assert train["episodes_per_task"] == {"reach": 2, "push": 1} and train["episodes"] == 3
    assert ds.info["splits"]["calib"]["episodes_per_task"] == 1
    assert [p.name for p in ds.shard_paths("train", ["push"])] == ["push-0000.npz"]
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert stats == compute_stats(root, ["reach", "push"])


def test_dataset_from_another_scene_version_is_refused(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["config"]["scene_version"] == SCENE_VERSION == open_dataset(root).scene_version
    # A dataset written before the field existed was made with scene version 1 and may be extended.
    del info["config"]["scene_version"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    assert open_dataset(root).scene_version == 1
    generate_dataset(root, ["reach"], {"train": 2, "calib": 1}, **TINY)
    info["config"]["scene_version"] = SCENE_VERSION + 1
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="scene_version"):
        generate_dataset(root, ["reach"], {"train": 2, "calib": 1}, **TINY)


def test_dataset_recorded_with_other_demonstrations_is_not_extended(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["config"]["demo_version"] == DEMO_VERSION == open_dataset(root).demo_version == 2
    # Written before the field existed: version 1 (Meta-World's uncorrected experts); adding to it would mix
    # demonstrations that aim at different points, so it is refused.
    del info["config"]["demo_version"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    assert open_dataset(root).demo_version == 1
    with pytest.raises(ValueError, match="demo_version"):
        generate_dataset(root, ["reach"], {"train": 2, "calib": 1}, **TINY)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_array"])
def test_corrupted_shard_names_the_file(tiny_root, tmp_path, damage):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    shard = root / "train" / "reach-0001.npz"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:500])
    elif damage == "garbage":
        shard.write_bytes(b"not a zip file at all")
    else:
        with np.load(shard) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "actions"}
        with open(shard, "wb") as f:
            np.savez(f, **arrays)
    episodes = open_dataset(root).episodes("train")
    next(episodes)  # the intact first shard still reads
    with pytest.raises(ValueError, match=r"corrupted dataset shard .*reach-0001\.npz"):
        next(episodes)


def test_inconsistent_shard_lengths_are_reported(tmp_path):
    ep = Episode(
        task="reach",
        instruction="x",
        seed=0,
        success=True,
        images=np.zeros((3, 4, 4, 3), np.uint8),
        states=np.zeros((3, 4), np.float32),
        actions=np.zeros((3, 4), np.float32),
        ee_pos=np.zeros((2, 3), np.float32),  # one step short
        executed_actions=np.zeros((3, 4), np.float32),
        step_success=np.zeros(3, bool),
    )
    path = tmp_path / "reach-0000.npz"
    write_shard(path, [ep], [])
    with pytest.raises(ValueError, match=r"reach-0000\.npz.*ee_pos"):
        read_shard(path)


def test_missing_or_damaged_metadata(tmp_path, tiny_root):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="info.json"):
        open_dataset(tmp_path / "empty")
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    (root / "meta" / "stats.json").write_text("{broken")
    with pytest.raises(ValueError, match="stats.json"):
        open_dataset(root)


def test_incomplete_dataset_needs_opt_in(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(ValueError, match="not finished"):
        open_dataset(root)
    assert len(list(open_dataset(root, allow_incomplete=True).episodes("train"))) == 2


def test_bad_generation_arguments(tmp_path):
    with pytest.raises(ValueError, match="'pushh'"):
        generate_dataset(tmp_path / "x", ["pushh"], {"train": 1}, progress=False)
    with pytest.raises(ValueError, match="'eval'"):
        generate_dataset(tmp_path / "x", ["push"], {"eval": 1}, progress=False)
    with pytest.raises(ValueError, match="noise_std"):
        generate_dataset(tmp_path / "x", ["push"], {"train": 1}, noise_std=-0.1, progress=False)
    with pytest.raises(ValueError, match="duplicate camera"):
        generate_dataset(tmp_path / "x", ["push"], {"train": 1}, camera="topview,topview", progress=False)
    assert not (tmp_path / "x").exists()


def test_command_line_generates_and_reports(tmp_path, capsys):
    from daptq.data.generate import main

    root = tmp_path / "cli"
    main(
        ["--root", str(root), "--tasks", "reach", "--train", "1", "--calib", "0", "--val", "0"]
        + ["--image-size", "16"]
    )
    out = capsys.readouterr().out
    assert "train  reach" in out and "expert success 1.000" in out
    assert open_dataset(root).info["image_size"] == 16


def test_add_cameras_replays_episodes_into_a_multi_view_copy(tiny_root, tmp_path):
    from daptq.data.add_cameras import add_cameras

    dst = add_cameras(tiny_root, tmp_path / "two", "topview", progress=False)
    ds = open_dataset(dst)
    assert ds.info["camera"] == ds.info["config"]["camera"] == "corner3,topview"
    assert ds.stats == open_dataset(tiny_root).stats
    old = list(open_dataset(tiny_root).episodes("train"))
    new = list(ds.episodes("train"))
    assert [e.seed for e in new] == [e.seed for e in old]
    env = make_env("reach", image_size=24, camera="topview", max_steps=500)
    try:
        for a, b in zip(old, new, strict=True):
            assert b.images.shape == (len(a), 2, 24, 24, 3)
            np.testing.assert_array_equal(b.images[:, 0], a.images)  # the stored view is kept as it was
            np.testing.assert_array_equal(b.actions, a.actions)
            first, _ = env.reset(seed=a.seed)
            np.testing.assert_array_equal(b.images[0, 1], first["image"])  # the new view is the new camera's
    finally:
        env.close()
    from daptq.data.format import read_shard_summary

    for src_shard, dst_shard in zip(_shards(tiny_root), _shards(dst), strict=True):
        assert read_shard_summary(dst_shard) == read_shard_summary(src_shard)  # task, seeds, discarded kept
    # A re-run skips the shards already written; adding a camera the data already has is refused.
    mtimes = [p.stat().st_mtime_ns for p in _shards(dst)]
    add_cameras(tiny_root, dst, "topview", progress=False)
    assert [p.stat().st_mtime_ns for p in _shards(dst)] == mtimes
    with pytest.raises(ValueError, match="duplicate camera"):
        add_cameras(dst, tmp_path / "three", "topview", progress=False)
    with pytest.raises(ValueError, match="dst must differ"):
        add_cameras(tiny_root, tiny_root, "topview", progress=False)


def test_add_cameras_refuses_a_replay_that_leaves_the_recorded_path(tiny_root, tmp_path):
    from daptq.data.add_cameras import add_cameras

    src = tmp_path / "src"
    shutil.copytree(tiny_root, src)
    shard = src / "train" / "reach-0001.npz"
    episodes = read_shard(shard)
    episodes[0].ee_pos = episodes[0].ee_pos + np.float32(0.01)  # not where these actions lead
    write_shard(shard, episodes, discarded_seeds=[])
    with pytest.raises(RuntimeError, match="left the recorded path"):
        add_cameras(src, tmp_path / "dst", "topview", progress=False)
    assert not (tmp_path / "dst" / "meta" / "info.json").exists()


def test_generation_renders_in_a_fresh_process_without_mujoco_gl(tmp_path):
    """The first-use calibration path (``daptq.data.generate`` imports MuJoCo for its version) must set the
    headless GL backend itself: a Python-API user has no CLI to set ``MUJOCO_GL`` for them."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from daptq.data import generate_dataset; "
        f"generate_dataset(sys.argv[1], ['reach'], {{'calib': 1}}, **{TINY!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ds")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
