"""The on-disk run directory: config.json, the append-only episodes.jsonl, per-episode arrays, summary.json.

The jsonl line is the commit record of an episode: its arrays (``episodes/<task>_<seed>.npz``) are written
atomically *before* the line, and a line is written whole with one write + flush + fsync. So after a crash
every line names an episode whose arrays exist, at most the last line is torn (dropped on resume), and an
episode whose line is missing is simply run again (overwriting any orphan arrays).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from daptq.atomic import atomic_save_npz, atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)
from daptq.versioned_json import read_versioned_json

RUN_FORMAT = "daptq-eval-run"
RUN_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
EPISODES_NAME = "episodes.jsonl"
SUMMARY_NAME = "summary.json"
ARRAYS_DIR = "episodes"


def episode_key(task: str, seed: int) -> str:
    return f"{task}_{seed}"


def arrays_path(run_dir: str | os.PathLike, task: str, seed: int) -> Path:
    return Path(run_dir) / ARRAYS_DIR / f"{episode_key(task, seed)}.npz"


def load_arrays(run_dir: str | os.PathLike, task: str, seed: int) -> dict[str, np.ndarray]:
    """Per-step arrays of one finished episode (no pickle: allow_pickle=False)."""
    path = arrays_path(run_dir, task, seed)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: arrays of episode {task} seed {seed} are missing")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class EpisodeLog:
    """episodes.jsonl: one JSON object per finished episode, written by one writer (the parent process)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def read(self, repair: bool = False) -> list[dict[str, Any]]:
        """All complete records. A torn last line (no newline, or not valid JSON) is dropped, and with
        ``repair`` cut from the file; a bad line anywhere else is corruption and raises ValueError naming the
        line."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        # After the final "\n" split() leaves b""; anything else there is a line without its newline: torn.
        complete, tail = lines[:-1], lines[-1]
        records: list[dict[str, Any]] = []
        good_size = 0
        for i, line in enumerate(complete):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if i == len(complete) - 1 and not tail:
                    tail = line  # the last newline-terminated line is bad: treat it as torn as well
                    break
                raise ValueError(
                    f"{self.path}: line {i + 1} is corrupted ({exc}); refusing to guess"
                ) from exc
            records.append(record)
            good_size += len(line) + 1
        if tail and repair:
            with open(self.path, "r+b") as f:
                f.truncate(good_size)
                f.flush()
                os.fsync(f.fileno())
        return records

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a daptq evaluation run; FileNotFoundError / ValueError if the directory is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{run_dir}: not a daptq evaluation run (no {CONFIG_NAME})")
    config = read_versioned_json(path, RUN_FORMAT, RUN_FORMAT_VERSION, "daptq evaluation run config")
    return config


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished episodes of a run (validates config.json first)."""
    read_config(run_dir)
    return EpisodeLog(Path(run_dir) / EPISODES_NAME).read()
