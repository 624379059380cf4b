"""A cache of full-precision reference rollouts, keyed by everything that determines them.

The reference trajectory of a (task, seed) does not depend on the candidate, so a second method evaluated
against the same reference runs no reference rollout at all. An entry is one ``<sha256 of key>.npz`` holding
the rollout's arrays and its key as JSON; a lookup recomputes (never trusts) an entry that is unreadable,
whose stored key differs from the requested one, or whose arrays are malformed. Entries are written
atomically, so concurrent workers writing the same entry leave one whole file.

The key: the reference's digest (weights + config) and declared demo/scene versions, task, environment seed,
sampling seed, step limit, image size, camera, scene version, daptq's environment version, the versions of
the packages that compute a rollout (daptq, torch, numpy, mujoco, metaworld) and the thread count (1: float
reductions depend on it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from daptq.atomic import atomic_save_npz
from daptq.eval.rollout import Rollout

CACHE_FORMAT_VERSION = 1
_KEY_PACKAGES = ("daptq", "torch", "numpy", "mujoco", "metaworld")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/daptq/reference-rollouts`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "daptq" / "reference-rollouts"


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _KEY_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["daptq"] is None:
        import daptq

        out["daptq"] = daptq.__version__
    return out


def base_key(run: dict[str, Any], reference: dict[str, Any], batch_slots: int = 1) -> dict[str, Any]:
    """The part of every entry's key that a run fixes (``reference`` is config.json's "reference").

    ``batch_slots``: the fixed batch size of the policy calls (1: the one-env rollout). Kernels need not give
    bitwise-equal rows at other batch sizes, so rollouts computed at another size are other entries."""
    from daptq.envs.tasks import ENV_VERSION

    return {
        "cache_format": CACHE_FORMAT_VERSION,
        "reference_digest": reference["digest"],
        "reference_declares": reference["declares"],
        "image_size": run["image_size"],
        "camera": run["camera"],
        "scene_version": run["scene_version"],
        "env_version": ENV_VERSION,
        "versions": package_versions(),
        "torch_threads": 1,
        "batch_slots": int(batch_slots),
    }


class ReferenceCache:
    """Reference rollouts on disk under ``root``; ``get`` returns None on a miss or a damaged entry."""

    def __init__(self, root: str | os.PathLike, base: dict[str, Any]) -> None:
        self.root = Path(root)
        self.base = base

    def key(self, task: str, seed: int, policy_seed: int, max_steps: int) -> str:
        key = {**self.base, "task": task, "seed": int(seed), "policy_seed": int(policy_seed)}
        key["max_steps"] = int(max_steps)
        return json.dumps(key, sort_keys=True)

    def path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()}.npz"

    def get(self, key: str) -> Rollout | None:
        path = self.path(key)
        if path.is_symlink() or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            return None
        try:
            stored_key = bytes(arrays["key"]).decode("utf-8")
            ee, actions, success = arrays["ee"], arrays["actions"], arrays["success"]
        except (KeyError, UnicodeDecodeError, TypeError):
            return None
        if stored_key != key or ee.ndim != 2 or actions.ndim != 2 or ee.shape != (actions.shape[0] + 1, 3):
            return None
        if success.shape != () or not (np.isfinite(ee).all() and np.isfinite(actions).all()):
            return None
        return Rollout(success=bool(success), ee=ee.astype(np.float32), actions=actions.astype(np.float32))

    def put(self, key: str, rollout: Rollout) -> None:
        arrays = {
            "key": np.frombuffer(key.encode("utf-8"), dtype=np.uint8),
            "ee": rollout.ee,
            "actions": rollout.actions,
            "success": np.asarray(rollout.success),
        }
        atomic_save_npz(self.path(key), arrays)
