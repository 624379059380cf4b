"""The on-disk demonstration dataset: ``meta/info.json``, ``meta/stats.json`` and ``<split>/<task>-NNNN.npz``.

Each shard holds several episodes of one task and split, concatenated along time, with ``episode_offsets``
marking where each starts. Shards are plain ``.npz`` read with ``allow_pickle=False``: nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daptq.atomic import atomic_save_npz, atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
# Datasets and checkpoints written before daptq recorded envs.SCENE_VERSION were all made with version 1.
LEGACY_SCENE_VERSION = 1
# How demonstrations are recorded. 2: the reach and pick-place experts aim the fingertips / the puck (not the
# hand) at the goal (daptq.envs.expert), and an episode's first image shows its own goal and objects (the
# environment runs forward kinematics after reset). Datasets without the key are version 1.
DEMO_VERSION = 2
LEGACY_DEMO_VERSION = 1
STATE_DIM = 4
ACTION_DIM = 4

# Per-step arrays stored in a shard and their dtypes (leading dim: total steps in the shard).
STEP_FIELDS: dict[str, np.dtype] = {
    "images": np.dtype(np.uint8),
    "states": np.dtype(np.float32),
    "actions": np.dtype(np.float32),
    "executed_actions": np.dtype(np.float32),
    "ee_pos": np.dtype(np.float32),
    "step_success": np.dtype(bool),
}
# Per-episode arrays (leading dim: episodes in the shard) and per-shard scalars.
EPISODE_FIELDS: dict[str, np.dtype] = {"seeds": np.dtype(np.int64), "success": np.dtype(bool)}
SHARD_KEYS = {*STEP_FIELDS, *EPISODE_FIELDS, "episode_offsets", "discarded_seeds", "task", "instruction"}


@dataclass
class Episode:
    """One demonstration. ``actions`` are the expert's clean labels; ``executed_actions`` had noise added."""

    task: str
    instruction: str
    seed: int
    success: bool
    images: np.ndarray  # uint8 (T, H, W, 3) upright RGB, or (T, V, H, W, 3) for V cameras
    states: np.ndarray  # float32 (T, 4): ee xyz + gripper opening
    actions: np.ndarray  # float32 (T, 4): clean expert action at each step
    ee_pos: np.ndarray  # float32 (T, 3)
    executed_actions: np.ndarray | None = None  # float32 (T, 4): action sent to the simulator
    step_success: np.ndarray | None = None  # bool (T,): success flag after executing step t

    def __len__(self) -> int:
        return len(self.actions)


def shard_path(root: str | os.PathLike, split: str, task: str, index: int) -> Path:
    return Path(root) / split / f"{task}-{index:04d}.npz"


def write_shard(path: Path, episodes: list[Episode], discarded_seeds: list[int]) -> None:
    """Write episodes of one task (at least one) as a compressed shard, atomically."""
    if not episodes:
        raise ValueError(f"refusing to write empty shard {path}")
    tasks = {ep.task for ep in episodes}
    if len(tasks) != 1:
        raise ValueError(f"a shard holds one task, got {sorted(tasks)}")
    lengths = [len(ep) for ep in episodes]
    arrays: dict[str, np.ndarray] = {
        "task": np.array(episodes[0].task),
        "instruction": np.array(episodes[0].instruction),
        "episode_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "seeds": np.array([ep.seed for ep in episodes], dtype=np.int64),
        "success": np.array([ep.success for ep in episodes], dtype=bool),
        "discarded_seeds": np.array(discarded_seeds, dtype=np.int64),
    }
    for name, dtype in STEP_FIELDS.items():
        parts = [getattr(ep, name) for ep in episodes]
        if any(p is None for p in parts):
            raise ValueError(f"episode field {name!r} is missing; cannot write shard {path}")
        arrays[name] = np.concatenate(parts).astype(dtype, copy=False)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _load_shard_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = SHARD_KEYS - set(npz.files)
            if missing:
                raise ValueError(f"missing arrays {sorted(missing)}")
            return {key: npz[key] for key in SHARD_KEYS}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"corrupted dataset shard {path}: {e}") from e


