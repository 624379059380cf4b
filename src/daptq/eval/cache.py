"""A cache of full-precision reference rollouts, keyed by everything that determines them.

The reference trajectory of a (task, seed) does not depend on the candidate, so a second method evaluated
against the same reference runs no reference rollout at all. An entry is one ``<sha256 of key>.npz`` holding
the rollout's arrays, its key as JSON and a digest of both (``store.content_digest`` over the key, the
end-effector path, the actions and the outcome). A lookup recomputes (never trusts) an entry that is
unreadable or damaged (a flipped byte: a zlib or CRC error), whose digest does not match its content, whose
stored key differs from the requested one, or whose arrays are malformed. Entries are written atomically, so
concurrent workers writing the same entry leave one whole file.

What the digest protects: damage (disk, copies, truncation), an entry edited or built by hand or by a tool
that does not recompute the digest (a path moved, an outcome flipped), and another key's entry renamed to
this one (the key is inside the digest). What it does not: it is a plain sha256, not a secret, so whoever
can write the cache directory and knows this format can write an entry that passes. Keep the cache where
only you can write (the default, under your home directory), or pass ``--no-reference-cache``.

The key: the reference's digest (weights + config) and declared demo/scene versions, task, environment seed,
sampling seed, step limit, image size, camera, scene version, daptq's environment version, the suite (its
name, version, action and state conventions: ``Suite.cache_identity``), the versions of the packages that
compute a rollout (daptq, torch, numpy, mujoco, metaworld, and the suite's own) and the thread count (1:
float reductions depend on it). An entry of a suite with a manipulated object also holds the object's path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from daptq.atomic import atomic_save_npz
from daptq.eval.rollout import Rollout
from daptq.eval.store import content_digest, read_file_bounded, read_npz

CACHE_FORMAT_VERSION = 2  # 2: entries carry a digest of their content
_KEY_PACKAGES = ("daptq", "torch", "numpy", "mujoco", "metaworld")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/daptq/reference-rollouts`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "daptq" / "reference-rollouts"


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in dict.fromkeys((*_KEY_PACKAGES, *extra)):
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
    from daptq.envs.suite import DEFAULT_SUITE, get_suite
    from daptq.envs.tasks import ENV_VERSION

    suite = get_suite(run.get("suite", DEFAULT_SUITE))
    return {
        "cache_format": CACHE_FORMAT_VERSION,
        "reference_digest": reference["digest"],
        "reference_declares": reference["declares"],
        "image_size": run["image_size"],
        "camera": run["camera"],
        "scene_version": run["scene_version"],
        "env_version": ENV_VERSION,
        "suite": suite.cache_identity(),
        "versions": package_versions(suite.packages),
        "torch_threads": 1,
        "batch_slots": int(batch_slots),
    }


class ReferenceCache:
    """Reference rollouts on disk under ``root``; ``get`` returns None on a miss or a damaged entry."""

    def __init__(self, root: str | os.PathLike, base: dict[str, Any]) -> None:
        self.root = Path(root)
        self.base = base
        self._warned = False

    def key(self, task: str, seed: int, policy_seed: int, max_steps: int) -> str:
        key = {**self.base, "task": task, "seed": int(seed), "policy_seed": int(policy_seed)}
        key["max_steps"] = int(max_steps)
        return json.dumps(key, sort_keys=True)

    def path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()}.npz"

    def get(self, key: str) -> Rollout | None:
        path = self.path(key)
        try:
            arrays = read_npz(read_file_bounded(path, "reference-cache entry"), str(path))
        except (OSError, ValueError):  # missing, a link, unreadable, damaged: a miss, recomputed
            return None
        if set(arrays) - {"objects"} != {"key", "ee", "actions", "success", "digest"}:
            return None
        digest = arrays.pop("digest")
        if digest.dtype != np.uint8 or bytes(digest) != content_digest(arrays).encode("ascii"):
            return None  # damaged or edited: the content is not what was written under this key
        ee, actions, success = arrays["ee"], arrays["actions"], arrays["success"]
        if arrays["key"].dtype != np.uint8 or bytes(arrays["key"]) != key.encode("utf-8"):
            return None
        if ee.ndim != 2 or actions.ndim != 2 or ee.shape != (actions.shape[0] + 1, 3):
            return None
        if ee.dtype.kind != "f" or actions.dtype.kind != "f" or success.shape != () or success.dtype != bool:
            return None
        if not (np.isfinite(ee).all() and np.isfinite(actions).all()):
            return None
        objects = arrays.get("objects")
        if objects is not None and (
            objects.shape != ee.shape or objects.dtype.kind != "f" or not np.isfinite(objects).all()
        ):
            return None
        return Rollout(
            success=bool(success),
            ee=ee.astype(np.float32),
            actions=actions.astype(np.float32),
            objects=None if objects is None else objects.astype(np.float32),
        )

    def put(self, key: str, rollout: Rollout) -> None:
        arrays = {
            "key": np.frombuffer(key.encode("utf-8"), dtype=np.uint8),
            "ee": np.asarray(rollout.ee),
            "actions": np.asarray(rollout.actions),
            "success": np.asarray(bool(rollout.success)),
        }
        if rollout.objects is not None:
            arrays["objects"] = np.asarray(rollout.objects)
        arrays["digest"] = np.frombuffer(content_digest(arrays).encode("ascii"), dtype=np.uint8)
        try:
            atomic_save_npz(self.path(key), arrays)
        except OSError as exc:  # a cache is an optimization: a read-only or occupied entry costs a rollout
            if not self._warned:  # once per cache: every entry may fail the same way
                self._warned = True
                warnings.warn(
                    f"reference cache {self.root}: cannot write an entry ({exc}); such rollouts are "
                    "not cached",
                    stacklevel=2,
                )
