"""Add camera views to an existing dataset by replaying its episodes, instead of generating new ones.

Meta-World is deterministic: ``reset(seed)`` followed by the recorded *executed* (noisy) actions reproduces
every state of an episode exactly, so the new cameras see the same moments the stored images show. Each replay
is checked against the recorded end-effector positions; a mismatch (different simulator version or scene)
raises instead of writing images of another trajectory. Only the new cameras are rendered, so this costs about
half of regenerating the dataset with all cameras, and the expert never runs.

    daptq data add-cameras --src data_cache/metaworld-mt10 --dst data_cache/metaworld-mt10-top \
        --cameras topview --workers 2
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq.data.format import (
    LEGACY_SCENE_VERSION,
    Episode,
    _read_json,
    atomic_write_bytes,
    atomic_write_json,
    read_shard,
    write_shard,
)

# Replayed end-effector positions must match the recorded ones to this tolerance (metres); a deterministic
# replay matches to float32 rounding, a diverged one is off by millimetres within a few steps.
REPLAY_TOLERANCE = 1e-5


def replay_views(env, episode: Episode) -> np.ndarray:
    """Images (T, V, H, W, 3) of ``env``'s cameras along a recorded episode, checked against its ee path."""
    if episode.executed_actions is None:
        raise ValueError(f"{episode.task} seed {episode.seed}: no executed actions recorded, cannot replay")
    obs, info = env.reset(seed=episode.seed)
    images, ee_pos = [obs["image"]], [info["ee_pos"]]
    for action in episode.executed_actions[:-1]:
        obs, _, _, _, info = env.step(action)
        images.append(obs["image"])
        ee_pos.append(info["ee_pos"])
    error = float(np.abs(np.asarray(ee_pos, dtype=np.float32) - episode.ee_pos).max())
    if error > REPLAY_TOLERANCE:
        raise RuntimeError(
            f"{episode.task} seed {episode.seed}: the replay left the recorded path "
            f"(max ee error {error:.2e} m); was the dataset made with another Meta-World/MuJoCo version "
            "or scene?"
        )
    images = np.stack(images).astype(np.uint8)
    return images[:, None] if images.ndim == 4 else images


_WORKER_ENVS: dict[tuple, Any] = {}


def _add_to_shard(job: dict[str, Any]) -> str:
    from daptq.data.generate import GENERATION_MAX_STEPS
    from daptq.envs import make_env

    key = (job["task"], job["image_size"], job["new_cameras"])
    if key not in _WORKER_ENVS:
        _WORKER_ENVS[key] = make_env(
            job["task"],
            image_size=job["image_size"],
            camera=job["new_cameras"],
            max_steps=GENERATION_MAX_STEPS,
            terminate_on_success=False,
        )
    env = _WORKER_ENVS[key]
    episodes = read_shard(job["src"])
    for episode in episodes:
        old = episode.images if episode.images.ndim == 5 else episode.images[:, None]
        episode.images = np.concatenate([old, replay_views(env, episode)], axis=1)
    with np.load(job["src"], allow_pickle=False) as npz:  # read_shard checked the file; only this small array
        discarded = npz["discarded_seeds"].tolist()
    write_shard(Path(job["dst"]), episodes, discarded)
    return job["dst"]


def add_cameras(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cameras: str,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write a copy of dataset ``src`` at ``dst`` whose images also show ``cameras`` (comma-separated).

    The copy's camera setting is ``"<src cameras>,<cameras>"``. Shards already at ``dst`` are skipped, so an
    interrupted run resumes.
    """
    from daptq.envs import SCENE_VERSION, parse_cameras

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("dst must differ from src: the source dataset is read while the copy is written")
    info = _read_json(src / "meta" / "info.json")
    if not info.get("complete", False):
        raise ValueError(f"{src}: dataset generation has not finished; finish it before adding cameras")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    old_cameras = parse_cameras(info["camera"])
    new_cameras = parse_cameras(cameras)
    both = old_cameras + new_cameras
    parse_cameras(",".join(both))  # no camera twice
    scene = info.get("config", {}).get("scene_version", LEGACY_SCENE_VERSION)
    if scene != SCENE_VERSION:
        raise ValueError(f"{src} was rendered with scene version {scene}, this daptq draws {SCENE_VERSION}")

    jobs = []
    for split in info["splits"]:
        for shard in sorted((src / split).glob("*.npz")):
            target = dst / split / shard.name
            if not target.exists():
                jobs.append(
                    {
                        "src": str(shard),
                        "dst": str(target),
                        "task": shard.stem.rsplit("-", 1)[0],  # <task>-NNNN.npz, as shard_path names it
                        "image_size": info["image_size"],
                        "new_cameras": ",".join(new_cameras),
                    }
                )
    from daptq.data.generate import run_shard_jobs

    run_shard_jobs(_add_to_shard, jobs, workers, progress)

    camera = ",".join(both)
    info = {**info, "camera": camera, "config": {**info.get("config", {}), "camera": camera}}
    if (src / "meta" / "stats.json").is_file():
        atomic_write_bytes(dst / "meta" / "stats.json", (src / "meta" / "stats.json").read_bytes())
    atomic_write_json(dst / "meta" / "info.json", info)  # last: a dataset without it is not complete
    return dst


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="daptq data add-cameras", description=__doc__.split("\n")[0])
    from daptq.cli_args import cameras, workers_int
    from daptq.paths import check_input_dir, check_output_dir

    p.add_argument("--src", required=True, help="existing dataset root")
    p.add_argument("--dst", required=True, help="root of the copy with the added views")
    p.add_argument(
        "--cameras", type=cameras, required=True, help="camera(s) to add, comma-separated, e.g. topview"
    )
    p.add_argument("--workers", type=workers_int, default=1)
    args = p.parse_args(argv)
    check_input_dir(args.src, "--src")  # before any work
    check_output_dir(args.dst, "--dst")
    print(f"dataset with cameras {add_cameras(args.src, args.dst, args.cameras, args.workers)}")


if __name__ == "__main__":
    main()
