"""Calibration from the user's own data: LeRobotDataset v2.1 / v3.0 (parquet + MP4) and episode directories.

The datasets are written here in each layout (tiny MP4s with PyAV). Every frame of episode e, step t is one
flat gray level, so a decoded frame identifies the step it came from despite lossy coding.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daptq.data.episodes import (
    calibration_from_path,
    detect_format,
    parse_keys,
    read_episode_dir,
)
from daptq.data.lerobot import LeRobotReader

FPS = 10
H = W = 32
STATE_DIM, ACTION_DIM = 4, 4
LENGTHS = [7, 5, 8, 6, 9, 5]
TASKS = ["pick the cube", "open the drawer"]


def level(e: int, t: int) -> int:
    return 16 + 4 * (10 * e + t) % 220


def make_episodes(lengths=LENGTHS) -> list[dict]:
    rng = np.random.default_rng(0)
    episodes = []
    for e, T in enumerate(lengths):
        center = np.array([(e % 3) - 1.0, (e // 3) - 0.5, 0, 0], np.float32)
        episodes.append(
            {
                "state": (center + 0.05 * rng.standard_normal((T, STATE_DIM))).astype(np.float32),
                "actions": rng.standard_normal((T, ACTION_DIM)).astype(np.float32),
                "images": np.stack([np.full((H, W, 3), level(e, t), np.uint8) for t in range(T)]),
                "task_index": e % 2,
            }
        )
    return episodes


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "0", "g": "4"}  # key frames every 4: seeking is exercised
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def frame_table(episodes: list[dict], first_index: int = 0, ep_offset: int = 0) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in ("observation.state", "action", "timestamp", "frame_index")}
    cols.update(episode_index=[], index=[], task_index=[])
    index = first_index
    for e, ep in enumerate(episodes):
        for t in range(len(ep["actions"])):
            cols["observation.state"].append(ep["state"][t].tolist())
            cols["action"].append(ep["actions"][t].tolist())
            cols["timestamp"].append(t / FPS)
            cols["frame_index"].append(t)
            cols["episode_index"].append(e + ep_offset)
            cols["index"].append(index)
            cols["task_index"].append(ep["task_index"])
            index += 1
    vec = pa.list_(pa.float32(), STATE_DIM)
    return pa.table(
        {
            "observation.state": pa.array(cols["observation.state"], vec),
            "action": pa.array(cols["action"], pa.list_(pa.float32(), ACTION_DIM)),
            "timestamp": pa.array(cols["timestamp"], pa.float32()),
            "frame_index": pa.array(cols["frame_index"], pa.int64()),
            "episode_index": pa.array(cols["episode_index"], pa.int64()),
            "index": pa.array(cols["index"], pa.int64()),
            "task_index": pa.array(cols["task_index"], pa.int64()),
        }
    )


def info(version: str, episodes: list[dict], data_path: str, video_path: str) -> dict:
    vec = {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "gripper"]}
    return {
        "codebase_version": version,
        "robot_type": "test",
        "total_episodes": len(episodes),
        "total_frames": sum(len(e["actions"]) for e in episodes),
        "total_tasks": len(TASKS),
        "chunks_size": 1000,
        "fps": FPS,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": data_path,
        "video_path": video_path,
        "features": {
            "observation.images.top": {
                "dtype": "video",
                "shape": [H, W, 3],
                "names": ["height", "width", "c"],
            },
            "observation.images.wrist": {
                "dtype": "video",
                "shape": [H, W, 3],
                "names": ["height", "width", "c"],
            },
            "observation.state": vec,
            "action": vec,
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }


def write_v21(root: Path, episodes: list[dict]) -> Path:
    meta = root / "meta"
    meta.mkdir(parents=True)
    data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
    video_path = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    (meta / "info.json").write_text(json.dumps(info("v2.1", episodes, data_path, video_path)))
    (meta / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS))
    )
    lines = [
        {"episode_index": e, "tasks": [TASKS[ep["task_index"]]], "length": len(ep["actions"])}
        for e, ep in enumerate(episodes)
    ]
    (meta / "episodes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (meta / "stats.json").write_text(json.dumps({"action": {"mean": [0.0] * 4, "std": [1.0] * 4}}))
    first = 0
    for e, ep in enumerate(episodes):
        path = root / data_path.format(episode_chunk=0, episode_index=e)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(frame_table([ep], first, e), path)
        first += len(ep["actions"])
        for cam, images in (
            ("observation.images.top", ep["images"]),
            ("observation.images.wrist", 255 - ep["images"]),
        ):
            write_mp4(root / video_path.format(episode_chunk=0, video_key=cam, episode_index=e), images)
    return root


def write_v3(root: Path, episodes: list[dict], per_file: int = 4) -> Path:
    """v3.0: episodes concatenated ``per_file`` to a data file and an MP4; meta/episodes says where."""
    meta = root / "meta"
    (meta / "episodes" / "chunk-000").mkdir(parents=True)
    data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    (meta / "info.json").write_text(json.dumps(info("v3.0", episodes, data_path, video_path)))
    pq.write_table(
        pa.table({"task_index": pa.array(range(len(TASKS)), pa.int64()), "task": TASKS}),
        meta / "tasks.parquet",
    )
    rows, first = [], 0
    for f, start in enumerate(range(0, len(episodes), per_file)):
        group = episodes[start : start + per_file]
        path = root / data_path.format(chunk_index=0, file_index=f)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(frame_table(group, first, start), path)
        for cam, sign in (("observation.images.top", 1), ("observation.images.wrist", -1)):
            frames = np.concatenate([ep["images"] if sign > 0 else 255 - ep["images"] for ep in group])
            write_mp4(root / video_path.format(video_key=cam, chunk_index=0, file_index=f), frames)
        t0 = 0.0
        for i, ep in enumerate(group):
            T = len(ep["actions"])
            row = {
                "episode_index": start + i,
                "tasks": [TASKS[ep["task_index"]]],
                "length": T,
                "data/chunk_index": 0,
                "data/file_index": f,
                "dataset_from_index": first,
                "dataset_to_index": first + T,
                "stats/action/mean": [0.0] * 4,
            }
            for cam in ("observation.images.top", "observation.images.wrist"):
                row |= {
                    f"videos/{cam}/chunk_index": 0,
                    f"videos/{cam}/file_index": f,
                    f"videos/{cam}/from_timestamp": t0,
                    f"videos/{cam}/to_timestamp": t0 + T / FPS,
                }
            rows.append(row)
            t0 += T / FPS
            first += T
    pq.write_table(pa.Table.from_pylist(rows), meta / "episodes" / "chunk-000" / "file-000.parquet")
    (meta / "stats.json").write_text(json.dumps({"action": {"mean": [0.0] * 4, "std": [1.0] * 4}}))
    return root


def write_episode_dir(root: Path, episodes: list[dict], suffix: str) -> Path:
    from safetensors.numpy import save_file

    root.mkdir(parents=True)
    for e, ep in enumerate(episodes):
        arrays = {"images": ep["images"], "state": ep["state"], "actions": ep["actions"]}
        if suffix == ".npz":
            np.savez(root / f"episode_{e:03d}.npz", **arrays, instruction=np.array(TASKS[ep["task_index"]]))
        else:
            save_file(
                arrays, str(root / f"episode_{e:03d}.safetensors"), {"instruction": TASKS[ep["task_index"]]}
            )
    return root


def expected_chunk(actions: np.ndarray, t: int, k: int) -> np.ndarray:
    return np.stack([actions[min(t + i, len(actions) - 1)] for i in range(k)])


def check_round_trip(calib, episodes: list[dict], k: int, invert: bool = False) -> None:
    """Every sample is its episode's state, instruction, next-K actions (last repeated) and frame."""
    samples = []
    for b in calib.batches:
        for i in range(len(b["state"])):
            samples.append({key: (b[key][i]) for key in b})
    order = [(key, t) for key in calib.provenance["episodes"] for t in calib.provenance["frames"][key]]
    assert len(order) == len(samples)
    for (key, t), s in zip(order, samples, strict=True):
        e = int("".join(c for c in key if c.isdigit()))
        ep = episodes[e]
        np.testing.assert_array_equal(s["state"], ep["state"][t])
        np.testing.assert_array_equal(s["actions"], expected_chunk(ep["actions"], t, k))
        assert s["instruction"] == TASKS[ep["task_index"]]
        want = 255 - level(e, t) if invert else level(e, t)
        assert s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8
        assert abs(float(s["image"].mean()) - want) < 2.0, (key, t, float(s["image"].mean()), want)


