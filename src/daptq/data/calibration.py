"""Calibration data for quantization methods: a validated set of dataset-style batches plus its provenance.

A ``CalibrationSet`` holds batches as a dataset yields them (``image`` uint8 (B,H,W,3) when the policy sees
images, ``state`` (B,4), ``instruction`` list[str], ``actions`` (B,K,action_dim)); the policy's adapter turns
them into model inputs (``VLAAdapter.calibration_batches``). ``check`` refuses an empty set, NaN/Inf values
and a set recorded for another action space, before any method touches a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CalibrationSet:
    """Batches (dataset-style mappings) and where they came from (split, seeds, tasks, trajectories...)."""

    batches: tuple[Mapping[str, Any], ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.batches, Sequence) or isinstance(self.batches, str | bytes):
            raise ValueError(f"CalibrationSet.batches must be a list of batches, got {type(self.batches)}")
        object.__setattr__(self, "batches", tuple(self.batches))
        if not isinstance(self.provenance, Mapping):
            raise ValueError("CalibrationSet.provenance must be a mapping")

    @property
    def num_samples(self) -> int:
        return sum(len(np.asarray(b[_rows_key(b)])) for b in self.batches if _rows_key(b))

    def check(self, action_space: Any) -> None:
        """Refuse what would silently mis-calibrate: no batches, non-finite numbers, another action space."""
        if not self.batches:
            raise ValueError("calibration set is empty: it has no batches")
        recorded = self.provenance.get("action_space")
        if recorded is not None and action_space is not None:
            names = list(recorded.get("names", [])) if isinstance(recorded, Mapping) else recorded
            if list(names) != list(action_space.names):
                raise ValueError(
                    f"calibration set comes from action space {names}, the policy acts in "
                    f"{list(action_space.names)}"
                )
        for i, batch in enumerate(self.batches):
            if not isinstance(batch, Mapping):
                raise ValueError(f"calibration batch {i} is a {type(batch).__name__}, not a mapping")
            rows = _rows_key(batch)  # a generic adapter's batches may have no 'state' (daptq.adapt)
            if rows is None:
                raise ValueError(
                    f"calibration batch {i} has neither 'state' nor 'actions' (has {sorted(batch)})"
                )
            n = len(np.asarray(batch[rows]))
            if n == 0:
                raise ValueError(f"calibration batch {i} is empty (0 samples)")
            for key, value in batch.items():
                if key == "instruction":
                    if len(value) != n or not all(isinstance(s, str) and s for s in value):
                        raise ValueError(
                            f"calibration batch {i}: 'instruction' must be {n} non-empty strings"
                        )
                    continue
                arr = np.asarray(value)
                if len(arr) != n:
                    raise ValueError(f"calibration batch {i}: {key!r} has {len(arr)} rows, {rows!r} has {n}")
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    bad = int((~np.isfinite(arr)).sum())
                    raise ValueError(f"calibration batch {i}: {key!r} contains {bad} NaN/Inf value(s)")
            if "actions" in batch and action_space is not None:
                actions = np.asarray(batch["actions"])
                if actions.ndim != 3 or actions.shape[-1] != action_space.dim:
                    raise ValueError(
                        f"calibration batch {i}: 'actions' has shape {actions.shape}; the policy's action "
                        f"space {list(action_space.names)} needs (B, K, {action_space.dim})"
                    )


def _rows_key(batch: Mapping[str, Any]) -> str | None:
    """The key whose length is a batch's sample count: 'state', else 'actions'."""
    return next((k for k in ("state", "actions") if k in batch), None)


# ---- sampling from the calibration split ----------------------------------------------------------------
CALIBRATION_SPLIT = "calib"
# The paper's 6 spatial bins: where in the workspace a trajectory moves the end effector, as 2 x-halves
# (left / right of the median) by 3 y-thirds (near / middle / far tertiles) of the trajectories' mean
# end-effector position; edges come from the candidate trajectories, so bins are balanced on any dataset.
SPATIAL_BINS = ("left-near", "left-mid", "left-far", "right-near", "right-mid", "right-far")


