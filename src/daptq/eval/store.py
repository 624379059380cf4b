"""The on-disk run directory: config.json, the append-only episodes.jsonl, per-episode arrays, summary.json.

The jsonl line is the commit record of an episode: its arrays (``episodes/<task>_<seed>.npz``) are written
atomically *before* the line, and a line is written whole with one write + flush + fsync. So after a crash
every line names an episode whose arrays exist, at most the last line is torn (dropped on resume), and an
episode whose line is missing is simply run again (overwriting any orphan arrays).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import zipfile
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
LOCK_NAME = ".lock"


def episode_key(task: str, seed: int) -> str:
    return f"{task}_{seed}"


def arrays_path(run_dir: str | os.PathLike, task: str, seed: int) -> Path:
    return Path(run_dir) / ARRAYS_DIR / f"{episode_key(task, seed)}.npz"


def load_arrays(run_dir: str | os.PathLike, task: str, seed: int) -> dict[str, np.ndarray]:
    """Per-step arrays of one finished episode (no pickle: allow_pickle=False)."""
    path = arrays_path(run_dir, task, seed)
    if path.is_symlink():
        raise ValueError(f"{path}: is a symbolic link; a run directory must hold only its own files")
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

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the log by ``records`` atomically (drops damaged lines found on resume)."""
        data = b"".join(
            (json.dumps(r, sort_keys=True, allow_nan=False) + "\n").encode("utf-8") for r in records
        )
        atomic_write_bytes(self.path, data)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def check_no_symlinks(run_dir: str | os.PathLike) -> None:
    """Refuse a run directory that is, or holds, a symbolic link: appending to or truncating a linked
    episodes.jsonl would write to its target, wherever that is."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise ValueError(f"{run_dir}: the run directory is a symbolic link; pass the real path")
    if not run_dir.is_dir():
        return
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise ValueError(
                    f"{path}: is a symbolic link; a run directory must hold only its own files "
                    "(daptq would write through it)"
                )


class RunDirectoryLocked(RuntimeError):
    """Another process holds the run directory's lock (the message names it)."""


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``.lock``), held while a process writes the run.

    The lock file records its holder (pid, host, start time), so a second writer is told who holds it. The
    kernel drops the lock when the holder dies, so a crashed run never blocks a resume.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path.is_symlink():
            raise ValueError(f"{self.path}: is a symbolic link; refusing to lock through it")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown holder"
            os.close(fd)
            raise RunDirectoryLocked(
                f"{self.path.parent}: another daptq process is writing this run ({holder}); wait for it "
                "to finish or stop it before resuming"
            ) from None
        holder = (
            f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def record_problem(record: dict[str, Any], paired: bool) -> str | None:
    """Why a line of episodes.jsonl is not a usable episode record, or None if it is one."""
    required: dict[str, type | tuple[type, ...]] = {
        "task": str,
        "seed": int,
        "success": bool,
        "steps": int,
        "jerk": (int, float),
        "hf_share": list,
        "grip_toggles": int,
    }
    if paired:
        required.update(
            {
                "ref_success": bool,
                "ref_steps": int,
                "ref_jerk": (int, float),
                "ref_hf_share": list,
                "ref_grip_toggles": int,
                "drift_mean": (int, float),
                "drift_max": (int, float),
                "drift_final": (int, float),
                "drift_auc": (int, float),
                "action_mae": list,
                "action_rmse": list,
                "grip_disagreements": int,
            }
        )
    for key, kind in required.items():
        if key not in record:
            return f"missing {key!r}"
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key!r} is {value!r}"
    if paired and "time_to_divergence" not in record:
        return "missing 'time_to_divergence'"
    if "floor_drift_mean" in record:
        for key in ("floor_drift_max", "floor_drift_final", "floor_drift_auc", "floor_success"):
            if key not in record:
                return f"missing {key!r}"
        if "floor_time_to_divergence" not in record:
            return "missing 'floor_time_to_divergence'"
    return None


def arrays_problem(run_dir: str | os.PathLike, record: dict[str, Any], paired: bool) -> str | None:
    """Why an episode's .npz does not match its record (missing, unreadable, wrong shapes), or None."""
    try:
        arrays = load_arrays(run_dir, record["task"], record["seed"])
    except FileNotFoundError:
        return "arrays missing"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        return f"arrays unreadable ({type(exc).__name__}: {exc})"
    steps = record["steps"]
    expected = {"ee": (steps + 1, 3), "actions": (steps, None)}
    if paired:
        ref_steps = record["ref_steps"]
        expected.update(
            {"ref_ee": (ref_steps + 1, 3), "ref_actions": (ref_steps, None), "shadow_actions": (steps, None)}
        )
        if "floor_drift_mean" in record:
            expected["floor_ee"] = (None, 3)
    for key, (rows, cols) in expected.items():
        a = arrays.get(key)
        if a is None:
            return f"array {key!r} missing"
        if (
            a.ndim != 2
            or (rows is not None and a.shape[0] != rows)
            or (cols is not None and a.shape[1] != cols)
        ):
            return f"array {key!r} has shape {a.shape}, the record says {rows} rows"
        if not np.all(np.isfinite(a)):
            return f"array {key!r} is not finite"
    return None


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
