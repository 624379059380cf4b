"""The on-disk run directory: config.json, the append-only episodes.jsonl, per-episode arrays, summary.json.

The jsonl line is the commit record of an episode: its arrays (``episodes/<task>_<seed>.npz``) are written
atomically *before* the line, and a line is written whole with one write + flush + fsync. So after a crash
every line names an episode whose arrays exist, at most the last line is torn (dropped on resume), and an
episode whose line is missing is simply run again (overwriting any orphan arrays).

Nothing read back is trusted: a record carries the sha256 of its arrays' content (``arrays_sha256``), so a
damaged file or one swapped for another episode's is found; every field of a record is type- and
range-checked (no NaN), and its metrics are recomputed from its arrays and compared. A record that fails is
dropped and its episode re-run on resume, and left out (and named) by a report. These checks catch damage and
careless edits; they are not authentication: whoever can write the run directory can write a consistent
record and arrays (the digest is a plain sha256 anyone can recompute).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import io
import json
import math
import os
import socket
import zipfile
import zlib
from collections.abc import Mapping
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
# The record field holding ``content_digest`` of the episode's arrays; config.json's ``DIGEST_CONFIG_KEY``
# names the scheme, and a run whose config has it requires it in every record (older runs have none).
DIGEST_KEY = "arrays_sha256"
DIGEST_CONFIG_KEY = "arrays_digest"
ARRAYS_DIGEST = "daptq-arrays-sha256-v1"
MAX_NPZ_BYTES = 256 << 20  # what a daptq .npz may hold (or declare) uncompressed; a file beyond is damaged
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, MemoryError, zipfile.BadZipFile, zlib.error)


def content_digest(arrays: Mapping[str, Any]) -> str:
    """sha256 over every array's name, dtype, shape and bytes (in name order).

    Unlike the digest of the .npz file it does not depend on zip timestamps, so equal episodes have equal
    digests, and one function serves the files written here and the reference cache's entries."""
    h = hashlib.sha256(ARRAYS_DIGEST.encode("ascii") + b"\0")
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asanyarray(arrays[name]))
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode("utf-8") + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def read_npz(data: bytes, what: str) -> dict[str, np.ndarray]:
    """The arrays of a .npz held in ``data`` (no pickle); ValueError naming ``what`` for anything else: not a
    zip, a damaged member (zlib / CRC errors), an object array, or more than ``MAX_NPZ_BYTES`` declared."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            declared = sum(info.file_size for info in zf.infolist())
        if declared > MAX_NPZ_BYTES:
            raise ValueError(f"declares {declared} bytes uncompressed")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except _NPZ_ERRORS as exc:
        kind = (
            type(exc).__name__
            if type(exc).__module__ == "builtins"
            else f"{type(exc).__module__}.{type(exc).__name__}"
        )
        raise ValueError(f"{what}: damaged ({kind}: {exc})") from None


def read_file_bounded(path: Path, what: str) -> bytes:
    """The bytes of a regular file of at most ``MAX_NPZ_BYTES`` (a symbolic link is refused)."""
    if path.is_symlink():
        raise ValueError(f"{path}: is a symbolic link; a run directory must hold only its own files")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} missing")
    size = path.stat().st_size
    if size > MAX_NPZ_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a daptq .npz holds")
    return path.read_bytes()


def episode_key(task: str, seed: int) -> str:
    return f"{task}_{seed}"


def arrays_path(run_dir: str | os.PathLike, task: str, seed: int) -> Path:
    return Path(run_dir) / ARRAYS_DIR / f"{episode_key(task, seed)}.npz"


def load_arrays(run_dir: str | os.PathLike, task: str, seed: int) -> dict[str, np.ndarray]:
    """Per-step arrays of one finished episode (no pickle). FileNotFoundError if missing, ValueError if the
    file is damaged (see ``arrays_problem`` for the checks against its record)."""
    path = arrays_path(run_dir, task, seed)
    return read_npz(read_file_bounded(path, f"arrays of episode {task} seed {seed}"), str(path))


def save_arrays(run_dir: str | os.PathLike, task: str, seed: int, arrays: Mapping[str, Any]) -> str:
    """Write an episode's arrays atomically; returns their ``content_digest`` (for its record)."""
    arrays = {k: np.asanyarray(v) for k, v in arrays.items()}
    atomic_save_npz(arrays_path(run_dir, task, seed), arrays)
    return content_digest(arrays)


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field_problem(key: str, value: Any, kind: str) -> str | None:
    """Why ``value`` is not a valid ``kind`` field: "str", "bool", "count" (int >= 0), "length" (finite
    real >= 0), "ttd" (None or count), "shares" (list of reals in [0, 1]), "lengths" (list of reals >= 0),
    "opt_bool" (None or bool)."""
    ok = {
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "opt_bool": lambda v: v is None or isinstance(v, bool),
        "count": lambda v: _is_int(v) and v >= 0,
        "length": lambda v: _is_real(v) and v >= 0,
        "ttd": lambda v: v is None or (_is_int(v) and v >= 0),
        "shares": lambda v: isinstance(v, list) and v and all(_is_real(x) and 0 <= x <= 1 + 1e-9 for x in v),
        "lengths": lambda v: isinstance(v, list) and v and all(_is_real(x) and x >= 0 for x in v),
    }[kind](value)
    return None if ok else f"{key!r} is {value!r}"


