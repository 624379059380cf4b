"""Expert demonstrations for the Meta-World MT10 tasks, DART-style, written as a sharded dataset.

Each step executes the scripted expert's action plus Gaussian noise, but records the *clean* expert action as
the label, so the data shows how to recover from small deviations (DART, Laskey et al. 2017). Only successful
episodes are kept; recording stops ``post_success_steps`` steps after the first success, so the policy also
sees what to do once the task is done. Run ``python -m daptq.data.generate --help``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from daptq.data.format import (
    ACTION_DIM,
    DEMO_VERSION,
    FORMAT_VERSION,
    LEGACY_DEMO_VERSION,
    LEGACY_SCENE_VERSION,
    STATE_DIM,
    Episode,
    atomic_write_json,
    read_shard_summary,
    shard_path,
    write_shard,
)
from daptq.data.stats import compute_stats

DEFAULT_NOISE_STD = 0.2  # per action dim, i.e. 0.1 of the [-1, 1] action range
DEFAULT_EPISODES_PER_SHARD = 25
DEFAULT_POST_SUCCESS_STEPS = 5
# Shard k of a split draws seeds from [split_start + k * SEED_BLOCK, ...), trying seeds in order until it has
# enough successful episodes; failures are recorded as discarded seeds. Keeps shards independent (parallel,
# resumable) and every split inside its own 100_000-seed range.
SEED_BLOCK = 1000
MAX_ATTEMPTS_PER_EPISODE = 4
# Generation rolls out to Meta-World's horizon so that DEFAULT_MAX_STEPS can be measured from the data.
GENERATION_MAX_STEPS = 500
_NOISE_SALT = 0xDA


def rollout_episode(
    env,
    seed: int,
    noise_std: float,
    post_success_steps: int = DEFAULT_POST_SUCCESS_STEPS,
) -> Episode:
    """One noisy expert rollout from ``env.reset(seed=seed)``; ``env`` must not terminate on success."""
    from daptq.envs import expert_action

    if env.terminate_on_success:
        raise ValueError("rollout_episode needs an env made with terminate_on_success=False")
    rng = np.random.default_rng([seed, _NOISE_SALT])
    obs, info = env.reset(seed=seed)
    images, states, actions, executed, ee_pos, step_success = [], [], [], [], [], []
    success_at = None
    while True:
        action = expert_action(env)
        noisy = np.clip(action + rng.normal(0.0, noise_std, ACTION_DIM), -1.0, 1.0).astype(np.float32)
        images.append(obs["image"])
        states.append(obs["state"])
        ee_pos.append(info["ee_pos"])
        actions.append(action)
        executed.append(noisy)
        obs, _, _, truncated, info = env.step(noisy)
        step_success.append(info["success"])
        if info["success"] and success_at is None:
            success_at = len(actions)
        if truncated or (success_at is not None and len(actions) >= success_at + post_success_steps):
            break
    return Episode(
        task=env.task,
        instruction=env.instruction,
        seed=int(seed),
        success=success_at is not None,
        images=np.stack(images).astype(np.uint8),
        states=np.stack(states).astype(np.float32),
        actions=np.stack(actions).astype(np.float32),
        ee_pos=np.stack(ee_pos).astype(np.float32),
        executed_actions=np.stack(executed).astype(np.float32),
        step_success=np.array(step_success, dtype=bool),
    )


_WORKER_ENVS: dict[tuple, Any] = {}


def _worker_env(task: str, image_size: int, camera: str):
    from daptq.envs import make_env

    key = (task, image_size, camera)
    if key not in _WORKER_ENVS:
        _WORKER_ENVS[key] = make_env(
            task,
            image_size=image_size,
            camera=camera,
            max_steps=GENERATION_MAX_STEPS,
            terminate_on_success=False,
        )
    return _WORKER_ENVS[key]


def _generate_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Fill one shard with ``job['count']`` successful episodes; returns its summary."""
    env = _worker_env(job["task"], job["image_size"], job["camera"])
    episodes, discarded = [], []
    seed = job["first_seed"]
    if job.get("extend"):  # keep the shard's episodes as they are and go on from the seed after its last try
        from daptq.data.format import read_shard

        path = Path(job["path"])
        summary = read_shard_summary(path)
        episodes, discarded = read_shard(path), list(summary["discarded_seeds"])
        seed = max(summary["seeds"] + discarded) + 1
    max_seed = job["first_seed"] + min(SEED_BLOCK, MAX_ATTEMPTS_PER_EPISODE * job["count"])
    while len(episodes) < job["count"]:
        if seed >= max_seed:
            raise RuntimeError(
                f"{job['task']}: only {len(episodes)}/{job['count']} successful expert episodes in "
                f"{seed - job['first_seed']} attempts (seeds {job['first_seed']}..{seed - 1}); "
                f"is noise_std={job['noise_std']} too large?"
            )
        episode = rollout_episode(env, seed, job["noise_std"], job["post_success_steps"])
        if episode.success:
            episodes.append(episode)
        else:
            discarded.append(seed)
        seed += 1
    write_shard(Path(job["path"]), episodes, discarded)
    return {"path": job["path"], "task": job["task"], "split": job["split"]}