@pytest.mark.parametrize("layout", ["v2.1", "v3.0"])
def test_lerobot_round_trip(tmp_path, layout):
    episodes = make_episodes()
    root = (write_v21 if layout == "v2.1" else write_v3)(tmp_path / "ds", episodes)
    assert detect_format(root) == "lerobot"
    calib = calibration_from_path(
        root, chunk_size=3, n=len(episodes), seed=0, frames_per_episode=9, batch_size=8
    )
    assert calib.num_samples == sum(LENGTHS)  # every frame of every episode: all values checked
    check_round_trip(calib, episodes, 3)
    calib.check(None)
    p = calib.provenance
    assert p["format"] == f"lerobot-{layout}" and p["seed"] == 0 and p["chunk_size"] == 3
    assert p["keys"] == {"image": "observation.images.top", "state": "observation.state", "actions": "action"}
    assert "meta/info.json" in p["files"] and all(len(h) == 64 for h in p["files"].values())
    assert any(f.endswith(".mp4") for f in p["files"]) and any(f.endswith(".parquet") for f in p["files"])
    assert sum(p["bins"].values()) == len(episodes)
    # another camera by the dataset's own key
    wrist = calibration_from_path(
        root, 3, n=2, seed=1, frames_per_episode=3, keys=parse_keys(["image=observation.images.wrist"])
    )
    check_round_trip(wrist, episodes, 3, invert=True)