_FIELDS = {
    "task": "str", "seed": "count", "success": "bool", "steps": "count", "jerk": "length",
    "hf_share": "shares", "grip_toggles": "count",
}  # fmt: skip
_PAIRED_FIELDS = {
    "ref_success": "bool", "ref_steps": "count", "ref_jerk": "length", "ref_hf_share": "shares",
    "ref_grip_toggles": "count", "drift_mean": "length", "drift_max": "length", "drift_final": "length",
    "drift_auc": "length", "time_to_divergence": "ttd", "action_mae": "lengths", "action_rmse": "lengths",
    "grip_disagreements": "count",
}  # fmt: skip
_FLOOR_FIELDS = {
    "floor_drift_mean": "length", "floor_drift_max": "length", "floor_drift_final": "length",
    "floor_drift_auc": "length", "floor_time_to_divergence": "ttd", "floor_success": "bool",
}  # fmt: skip
# How an episode was computed (optional; never a result, but still no NaN in a run's files).
_EXTRA_FIELDS = {
    "wall_s": "length",
    "env_steps": "count",
    "simulated_steps": "count",
    "reference_cached": "opt_bool",
}


def record_problem(record: dict[str, Any], paired: bool) -> str | None:
    """Why a line of episodes.jsonl is not a usable episode record (a field missing, of the wrong type, out
    of range or not finite), or None if it is one."""
    fields = dict(_FIELDS)
    if paired:
        fields.update(_PAIRED_FIELDS)
        if any(k in record for k in _FLOOR_FIELDS):
            fields.update(_FLOOR_FIELDS)
    for key, kind in fields.items():
        if key not in record:
            return f"missing {key!r}"
        if (problem := _field_problem(key, record[key], kind)) is not None:
            return problem
    for key, kind in _EXTRA_FIELDS.items():
        if key in record and (problem := _field_problem(key, record[key], kind)) is not None:
            return problem
    if DIGEST_KEY in record:
        digest = record[DIGEST_KEY]
        if not (
            isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
        ):
            return f"{DIGEST_KEY!r} is {digest!r}"
    return None


def _mismatch(stored: Any, computed: Any) -> bool:
    """Whether a record's value differs from the one recomputed from its arrays (reals to 1e-6 relative:
    a report may run on another machine than the episode)."""
    if computed is None or isinstance(computed, (bool, int)) and not isinstance(computed, float):
        return stored != computed or type(stored) is not type(computed)
    if isinstance(computed, list):
        return (
            not isinstance(stored, list)
            or len(stored) != len(computed)
            or any(_mismatch(a, b) for a, b in zip(stored, computed, strict=True))
        )
    return not _is_real(stored) or not math.isclose(stored, computed, rel_tol=1e-6, abs_tol=1e-9)


