"""Expert demonstrations for a suite's tasks, DART-style, written as a sharded dataset.

The suite is Meta-World MT10 by default (LIBERO, or any registered suite with a scripted expert).

Each step executes the scripted expert's action plus Gaussian noise, but records the *clean* expert action as
the label, so the data shows how to recover from small deviations (DART, Laskey et al. 2017). Only successful
episodes are kept; recording stops ``post_success_steps`` steps after the first success, so the policy also
sees what to do once the task is done. Everything about the benchmark (tasks, expert, splits of episode ids,
state and action conventions, step limits, default camera, noise) comes from its suite
(``daptq.envs.suite``); the training, calibration and validation splits are the suite's ``train`` /
``calib`` / ``val`` ids and the ``eval`` split is never generated.
Run ``python -m daptq.data.generate --help``.
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
    DEMO_VERSION,
    FORMAT_VERSION,
    LEGACY_DEMO_VERSION,
    LEGACY_SCENE_VERSION,
    Episode,
    atomic_write_json,
    read_shard_summary,
    shard_path,
    write_shard,
)
from daptq.data.stats import compute_stats
from daptq.envs.suite import DEFAULT_SUITE, Suite, get_suite, is_builtin

DEFAULT_NOISE_STD = 0.2  # per action dim, i.e. 0.1 of the [-1, 1] action range
DEFAULT_EPISODES_PER_SHARD = 25
DEFAULT_POST_SUCCESS_STEPS = 5
# Shard k of a split draws seeds from [split_start + k * SEED_BLOCK, ...), trying seeds in order until it has
# enough successful episodes; failures are recorded as discarded seeds. Keeps shards independent (parallel,
# resumable) and every split inside its own 100_000-seed range.
SEED_BLOCK = 1000
MAX_ATTEMPTS_PER_EPISODE = 4
# Generation rolls out to Meta-World's horizon so that DEFAULT_MAX_STEPS can be measured from the data
# (the Meta-World suite's ``generation_max_steps``; other suites declare their own).
GENERATION_MAX_STEPS = 500
# Ids a split may use per task, at most (shards draw blocks of SEED_BLOCK ids from the split's start).
MAX_SPLIT_IDS = 100_000
_NOISE_SALT = 0xDA


def rollout_episode(
    env,
    seed: int,
    noise_std: float,
    post_success_steps: int = DEFAULT_POST_SUCCESS_STEPS,
    expert: Callable[[Any], Any] | None = None,
) -> Episode:
    """One noisy expert rollout from ``env.reset(seed=seed)``; ``env`` must not terminate on success.

    ``expert(env)`` gives the clean action (default: Meta-World's scripted expert for ``env.task``)."""
    if expert is None:
        from daptq.envs import expert_action as expert

    if env.terminate_on_success:
        raise ValueError("rollout_episode needs an env made with terminate_on_success=False")
    rng = np.random.default_rng([seed, _NOISE_SALT])
    obs, info = env.reset(seed=seed)
    images, states, actions, executed, ee_pos, step_success = [], [], [], [], [], []
    success_at = None
    while True:
        action = np.asarray(expert(env), dtype=np.float32)
        noise = rng.normal(0.0, noise_std, action.shape)
        noisy = np.clip(action + noise, -1.0, 1.0).astype(np.float32)
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
_WORKER_EXPERTS: dict[tuple, Any] = {}


def _worker_env(task: str, image_size: int, camera: str, suite: str = DEFAULT_SUITE):
    key = (suite, task, image_size, camera)
    if key not in _WORKER_ENVS:
        if suite == DEFAULT_SUITE:  # Meta-World's demonstrations, as they always were made
            from daptq.envs import make_env

            _WORKER_ENVS[key] = make_env(
                task,
                image_size=image_size,
                camera=camera,
                max_steps=GENERATION_MAX_STEPS,
                terminate_on_success=False,
            )
        else:
            bench = get_suite(suite)
            _WORKER_ENVS[key] = bench.make_env(
                task,
                image_size=image_size,
                camera=camera,
                max_steps=bench.generation_steps(task),
                terminate_on_success=False,
                lazy_images=True,  # rendered when recorded, never for the observation after the last step
            )
    return _WORKER_ENVS[key]


def _worker_expert(task: str, suite: str) -> Callable[[Any], Any] | None:
    """The suite's scripted expert for ``task`` (None for Meta-World: ``rollout_episode``'s default)."""
    if suite == DEFAULT_SUITE:
        return None
    if (suite, task) not in _WORKER_EXPERTS:
        bench = get_suite(suite)
        if bench.make_expert is None:
            raise ValueError(f"suite {suite!r} has no scripted expert: it cannot generate demonstrations")
        _WORKER_EXPERTS[(suite, task)] = bench.make_expert(task)
    return _WORKER_EXPERTS[(suite, task)]


def _generate_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Fill one shard with ``job['count']`` successful episodes; returns its summary."""
    suite = job.get("suite", DEFAULT_SUITE)
    env = _worker_env(job["task"], job["image_size"], job["camera"], suite)
    expert = _worker_expert(job["task"], suite)
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
        episode = rollout_episode(env, seed, job["noise_std"], job["post_success_steps"], expert)
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


def _plan_jobs(
    root: Path,
    tasks: Sequence[str],
    episodes_per_split: dict[str, int],
    cfg: dict,
    suite: Suite | None = None,
) -> list[dict]:
    suite = suite or get_suite(DEFAULT_SUITE)
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
                        "first_seed": suite.splits[split].start + index * SEED_BLOCK,
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
    tasks, episodes_per_split, noise_std, workers, image_size, episodes_per_shard, camera, suite=None
) -> None:
    suite = suite or get_suite(DEFAULT_SUITE)
    if suite.name == DEFAULT_SUITE:
        from daptq.envs import check_tasks

        check_tasks(tasks)  # Meta-World's messages, as they were
    else:
        suite.check_tasks(tasks)
    suite.check_camera(camera)
    if suite.make_expert is None:
        raise ValueError(f"suite {suite.name!r} has no scripted expert: it cannot generate demonstrations")
    for split, count in episodes_per_split.items():
        if split not in suite.splits or split == "eval":
            valid = [s for s in suite.splits if s != "eval"]
            raise ValueError(f"unknown or reserved split {split!r}; dataset splits are: {', '.join(valid)}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"episode count for split {split!r} must be an int >= 0, got {count!r}")
        room = min(MAX_SPLIT_IDS, suite.split_room(split) or MAX_SPLIT_IDS)
        if math.ceil(count / episodes_per_shard) * SEED_BLOCK > room:
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
    tasks: Sequence[str] | None,
    episodes_per_split: dict[str, int],
    noise_std: float | None = None,
    workers: int = 1,
    image_size: int | None = None,
    camera: str | None = None,
    episodes_per_shard: int = DEFAULT_EPISODES_PER_SHARD,
    post_success_steps: int = DEFAULT_POST_SUCCESS_STEPS,
    progress: bool = True,
    suite: str = DEFAULT_SUITE,
) -> Path:
    """Generate (or finish, or extend) a dataset at ``root``; complete shards are kept as they are.

    ``episodes_per_split`` maps split -> successful episodes per task, e.g. ``{"train": 100, "calib": 16}``.
    Re-running with a different image size, camera, noise, shard size or scene version than ``root`` was made
    with raises. A re-run may add tasks or episodes: a shard with fewer episodes than asked for is extended
    (the seeds after its last try, as a fresh run would have drawn them, so its episodes stay byte for byte),
    and the summary then covers every task and shard at ``root``. One writer at a time (the calibration cache
    takes a lock around it).

    ``suite`` names the benchmark (``daptq.envs.suite``); ``tasks`` may name its task families (None: all
    its tasks); ``noise_std``, ``image_size`` and ``camera`` default to the suite's (Meta-World: 0.2, 96 px,
    "corner3"). A suite registered in this process only (not a built-in) generates with ``workers=1``.
    """
    bench = get_suite(suite)
    noise_std = bench.noise_std if noise_std is None else noise_std
    image_size = bench.observations.default_image_size if image_size is None else image_size
    camera = bench.observations.default_camera if camera is None else camera
    tasks = list(bench.tasks) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    tasks = [t for item in tasks for t in bench.families.get(item, (item,))]  # "mt10", "libero_spatial"
    _check_arguments(
        tasks, episodes_per_split, noise_std, workers, image_size, episodes_per_shard, camera, bench
    )
    if workers > 1 and not is_builtin(bench.name):
        raise ValueError(
            f"suite {bench.name!r} is registered in this process only (not a built-in suite): worker "
            "processes cannot build its environments; generate with workers=1"
        )
    root = Path(root)
    config = {
        "image_size": image_size,
        "camera": camera,
        "noise_std": noise_std,
        "episodes_per_shard": episodes_per_shard,
        "post_success_steps": post_success_steps,
        "seed_block": SEED_BLOCK,
        "scene_version": bench.scene_version,
        "demo_version": DEMO_VERSION,
    }
    if bench.name != DEFAULT_SUITE:  # Meta-World datasets keep the settings they always recorded
        config.update(suite=bench.name, suite_version=bench.version)
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
    tasks = [t for t in bench.tasks if t in set(old_tasks) | set(tasks)]

    from daptq.envs import use_headless_rendering

    use_headless_rendering()  # before MuJoCo's first import in this process, or its GL backend stays unset
    starts = {s: split.start for s, split in bench.splits.items()}
    info = {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "suite": bench.name,
        "suite_version": bench.version,
        "tasks": tasks,
        "instructions": {t: bench.tasks[t] for t in tasks},
        "image_size": image_size,
        "camera": camera,
        "state_dim": len(bench.observations.state),
        "state_names": list(bench.observations.state),
        "action_dim": bench.action_space.dim,
        "action_names": list(bench.action_space.names),
        "action_space": bench.action_space.to_dict(),
        "config": config,
        "splits": {
            s: {"episodes_per_task": n, "seed_start": starts[s]} for s, n in episodes_per_split.items()
        },
        "versions": _package_versions(bench),
    }
    # A complete dataset that is being extended keeps its old (complete, valid) info until the new one is
    # written: shards are replaced atomically by supersets, so an interrupted extension leaves it usable.
    if not old_complete:
        atomic_write_json(info_path, info)

    cfg = {
        k: config[k]
        for k in ("image_size", "camera", "noise_std", "episodes_per_shard", "post_success_steps")
    }
    if bench.name != DEFAULT_SUITE:
        cfg["suite"] = bench.name
    jobs = _pending_jobs(_plan_jobs(root, run_tasks, episodes_per_split, cfg, bench))
    run_shard_jobs(_generate_shard, jobs, workers, progress)

    info["splits"] = {**kept_splits, **_summarize(root, tasks, episodes_per_split)}
    for split, s in info["splits"].items():
        s["seed_start"] = starts[split]
    if "train" in episodes_per_split and episodes_per_split["train"] > 0:
        atomic_write_json(root / "meta" / "stats.json", compute_stats(root, tasks))
    info["complete"] = True
    atomic_write_json(info_path, info)
    return root


def _package_versions(suite: Suite) -> dict[str, str | None]:
    """Versions of the distributions that make the suite's rollouts (recorded in info.json)."""
    out: dict[str, str | None] = {}
    for name in suite.packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from daptq.cli_args import float_in, image_size_int, int_in, nonempty, nonnegative_int, workers_int
    from daptq.paths import check_output_dir

    p = argparse.ArgumentParser(prog="daptq data generate", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="output directory, e.g. data_cache/metaworld-mt10")
    p.add_argument(
        "--suite",
        type=nonempty,
        default=DEFAULT_SUITE,
        help="benchmark suite: metaworld (default), libero (the libero extra), or a registered one",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        type=nonempty,
        help="task names or families of the suite (default: all its tasks, e.g. the 10 MT10 tasks)",
    )
    count = nonnegative_int
    p.add_argument("--train", type=count, default=100, help="successful train episodes per task")
    p.add_argument("--calib", type=count, default=16, help="successful calibration episodes per task")
    p.add_argument("--val", type=count, default=16, help="successful validation episodes per task")
    p.add_argument(
        "--noise-std",
        type=float_in(0, 1),
        help=f"DART action noise std (default: the suite's; Meta-World {DEFAULT_NOISE_STD})",
    )
    p.add_argument("--workers", type=workers_int, default=1)
    p.add_argument("--image-size", type=image_size_int, help="pixels (default: the suite's; Meta-World 96)")
    p.add_argument(
        "--camera",
        type=nonempty,
        help="camera, or several comma-separated: corner3,topview (default: the suite's; Meta-World corner3)",
    )
    p.add_argument(
        "--episodes-per-shard",
        type=int_in(1, SEED_BLOCK // MAX_ATTEMPTS_PER_EPISODE),
        default=DEFAULT_EPISODES_PER_SHARD,
    )
    args = p.parse_args(argv)
    try:
        suite = get_suite(args.suite)
    except ValueError as exc:
        p.error(f"--suite: {exc}")
    for option, check, value in (
        ("--tasks", suite.check_tasks, args.tasks),
        ("--camera", suite.check_camera, args.camera),
    ):
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                p.error(f"{option}: {exc}")
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
        suite=args.suite,
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