def test_lerobot_sampling_is_seeded_and_stratified(tmp_path):
    episodes = make_episodes()
    root = write_v3(tmp_path / "ds", episodes)
    a = calibration_from_path(root, 4, n=3, seed=5, with_images=False)
    b = calibration_from_path(root, 4, n=3, seed=5, with_images=False)
    c = calibration_from_path(root, 4, n=3, seed=6, with_images=False)
    assert a.provenance == b.provenance and a.provenance["frames"] != c.provenance["frames"]
    assert "image" not in a.batches[0]
    assert not any(f.endswith(".mp4") for f in a.provenance["files"])  # no frame was decoded
    # 6 episodes in 6 distinct spatial bins: n=3 picks 3 different bins
    assert sorted(a.provenance["bins"].values()) == [0, 0, 0, 1, 1, 1]
    resized = calibration_from_path(root, 4, n=1, seed=0, image_size=16, frames_per_episode=2)
    assert resized.batches[0]["image"].shape == (2, 16, 16, 3) and resized.provenance["image_size"] == [
        16,
        16,
    ]
    only = calibration_from_path(root, 4, n=3, seed=0, with_images=False, tasks=["open the drawer"])
    assert only.provenance["tasks"] == ["open the drawer"]
    with pytest.raises(ValueError, match="asked for 7 calibration episodes; .* has 6"):
        calibration_from_path(root, 4, n=7)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_episode_dir_round_trip(tmp_path, suffix):
    episodes = make_episodes()
    root = write_episode_dir(tmp_path / "eps", episodes, suffix)
    assert detect_format(root) == "episodes"
    calib = calibration_from_path(root, chunk_size=5, n=len(episodes), seed=0, frames_per_episode=9)
    check_round_trip(calib, episodes, 5)
    assert calib.provenance["format"] == "episodes"
    assert sorted(calib.provenance["files"]) == sorted(
        f"episode_{e:03d}{suffix}" for e in range(len(episodes))
    )