def run_shard_jobs(work: Callable[[dict], Any], jobs: list[dict], workers: int, progress: bool) -> None:
    """Run ``work(job)`` for every job, in ``workers`` processes when there is more than one, with a bar."""
    bar = tqdm(total=len(jobs), desc="shards", unit="shard", disable=not progress)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            work(job)
            bar.update()
    else:
        # spawn, not fork: each worker opens its own EGL context.
        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(work, jobs):
                bar.update()
    bar.close()


def _plan_jobs(root: Path, tasks: Sequence[str], episodes_per_split: dict[str, int], cfg: dict) -> list[dict]:
    from daptq.envs import SEED_SPLITS

    jobs = []
    per_shard = cfg["episodes_per_shard"]
    for split, count in episodes_per_split.items():
        for task in tasks:
            for index in range(math.ceil(count / per_shard)):
                jobs.append(
                    {
                        "split": split,
                        "task": task,
                        "path": str(shard_path(root, split, task, index)),
                        "count": min(per_shard, count - index * per_shard),
                        "first_seed": SEED_SPLITS[split] + index * SEED_BLOCK,
                        **cfg,
                    }
                )
    return jobs


def _pending_jobs(jobs: list[dict]) -> list[dict]:
    """The planned shards still to make: missing ones, and existing ones with fewer episodes than planned
    (extended with the seeds a fresh generation would have tried next, so their episodes stay as they are)."""
    pending = []
    for job in jobs:
        path = Path(job["path"])
        if not path.exists():
            pending.append(job)
        elif len(read_shard_summary(path)["seeds"]) < job["count"]:
            pending.append({**job, "extend": True})
    return pending


