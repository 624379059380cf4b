"""Normalization statistics of "state" and "action" over the train split (lerobot's meta/stats.json)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _load_columns(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    # Only the small arrays are decompressed: the images in the same shard are never read here.
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"corrupted dataset shard {path}: {e}") from e


def _summary(x: np.ndarray) -> dict[str, list[float]]:
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "count": int(len(x)),
    }


def compute_stats(root: str | os.PathLike, tasks: Sequence[str], split: str = "train") -> dict:
    """Per-dimension mean/std/min/max of states and clean actions over every step of ``split``."""
    paths = [p for t in tasks for p in sorted((Path(root) / split).glob(f"{t}-[0-9][0-9][0-9][0-9].npz"))]
    if not paths:
        raise FileNotFoundError(f"no {split} shards under {Path(root) / split} to compute statistics from")
    columns = [_load_columns(p, ("states", "actions")) for p in paths]
    states = np.concatenate([c["states"] for c in columns]).astype(np.float64)
    actions = np.concatenate([c["actions"] for c in columns]).astype(np.float64)
    return {"split": split, "state": _summary(states), "action": _summary(actions)}