# ---- bad inputs --------------------------------------------------------------------------------------------
def test_missing_info_json(tmp_path):
    root = write_v21(tmp_path / "ds", make_episodes()[:2])
    (root / "meta" / "info.json").unlink()
    with pytest.raises(ValueError, match="looks like a LeRobotDataset but has no meta/info.json"):
        calibration_from_path(root, 3, n=1)
    with pytest.raises(FileNotFoundError, match=r"meta/info.json is missing"):
        LeRobotReader(root)


def test_unknown_keys_and_version(tmp_path):
    root = write_v21(tmp_path / "ds", make_episodes()[:2])
    with pytest.raises(ValueError, match=r"no camera feature 'observation.images.side' \(cameras: \["):
        LeRobotReader(root, image="observation.images.side")
    with pytest.raises(ValueError, match="no state feature 'observation.joints'"):
        calibration_from_path(root, 3, n=1, keys={"state": "observation.joints"})
    with pytest.raises(ValueError, match="--calib-key 'camera=x'"):
        parse_keys(["camera=x"])
    meta = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps(meta | {"codebase_version": "v1.6"}))
    with pytest.raises(ValueError, match="codebase_version 'v1.6' is not supported"):
        LeRobotReader(root)


@pytest.mark.parametrize("layout", ["v2.1", "v3.0"])
def test_mismatched_lengths(tmp_path, layout):
    episodes = make_episodes()
    root = (write_v21 if layout == "v2.1" else write_v3)(tmp_path / "ds", episodes)
    if layout == "v2.1":
        path = root / "meta" / "episodes.jsonl"
        lines = path.read_text().splitlines()
        lines[1] = json.dumps(json.loads(lines[1]) | {"length": 99})
        path.write_text("\n".join(lines) + "\n")
    else:
        path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        rows = pq.read_table(path).to_pylist()
        rows[1]["length"] = 99
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match="episode 1 has 5 rows, the episode metadata says 99 frames"):
        calibration_from_path(root, 3, n=1)


def test_corrupt_parquet(tmp_path):
    root = write_v3(tmp_path / "ds", make_episodes())
    path = root / "data" / "chunk-000" / "file-001.parquet"
    path.write_bytes(b"PAR1 this is not parquet" + bytes(64))
    with pytest.raises(ValueError, match=r"file-001.parquet: not a readable parquet file"):
        calibration_from_path(root, 3, n=1)


@pytest.mark.parametrize("layout", ["v2.1", "v3.0"])
def test_video_shorter_than_table(tmp_path, layout):
    episodes = make_episodes()
    root = (write_v21 if layout == "v2.1" else write_v3)(tmp_path / "ds", episodes)
    cam = "observation.images.top"
    if layout == "v2.1":  # episode 2's video loses its last 3 frames
        video = root / f"videos/chunk-000/{cam}/episode_000002.mp4"
        write_mp4(video, episodes[2]["images"][:-3])
    else:  # the second file's video loses the tail of its last episode
        video = root / f"videos/{cam}/chunk-000/file-001.mp4"
        write_mp4(video, np.concatenate([ep["images"] for ep in episodes[4:]])[:-3])
    with pytest.raises(ValueError, match="the video is shorter than the dataset's table"):
        calibration_from_path(root, 3, n=6, frames_per_episode=9)