def _check_arguments(
    tasks, episodes_per_split, noise_std, workers, image_size, episodes_per_shard, camera
) -> None:
    from daptq.envs import SEED_SPLITS, check_tasks, parse_cameras

    check_tasks(tasks)
    parse_cameras(camera)
    for split, count in episodes_per_split.items():
        if split not in SEED_SPLITS or split == "eval":
            valid = [s for s in SEED_SPLITS if s != "eval"]
            raise ValueError(f"unknown or reserved split {split!r}; dataset splits are: {', '.join(valid)}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"episode count for split {split!r} must be an int >= 0, got {count!r}")
        if math.ceil(count / episodes_per_shard) * SEED_BLOCK > 100_000:
            raise ValueError(f"split {split!r}: {count} episodes per task would overflow its seed range")
    if not 0.0 <= noise_std <= 1.0:
        raise ValueError(f"noise_std must be in [0, 1], got {noise_std}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if not 1 <= episodes_per_shard * MAX_ATTEMPTS_PER_EPISODE <= SEED_BLOCK:
        raise ValueError(f"episodes_per_shard must be in [1, {SEED_BLOCK // MAX_ATTEMPTS_PER_EPISODE}]")


def _summarize(root: Path, tasks: Sequence[str], episodes_per_split: dict[str, int]) -> dict[str, Any]:
    """Per split and task: kept/discarded episodes, expert success rate and lengths, read from the shards."""
    splits = {}
    for split in episodes_per_split:
        per_task, total = {}, 0
        for task in tasks:
            lengths, seeds, discarded = [], [], []
            for path in sorted((root / split).glob(f"{task}-[0-9][0-9][0-9][0-9].npz")):
                s = read_shard_summary(path)
                lengths += s["lengths"]
                seeds += s["seeds"]
                discarded += s["discarded_seeds"]
            attempts = len(seeds) + len(discarded)
            per_task[task] = {
                "episodes": len(seeds),
                "discarded": len(discarded),
                "expert_success_rate": len(seeds) / attempts if attempts else None,
                "mean_length": float(np.mean(lengths)) if lengths else None,
                "p95_length": float(np.percentile(lengths, 95)) if lengths else None,
                "max_length": int(max(lengths)) if lengths else None,
                "seeds": [min(seeds + discarded), max(seeds + discarded)] if attempts else None,
            }
            total += len(seeds)
        counts = {t: v["episodes"] for t, v in per_task.items()}
        per_task_count = counts[tasks[0]] if len(set(counts.values())) == 1 else counts
        splits[split] = {"episodes": total, "episodes_per_task": per_task_count, "tasks": per_task}
    return splits


def generate_dataset(
    root: str | os.PathLike,
    tasks: Sequence[str],
    episodes_per_split: dict[str, int],
    noise_std: float = DEFAULT_NOISE_STD,
    workers: int = 1,
    image_size: int = 96,
    camera: str = "corner3",
    episodes_per_shard: int = DEFAULT_EPISODES_PER_SHARD,
    post_success_steps: int = DEFAULT_POST_SUCCESS_STEPS,
    progress: bool = True,
) -> Path:
    """Generate (or finish, or extend) a dataset at ``root``; complete shards are kept as they are.

    ``episodes_per_split`` maps split -> successful episodes per task, e.g. ``{"train": 100, "calib": 16}``.
    Re-running with a different image size, camera, noise, shard size or scene version than ``root`` was made
    with raises. A re-run may add tasks or episodes: a shard with fewer episodes than asked for is extended
    (the seeds after its last try, as a fresh run would have drawn them, so its episodes stay byte for byte),
    and the summary then covers every task and shard at ``root``. One writer at a time (the calibration cache
    takes a lock around it).
    """
    from daptq.envs import MT10, SCENE_VERSION, SEED_SPLITS, TASKS

    tasks = list(tasks)
    _check_arguments(tasks, episodes_per_split, noise_std, workers, image_size, episodes_per_shard, camera)
    root = Path(root)
    config = {
        "image_size": image_size,
        "camera": camera,
        "noise_std": noise_std,
        "episodes_per_shard": episodes_per_shard,
        "post_success_steps": post_success_steps,
        "seed_block": SEED_BLOCK,
        "scene_version": SCENE_VERSION,
        "demo_version": DEMO_VERSION,
    }
    info_path = root / "meta" / "info.json"
    old_tasks: list[str] = []
    old_complete, kept_splits = False, {}
    if info_path.is_file():
        from daptq.data.format import _read_json

        old_info = _read_json(info_path)
        old = {
            "scene_version": LEGACY_SCENE_VERSION,
            "demo_version": LEGACY_DEMO_VERSION,
            **old_info.get("config", {}),
        }
        changed = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{info_path} was generated with different settings {changed} (old, new)")
        old_tasks = list(old_info.get("tasks", []))
        old_complete = bool(old_info.get("complete"))
        kept_splits = {k: v for k, v in old_info.get("splits", {}).items() if k not in episodes_per_split}
    run_tasks = tasks
    tasks = [t for t in MT10 if t in set(old_tasks) | set(tasks)]

    from daptq.envs import use_headless_rendering

    use_headless_rendering()  # before MuJoCo's first import in this process, or its GL backend stays unset
    import mujoco

    info = {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "tasks": tasks,
        "instructions": {t: TASKS[t] for t in tasks},
        "image_size": image_size,
        "camera": camera,
        "state_dim": STATE_DIM,
        "state_names": ["ee_x", "ee_y", "ee_z", "gripper_opening"],
        "action_dim": ACTION_DIM,
        "action_names": ["dx", "dy", "dz", "grip"],
        "config": config,
        "splits": {
            s: {"episodes_per_task": n, "seed_start": SEED_SPLITS[s]} for s, n in episodes_per_split.items()
        },
        "versions": {"metaworld": importlib.metadata.version("metaworld"), "mujoco": mujoco.__version__},
    }
    # A complete dataset that is being extended keeps its old (complete, valid) info until the new one is
    # written: shards are replaced atomically by supersets, so an interrupted extension leaves it usable.
    if not old_complete:
        atomic_write_json(info_path, info)

    cfg = {
        k: config[k]
        for k in ("image_size", "camera", "noise_std", "episodes_per_shard", "post_success_steps")
    }
    jobs = _pending_jobs(_plan_jobs(root, run_tasks, episodes_per_split, cfg))
    run_shard_jobs(_generate_shard, jobs, workers, progress)

    info["splits"] = {**kept_splits, **_summarize(root, tasks, episodes_per_split)}
    for split, s in info["splits"].items():
        s["seed_start"] = SEED_SPLITS[split]
    if "train" in episodes_per_split and episodes_per_split["train"] > 0:
        atomic_write_json(root / "meta" / "stats.json", compute_stats(root, tasks))
    info["complete"] = True
    atomic_write_json(info_path, info)
    return root


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from daptq.cli_args import cameras, float_in, image_size_int, int_in, nonnegative_int, workers_int
    from daptq.envs import MT10
    from daptq.paths import check_output_dir

    p = argparse.ArgumentParser(prog="daptq data generate", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="output directory, e.g. data_cache/metaworld-mt10")
    p.add_argument("--tasks", nargs="+", default=list(MT10), help="MT10 task names (default: all 10)")
    count = nonnegative_int
    p.add_argument("--train", type=count, default=100, help="successful train episodes per task")
    p.add_argument("--calib", type=count, default=16, help="successful calibration episodes per task")
    p.add_argument("--val", type=count, default=16, help="successful validation episodes per task")
    p.add_argument("--noise-std", type=float_in(0, 1), default=DEFAULT_NOISE_STD, help="action noise std")
    p.add_argument("--workers", type=workers_int, default=1)
    p.add_argument("--image-size", type=image_size_int, default=96)
    p.add_argument(
        "--camera",
        type=cameras,
        default="corner3",
        help="camera, or several comma-separated: corner3,topview",
    )
    p.add_argument(
        "--episodes-per-shard",
        type=int_in(1, SEED_BLOCK // MAX_ATTEMPTS_PER_EPISODE),
        default=DEFAULT_EPISODES_PER_SHARD,
    )
    args = p.parse_args(argv)
    # checked before anything is written (a dataset without train episodes has no stats.json to open)
    check_output_dir(args.root, "--root")
    if args.train + args.calib + args.val == 0:
        p.error("--train, --calib and --val are all 0: no episodes to generate")
    if args.train == 0 and not (Path(args.root) / "meta" / "stats.json").is_file():
        p.error("--train 0: a new dataset needs train episodes (its normalization statistics come from them)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    root = generate_dataset(
        args.root,
        args.tasks,
        {"train": args.train, "calib": args.calib, "val": args.val},
        noise_std=args.noise_std,
        workers=args.workers,
        image_size=args.image_size,
        camera=args.camera,
        episodes_per_shard=args.episodes_per_shard,
    )
    from daptq.data.format import open_dataset

    ds = open_dataset(root)
    for split, s in ds.info["splits"].items():
        for task, t in s["tasks"].items():
            if not t["episodes"]:
                continue
            print(
                f"{split:6s} {task:22s} kept {t['episodes']:4d} discarded {t['discarded']:3d} "
                f"expert success {t['expert_success_rate']:.3f} mean len {t['mean_length']:.1f} "
                f"p95 len {t['p95_length']:.1f}"
            )


if __name__ == "__main__":
    main()