def spatial_bins(mean_positions: np.ndarray) -> np.ndarray:
    """Bin index (into ``SPATIAL_BINS``) of each trajectory from its mean end-effector position (N, >=2)."""
    pos = np.asarray(mean_positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] < 2 or len(pos) == 0:
        raise ValueError(f"mean positions must be (N, 3), got {pos.shape}")
    x_edge = np.median(pos[:, 0])
    y_edges = np.quantile(pos[:, 1], [1 / 3, 2 / 3])
    right = (pos[:, 0] > x_edge).astype(int)
    third = np.searchsorted(y_edges, pos[:, 1], side="right")
    return 3 * right + np.minimum(third, 2)


def stratified_pick(bins: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` indices into ``bins`` spread evenly over the bins (round robin over shuffled bins, seeded)."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(bins):
        groups.setdefault(int(b), []).append(i)
    queues = {b: list(rng.permutation(idx)) for b, idx in sorted(groups.items())}
    picked: list[int] = []
    while len(picked) < n and any(queues.values()):
        for b in sorted(queues):
            if queues[b] and len(picked) < n:
                picked.append(int(queues[b].pop(0)))
    return sorted(picked)


def sample_calibration(
    dataset: Any,
    n_trajectories: int = 64,
    *,
    chunk_size: int = 8,
    frames_per_trajectory: int = 4,
    batch_size: int = 32,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    split: str = CALIBRATION_SPLIT,
    with_images: bool = True,
    episodes_per_task: int | None = None,
) -> CalibrationSet:
    """Calibration batches from ``split`` of a dataset (an ``EpisodeDataset`` or its path).

    Picks ``n_trajectories`` episodes stratified over the 6 spatial bins of their end-effector motion
    (``SPATIAL_BINS``), then
    ``frames_per_trajectory`` frames of each (seeded), each with its observation and its action chunk of
    ``chunk_size`` labels. Deterministic for a given dataset and seed. Never reads the evaluation split.
    ``episodes_per_task``: only the first that many episodes of each task are candidates, so a dataset that
    was extended since (``ensure_calibration_dataset``) still yields the same set.
    """
    from daptq.data.chunks import episode_chunks
    from daptq.data.format import EpisodeDataset
    from daptq.envs.suite import DEFAULT_SUITE, get_suite

    for name, value in (("n_trajectories", n_trajectories), ("frames_per_trajectory", frames_per_trajectory)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if episodes_per_task is not None and (type(episodes_per_task) is not int or episodes_per_task < 1):
        raise ValueError(f"episodes_per_task must be a positive integer or None, got {episodes_per_task!r}")
    if type(batch_size) is not int or batch_size < 1 or type(chunk_size) is not int or chunk_size < 1:
        raise ValueError(
            f"batch_size and chunk_size must be positive integers, got {batch_size}, {chunk_size}"
        )
    if split == "eval":
        raise ValueError("calibration never reads the evaluation split; use the 'calib' split")
    ds = dataset if isinstance(dataset, EpisodeDataset) else EpisodeDataset(dataset, allow_incomplete=True)
    if not ds.info.get("complete", False):
        raise ValueError(f"{ds.root}: dataset generation has not finished")
    suite = get_suite(ds.info.get("suite", DEFAULT_SUITE))  # whose evaluation episodes are never read
    tasks = list(tasks) if tasks is not None else None
    index = []  # (shard path, position in shard, task, seed, bin)
    from daptq.data.format import read_shard

    paths = ds.shard_paths(split, tasks)
    per_task: dict[str, int] = {}
    for path in paths:  # sorted: a task's shards in order, so its first episodes come first
        for pos, ep in enumerate(read_shard(path)):
            per_task[ep.task] = per_task.get(ep.task, 0) + 1
            if episodes_per_task is not None and per_task[ep.task] > episodes_per_task:
                break
            if suite.is_eval_episode(ep.seed):
                raise ValueError(
                    f"{path}: episode seed {ep.seed} is an evaluation seed of suite {suite.name}; "
                    "refusing to calibrate"
                )
            index.append((path, pos, ep.task, int(ep.seed), np.asarray(ep.ee_pos, np.float64).mean(axis=0)))
    if len(index) < n_trajectories:
        raise ValueError(
            f"asked for {n_trajectories} calibration trajectories; split {split!r} of {ds.root} has "
            f"{len(index)}{'' if tasks is None else f' for tasks {tasks}'}"
            + ("" if episodes_per_task is None else f" (first {episodes_per_task} per task)")
        )
    bins = spatial_bins(np.stack([e[4] for e in index]))
    picked = stratified_pick(bins.tolist(), n_trajectories, seed)
    rng = np.random.default_rng(seed + 1)
    samples: list[dict[str, Any]] = []
    by_path: dict[Path, list[int]] = {}
    for i in picked:
        by_path.setdefault(index[i][0], []).append(i)
    for path, chosen in by_path.items():
        episodes = read_shard(path)
        for i in chosen:
            ep = episodes[index[i][1]]
            frames = np.sort(
                rng.choice(len(ep.actions), min(frames_per_trajectory, len(ep.actions)), replace=False)
            )
            chunks = episode_chunks(ep.actions, frames, chunk_size)
            for f, chunk in zip(frames, chunks, strict=True):
                sample = {"state": ep.states[f], "instruction": ep.instruction, "actions": chunk}
                if with_images:
                    sample["image"] = ep.images[f]
                samples.append(sample)
    batches = []
    for start in range(0, len(samples), batch_size):
        part = samples[start : start + batch_size]
        batch = {k: np.stack([s[k] for s in part]) for k in part[0] if k != "instruction"}
        batch["instruction"] = [s["instruction"] for s in part]
        batches.append(batch)
    counts = np.bincount(bins[picked], minlength=len(SPATIAL_BINS))
    provenance = {
        "dataset": str(ds.root),
        "split": split,
        "tasks": sorted({index[i][2] for i in picked}),
        "trajectories": n_trajectories,
        "episodes_per_task": episodes_per_task,
        "episodes": [[index[i][2], index[i][3]] for i in picked],
        "frames_per_trajectory": frames_per_trajectory,
        "bins": {b: int(c) for b, c in zip(SPATIAL_BINS, counts, strict=True)},
        "seed": seed,
        "batches": len(batches),
        "chunk_size": chunk_size,
        "action_space": {"names": list(ds.info.get("action_names", []))},
    }
    return CalibrationSet(batches, provenance)


def default_cache_dir() -> Path:
    """``$DAPTQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/daptq``, else ``~/.cache/daptq``."""
    if os.environ.get("DAPTQ_CACHE_DIR"):
        return Path(os.environ["DAPTQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "daptq"


def ensure_calibration_dataset(
    image_size: int | None = None,
    camera: str | None = None,
    episodes_per_task: int = 8,
    tasks: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = True,
    suite: str | None = None,
) -> Path:
    """The calibration split in the cache, generated on first use (scripted experts, a progress bar).

    Measured on one CPU core: about 3 s per episode (2 tasks x 2 episodes, 96 px: 12 s), so the default
    MT10 x 8 episodes takes about 4 minutes once; later calls reuse it. A cache with fewer episodes than
    asked for is extended up to the request with the seeds a fresh generation would use, so the episodes it
    had stay byte for byte (and ``sample_calibration(..., episodes_per_task=n)`` keeps giving the same set);
    an interrupted extension leaves the old cache valid. Concurrent callers take turns (a lock file).
    ``suite`` (default Meta-World) names the benchmark whose scripted experts make the split, through the
    suite registry; image size and camera default to the suite's.
    """
    from daptq.data.generate import generate_dataset
    from daptq.envs.suite import DEFAULT_SUITE, get_suite

    bench = get_suite(suite or DEFAULT_SUITE)
    image_size = bench.observations.default_image_size if image_size is None else image_size
    camera = bench.observations.default_camera if camera is None else camera
    name = f"calib-{camera.replace(',', '+')}-{image_size}px-s{bench.scene_version}"
    if bench.name != DEFAULT_SUITE:  # Meta-World's cache keeps its name
        name = f"calib-{bench.name}-v{bench.version}-{camera.replace(',', '+')}-{image_size}px"
    root = Path(cache_dir or default_cache_dir()) / name
    wanted = bench.check_tasks(tasks or None)
    if _cache_has(root, wanted, episodes_per_task) is True:
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _CacheLock(root, progress):
        have = _cache_has(root, wanted, episodes_per_task)  # another process may have made it meanwhile
        if have is True:
            return root
        if progress:
            what = "generating" if have is None else f"extending ({have} -> {episodes_per_task} per task)"
            print(f"{what} the calibration split in {root} (about 3 s per episode)", flush=True)
        return generate_dataset(
            root,
            wanted,
            {CALIBRATION_SPLIT: episodes_per_task},
            workers=workers,
            image_size=image_size,
            camera=camera,
            progress=progress,
            suite=bench.name,
        )


def _cache_has(root: Path, tasks: Sequence[str], episodes_per_task: int) -> bool | int | None:
    """True if the cached split is complete with ``episodes_per_task`` for every task; else the fewest
    episodes a wanted task has (0 for a missing task), or None when there is no complete cache yet."""
    import json

    info = root / "meta" / "info.json"
    if not info.is_file():
        return None
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError):
        return None  # unreadable: generate_dataset reports it with the file's name
    if not meta.get("complete"):
        return None
    have = meta.get("splits", {}).get(CALIBRATION_SPLIT, {}).get("episodes_per_task", 0)
    known = set(meta.get("tasks", []))
    if isinstance(have, dict):  # tasks with different counts: the smallest of the wanted ones counts
        fewest = min((have.get(t, 0) if t in known else 0 for t in tasks), default=0)
    else:
        fewest = have if set(tasks) <= known else 0
    return True if fewest >= episodes_per_task else int(fewest)


class _CacheLock:
    """An exclusive ``flock`` on ``<root>/.lock`` for the duration of a generation; a second process
    waits (and says so), then finds the cache made. The kernel drops it when its holder dies."""

    def __init__(self, root: Path, progress: bool) -> None:
        self.path, self.progress, self.fd = root / ".lock", progress, -1

    def __enter__(self) -> _CacheLock:
        import fcntl

        if self.path.is_symlink():
            raise ValueError(f"{self.path}: is a symbolic link; refusing to lock through it")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.progress:
                print(f"waiting for another process generating {self.path.parent} ...", flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def calibration_for_policy(
    policy: Any,
    dataset: str | os.PathLike | None = None,
    n_trajectories: int = 64,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    frames_per_trajectory: int = 4,
    cache_dir: str | os.PathLike | None = None,
    suite: str | None = None,
) -> CalibrationSet:
    """Calibration batches shaped for ``policy`` (its camera, image size, chunk size) from ``dataset``, or
    from the cached calibration split of ``suite`` (default Meta-World; generated or extended on first use;
    sampled from its first ``per_task`` episodes of each task, so the set does not depend on what else
    extended the cache). Without ``suite``, the suite whose declared action space has the policy's dimension
    kinds and control (when exactly one does: a 7-D delta-eef policy with rotations is LIBERO's), else
    Meta-World."""
    bench = _suite_for(policy, suite)
    image_size = int(getattr(policy, "image_size", bench.observations.default_image_size))
    camera = str(getattr(policy, "camera", bench.observations.default_camera))
    from daptq.data.episodes import chunk_size_of  # the policy's, its adapter's or its config's

    chunk = chunk_size_of(policy)
    per_task = None
    if dataset is None:
        n_tasks = len(bench.check_tasks(tasks or None))
        per_task = max(8, -(-n_trajectories // n_tasks))
        dataset = ensure_calibration_dataset(image_size, camera, per_task, tasks, cache_dir, suite=bench.name)
    return sample_calibration(
        dataset,
        n_trajectories,
        chunk_size=int(chunk),
        frames_per_trajectory=frames_per_trajectory,
        tasks=tasks,
        seed=seed,
        with_images=hasattr(policy, "image_size"),
        episodes_per_task=per_task,
    )


def _suite_for(policy: Any, suite: str | None) -> Any:
    """``suite``, else the one registered suite with the kinds of the policy's dimensions, else Meta-World."""
    from daptq.envs.suite import DEFAULT_SUITE, get_suite, suite_names

    if suite is not None:
        return get_suite(suite)
    space = getattr(policy, "action_space", None)
    if space is not None:
        same = [
            get_suite(name)
            for name in suite_names()
            if (get_suite(name).action_space.kinds, get_suite(name).action_space.control)
            == (tuple(space.kinds), space.control)
        ]
        if len(same) == 1:
            return same[0]
    return get_suite(DEFAULT_SUITE)