def arrays_problem(
    run_dir: str | os.PathLike,
    record: dict[str, Any],
    paired: bool,
    run: Mapping[str, Any] | None = None,
    require_digest: bool = False,
) -> str | None:
    """Why an episode's .npz does not match its record, or None: missing, unreadable, not the arrays the
    record's digest names (damaged, or another episode's), wrong shapes, not finite, or (given the ``run``
    settings) metrics that differ from those the arrays give. ``require_digest``: a record without a
    digest is a problem (runs that record digests)."""
    digest = record.get(DIGEST_KEY)
    if digest is None and require_digest:
        return f"missing {DIGEST_KEY!r}"
    try:
        arrays = load_arrays(run_dir, record["task"], record["seed"])
    except FileNotFoundError:
        return "arrays missing"
    except ValueError as exc:
        return f"arrays unreadable ({exc})"
    if digest is not None and content_digest(arrays) != digest:
        return "arrays are not the ones recorded (damaged, or another episode's file)"
    steps = record["steps"]
    expected = {"ee": (steps + 1, 3), "actions": (steps, None)}
    if paired:
        ref_steps = record["ref_steps"]
        expected.update(
            {"ref_ee": (ref_steps + 1, 3), "ref_actions": (ref_steps, None), "shadow_actions": (steps, None)}
        )
        if "floor_drift_mean" in record:
            expected["floor_ee"] = (None, 3)
        if "object_drift_mean" in record:  # a suite with a manipulated object: its paths are checked too
            expected.update({"objects": (steps + 1, 3), "ref_objects": (ref_steps + 1, 3)})
            if "floor_object_drift_mean" in record:
                expected["floor_objects"] = (None, 3)
    for key, (rows, cols) in expected.items():
        a = arrays.get(key)
        if a is None:
            return f"array {key!r} missing"
        if (
            a.ndim != 2
            or a.dtype.kind != "f"
            or (rows is not None and a.shape[0] != rows)
            or (cols is not None and a.shape[1] != cols)
        ):
            return f"array {key!r} has shape {a.shape} ({a.dtype}), the record says {rows} rows"
        if not np.all(np.isfinite(a)):
            return f"array {key!r} is not finite"
    if run is not None:
        from daptq.eval.metrics import episode_metrics

        dims = {arrays["actions"].shape[1]} | ({arrays["ref_actions"].shape[1]} if paired else set())
        if len(dims) != 1 or (paired and arrays["shadow_actions"].shape[1] not in dims):
            return "arrays of different action dimensions"
        used = {k: arrays[k] for k in expected}
        computed = episode_metrics(used, run["divergence_threshold"], run["hf_cutoff"])
        wrong = sorted(k for k, v in computed.items() if _mismatch(record.get(k), v))
        if wrong:
            return f"{', '.join(wrong)} differ from what the arrays give"
    return None


def episode_problem(run_dir: str | os.PathLike, config: Mapping[str, Any], record: Any) -> str | None:
    """Why a line of a run's episodes.jsonl is not a usable episode (``record_problem``, then
    ``arrays_problem`` with the run's settings), or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    run = config["run"]
    paired = run["reference"] is not None
    problem = record_problem(record, paired)
    if problem is None and (
        record["task"] not in run["tasks"]
        or not run["seed_start"] <= record["seed"] < run["seed_start"] + run["episodes"]
    ):
        problem = "not an episode of this run"  # (its arrays are never looked for: the name is the path)
    if problem is None:
        problem = arrays_problem(
            run_dir, record, paired, run=config["run"], require_digest=DIGEST_CONFIG_KEY in config
        )
    return problem


def describe(record: Any, line: int) -> str:
    """ "line N (task seed S)" for messages about a record."""
    if isinstance(record, dict) and isinstance(record.get("task"), str) and _is_int(record.get("seed")):
        return f"line {line} ({record['task']} seed {record['seed']})"
    return f"line {line}"


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a daptq evaluation run; FileNotFoundError / ValueError if the directory is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{run_dir}: not a daptq evaluation run (no {CONFIG_NAME})")
    config = read_versioned_json(path, RUN_FORMAT, RUN_FORMAT_VERSION, "daptq evaluation run config")
    run = config.get("run")
    problem = None
    if not isinstance(run, dict):
        problem = f'"run" is {run!r}'
    elif not (isinstance(run.get("tasks"), list) and all(isinstance(t, str) for t in run["tasks"])):
        problem = f'"run.tasks" is {run.get("tasks")!r}'
    elif not all(_is_int(run.get(k)) and run[k] >= 0 for k in ("seed_start", "episodes")):
        problem = f'"run.seed_start" / "run.episodes" are {run.get("seed_start")!r} / {run.get("episodes")!r}'
    elif not (run.get("reference") is None or isinstance(run.get("reference"), str)):
        problem = f'"run.reference" is {run.get("reference")!r}'
    elif not (_is_real(run.get("divergence_threshold")) and run["divergence_threshold"] > 0):
        problem = f'"run.divergence_threshold" is {run.get("divergence_threshold")!r}'
    elif not (_is_real(run.get("hf_cutoff")) and 0 < run["hf_cutoff"] <= 0.5):
        problem = f'"run.hf_cutoff" is {run.get("hf_cutoff")!r}'
    if problem is not None:
        raise ValueError(f"{path}: {problem}; the run's config is damaged")
    return config


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished episodes of a run (validates config.json first)."""
    read_config(run_dir)
    return EpisodeLog(Path(run_dir) / EPISODES_NAME).read()