def test_unreadable_video(tmp_path):
    root = write_v21(tmp_path / "ds", make_episodes()[:1])
    (root / "videos/chunk-000/observation.images.top/episode_000000.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="episode_000000.mp4: not a readable video"):
        calibration_from_path(root, 3, n=1)


def test_episode_dir_bad_inputs(tmp_path):
    eps = make_episodes()[:2]
    root = write_episode_dir(tmp_path / "eps", eps, ".npz")
    bad = eps[0] | {"actions": eps[0]["actions"][:-1]}
    np.savez(
        root / "episode_000.npz",
        images=bad["images"],
        state=bad["state"],
        actions=bad["actions"],
        instruction=np.array("x"),
    )
    with pytest.raises(ValueError, match=r"episode_000.npz: lengths differ: images has 7 frames, actions 6"):
        read_episode_dir(root)
    np.savez(root / "episode_000.npz", state=bad["state"], actions=bad["state"])
    with pytest.raises(ValueError, match=r"episode_000.npz: no 'instruction'"):
        read_episode_dir(root)
    np.savez(root / "episode_000.npz", states=bad["state"], actions=bad["state"], instruction=np.array("x"))
    with pytest.raises(
        ValueError, match=r"episode_000.npz: missing \['state'\] \(has \['actions', 'states'\]\)"
    ):
        read_episode_dir(root)
    np.savez(
        root / "episode_000.npz",
        state=eps[0]["state"][:, :2],
        actions=eps[0]["actions"],
        instruction=np.array("x"),
    )
    with pytest.raises(ValueError, match=r"episode_001.npz: \(state dim, action dim, image shape\)"):
        read_episode_dir(root)
    (root / "episode_000.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"episode_000.npz: not a readable .npz episode"):
        read_episode_dir(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a LeRobotDataset .* no .npz/.safetensors episode files"):
        calibration_from_path(empty, 3, n=1)


def test_lerobot_image_feature_in_table(tmp_path):
    """``image`` features: PNG bytes in the parquet table ({'bytes', 'path'} per row), not an MP4."""
    import io

    from PIL import Image

    episodes = make_episodes()[:2]
    root = write_v21(tmp_path / "ds", episodes)
    meta = json.loads((root / "meta" / "info.json").read_text())
    meta["features"]["observation.images.top"]["dtype"] = "image"
    (root / "meta" / "info.json").write_text(json.dumps(meta))
    for e, ep in enumerate(episodes):
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        cells = []
        for img in ep["images"]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            cells.append({"bytes": buf.getvalue(), "path": None})
        pq.write_table(pq.read_table(path).append_column("observation.images.top", pa.array(cells)), path)
    calib = calibration_from_path(root, 2, n=2, frames_per_episode=9)
    check_round_trip(calib, episodes, 2)


def test_cli_quantize_with_lerobot_calibration(tmp_path, capsys):
    """``daptq quantize MODEL --calibration PATH`` reads a LeRobotDataset; the record names its provenance."""
    from daptq.cli import main
    from daptq.models.quantized import read_quantized_policy_config

    root = write_v3(tmp_path / "ds", make_episodes())
    out = tmp_path / "q"
    argv = ["quantize", "toy", "--method", "gptq", "--w-bits", "4", "--calibration", str(root)]
    assert main([*argv, "--trajectories", "4", "--calib-seed", "3", "--out", str(out)]) == 0
    _, qconfig = read_quantized_policy_config(out)
    calib = qconfig["record"]["calibration"]
    assert calib["format"] == "lerobot-v3.0" and calib["seed"] == 3 and len(calib["episodes"]) == 4
    assert calib["source"] == str(root) and "meta/info.json" in calib["files"]
    bad = ["--calib-key", "state=observation.joints", "--out", str(tmp_path / "q2")]
    assert main([*argv, "--trajectories", "4", *bad]) == 2
    assert "no state feature 'observation.joints'" in capsys.readouterr().err


def test_policy_calibration_shapes_for_the_policy(tmp_path):
    """A policy that sees images gets frames resized to its image size and chunks of its length; one that
    does not gets none; the chunk length is found on the policy, its adapter or its config."""
    from types import SimpleNamespace

    from daptq.data.episodes import chunk_size_of, policy_calibration

    root = write_v21(tmp_path / "ds", make_episodes())
    seeing = SimpleNamespace(image_size=48, chunk_size=6)
    calib = policy_calibration(seeing, root, n=2, seed=0)
    assert calib.batches[0]["image"].shape[1:] == (48, 48, 3) and calib.batches[0]["actions"].shape[1] == 6
    blind = SimpleNamespace(adapter=SimpleNamespace(chunk_size=2))
    assert "image" not in policy_calibration(blind, root, n=2).batches[0]
    assert chunk_size_of(SimpleNamespace(config=SimpleNamespace(chunk_size=5))) == 5
    with pytest.raises(ValueError, match="cannot tell its action-chunk length"):
        chunk_size_of(SimpleNamespace())


def test_av1_video_frames(tmp_path):
    """LeRobot encodes with AV1 (SVT-AV1) by default: frames decode at their timestamps, in any order."""
    from daptq.data.lerobot import decode_video_frames

    path = tmp_path / "av1.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libsvtav1", rate=FPS)
        stream.width = stream.height = 64
        stream.pix_fmt, stream.options = "yuv420p", {"g": "4", "preset": "10"}
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 16 + 18 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    steps = np.array([0, 7, 11, 3, 3])
    frames = decode_video_frames(path, steps / FPS, FPS)
    assert frames.shape == (5, 64, 64, 3)
    np.testing.assert_allclose(frames.reshape(5, -1).mean(1), 16 + 18 * steps, atol=3)
    with pytest.raises(ValueError, match="no frame at 1.200 s"):
        decode_video_frames(path, np.array([1.2]), FPS)


def test_lerobot_without_task_texts(tmp_path):
    """A dataset recorded without tasks is refused with a clear message, unless given an instruction."""
    episodes = make_episodes()[:2]
    root = write_v21(tmp_path / "ds", episodes)
    (root / "meta" / "tasks.jsonl").unlink()
    path = root / "meta" / "episodes.jsonl"
    path.write_text(
        "".join(
            json.dumps({"episode_index": e, "length": len(ep["actions"])}) + "\n"
            for e, ep in enumerate(episodes)
        )
    )
    with pytest.raises(ValueError, match="episode 0 has no task text"):
        calibration_from_path(root, 3, n=2, with_images=False)
    calib = calibration_from_path(root, 3, n=2, with_images=False, instruction="stack the cups")
    assert calib.provenance["tasks"] == ["stack the cups"]


def test_episode_images_checked_by_their_header(tmp_path):
    """Images are validated from the file's header (read only for picked frames), in both formats."""
    from safetensors.numpy import save_file

    ep = make_episodes()[0]
    root = tmp_path / "eps"
    root.mkdir()
    np.savez_compressed(
        root / "a.npz",
        images=ep["images"].astype(np.float32),
        state=ep["state"],
        actions=ep["actions"],
        instruction=np.array("x"),
    )
    with pytest.raises(ValueError, match=r"a.npz: 'images' must be uint8 \(T, H, W, 3\), got float32"):
        read_episode_dir(root)
    (root / "a.npz").unlink()
    save_file(
        {"images": ep["images"][:3], "state": ep["state"], "actions": ep["actions"]},
        str(root / "b.safetensors"),
        {"instruction": "x"},
    )
    with pytest.raises(ValueError, match=r"b.safetensors: lengths differ: images has 3 frames, actions 7"):
        read_episode_dir(root)
    save_file(
        {"images": ep["images"], "state": ep["state"], "actions": ep["actions"]},
        str(root / "b.safetensors"),
        {"instruction": "x"},
    )
    (view,) = read_episode_dir(root)
    np.testing.assert_array_equal(view.frames(np.array([5, 1])), ep["images"][[5, 1]])