def read_shard(path: str | os.PathLike) -> list[Episode]:
    """Read and validate one shard; any damage raises ValueError naming the file."""
    path = Path(path)
    a = _load_shard_arrays(path)
    offsets = a["episode_offsets"]
    n_steps = len(a["actions"])
    n_eps = len(a["seeds"])
    problems = []
    if offsets.ndim != 1 or len(offsets) != n_eps + 1 or offsets[0] != 0 or offsets[-1] != n_steps:
        problems.append("episode_offsets do not match the stored steps")
    elif np.any(np.diff(offsets) <= 0):
        problems.append("episode_offsets are not increasing")
    for name, dtype in STEP_FIELDS.items():
        if a[name].dtype != dtype or len(a[name]) != n_steps:
            problems.append(
                f"{name}: dtype {a[name].dtype} length {len(a[name])}, want {dtype} length {n_steps}"
            )
    if a["images"].ndim not in (4, 5) or a["images"].shape[-1] != 3:
        problems.append(f"images have shape {a['images'].shape}, want (T, H, W, 3) or (T, V, H, W, 3)")
    # Widths are the suite's (Meta-World: STATE_DIM, ACTION_DIM; LIBERO: 8, 7): one per shard, consistent.
    for name in ("states", "actions", "executed_actions"):
        if a[name].ndim != 2 or a[name].shape[1] < 1:
            problems.append(f"{name} have shape {a[name].shape}, want (T, D)")
    if a["executed_actions"].shape != a["actions"].shape:
        problems.append(
            f"executed_actions have shape {a['executed_actions'].shape}, actions {a['actions'].shape}"
        )
    if a["ee_pos"].shape[1:] != (3,):
        problems.append(f"ee_pos have shape {a['ee_pos'].shape}, want (T, 3)")
    if len(a["success"]) != n_eps:
        problems.append("success does not have one flag per episode")
    if problems:
        raise ValueError(f"corrupted dataset shard {path}: " + "; ".join(problems))
    task, instruction = str(a["task"]), str(a["instruction"])
    episodes = []
    for i in range(n_eps):
        sl = slice(int(offsets[i]), int(offsets[i + 1]))
        episodes.append(
            Episode(
                task=task,
                instruction=instruction,
                seed=int(a["seeds"][i]),
                success=bool(a["success"][i]),
                images=a["images"][sl],
                states=a["states"][sl],
                actions=a["actions"][sl],
                ee_pos=a["ee_pos"][sl],
                executed_actions=a["executed_actions"][sl],
                step_success=a["step_success"][sl],
            )
        )
    return episodes


def read_shard_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Episode lengths, seeds and discarded seeds of a shard without keeping its images in memory."""
    a = _load_shard_arrays(Path(path))
    return {
        "task": str(a["task"]),
        "lengths": np.diff(a["episode_offsets"]).tolist(),
        "seeds": a["seeds"].tolist(),
        "discarded_seeds": a["discarded_seeds"].tolist(),
    }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset metadata not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupted dataset metadata {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"corrupted dataset metadata {path}: expected a JSON object")
    return obj


class EpisodeDataset:
    """A dataset written by ``generate_dataset``, streamed shard by shard (one shard in memory at a time)."""

    def __init__(self, root: str | os.PathLike, allow_incomplete: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset not found: {self.root} is not a directory")
        info_path = self.root / "meta" / "info.json"
        self.info = _read_json(info_path)
        if self.info.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{info_path}: format_version {self.info.get('format_version')!r}, "
                f"this daptq reads {FORMAT_VERSION}"
            )
        if not self.info.get("complete", False) and not allow_incomplete:
            raise ValueError(
                f"{info_path}: dataset generation has not finished (re-run the generator, "
                "or pass allow_incomplete=True to read the shards written so far)"
            )
        stats_path = self.root / "meta" / "stats.json"
        self.stats = _read_json(stats_path) if stats_path.is_file() or not allow_incomplete else {}

    @property
    def splits(self) -> list[str]:
        return list(self.info["splits"])

    @property
    def tasks(self) -> list[str]:
        return list(self.info["tasks"])

    @property
    def scene_version(self) -> int:
        """The ``envs.SCENE_VERSION`` the images were rendered with."""
        return int(self.info.get("config", {}).get("scene_version", LEGACY_SCENE_VERSION))

    @property
    def demo_version(self) -> int:
        """The ``DEMO_VERSION`` the demonstrations were recorded with."""
        return int(self.info.get("config", {}).get("demo_version", LEGACY_DEMO_VERSION))

    def shard_paths(self, split: str, tasks: list[str] | None = None) -> list[Path]:
        if split not in self.info["splits"]:
            raise ValueError(f"unknown split {split!r}; this dataset has: {', '.join(self.splits)}")
        if tasks is not None:
            unknown = [t for t in tasks if t not in self.info["tasks"]]
            if unknown:
                raise ValueError(f"tasks {unknown} are not in this dataset; it has: {', '.join(self.tasks)}")
        wanted = self.tasks if tasks is None else tasks
        paths = []
        for task in wanted:
            paths.extend(sorted((self.root / split).glob(f"{task}-[0-9][0-9][0-9][0-9].npz")))
        return paths

    def episodes(self, split: str, tasks: list[str] | None = None) -> Iterator[Episode]:
        """Episodes of ``split`` (optionally only ``tasks``), task by task in shard order."""
        for path in self.shard_paths(split, tasks):
            yield from read_shard(path)

    def __repr__(self) -> str:
        counts = {s: v.get("episodes") for s, v in self.info["splits"].items()}
        return f"EpisodeDataset({str(self.root)!r}, tasks={len(self.tasks)}, episodes={counts})"


def open_dataset(root: str | os.PathLike, allow_incomplete: bool = False) -> EpisodeDataset:
    """Open a generated dataset; FileNotFoundError if missing, ValueError (naming the file) if damaged."""
    return EpisodeDataset(root, allow_incomplete=allow_incomplete)
