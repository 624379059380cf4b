"""Environment suites: what evaluation, data generation and the reference cache need to know of a benchmark.

A :class:`Suite` declares a benchmark's tasks and instructions, its observation conventions (cameras, proprio,
where the end-effector and grasped-object poses come from, for drift), its action space, step limits, how
success is decided, its episode splits (seeds or fixed initial states) and a version that keys cached
reference rollouts. Suites are registered by name, as lerobot registers its ``EnvConfig`` subclasses, so
adding a benchmark means adding one module that calls :func:`register_suite`, plus its name in
``_BUILTIN_MODULES``.

Nothing here imports a simulator: a suite's ``make_env`` / ``make_expert`` import theirs on first call, and
the built-in suites' modules are imported only when a suite is first looked up (no import-time side effects).

Episode ids are plain integers, as Meta-World's seeds are: ``suite.episode_ids(split, n)`` gives a split's ids
and ``env.reset(seed=episode_id)`` starts that episode. A suite with fixed initial states (LIBERO) maps its
evaluation ids to those states and its other ids to seeded resets.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daptq.envs.actions import ActionSpace

# The suite of every command that names none (and of runs, datasets and caches that predate suites).
DEFAULT_SUITE = "metaworld"

# Modules that register the built-in suites, imported on the first lookup (name -> module).
_BUILTIN_MODULES: dict[str, str] = {
    "metaworld": "daptq.envs.metaworld_suite",
    "libero": "daptq.envs.libero_suite",
}

_REGISTRY: dict[str, Suite] = {}


# The action-space type suites declare (the model layer's ``ActionSpace``: one type, in a leaf module).
Actions = ActionSpace


@dataclass(frozen=True)
class Observations:
    """What a suite's observations hold.

    ``state`` names the entries of ``obs["state"]`` (the proprio vector, float32). ``ee_pose`` says where the
    end-effector position (metres, world frame) is, for drift: ``"state[:3]"`` (the first three state entries)
    or ``"info"`` (``info["ee_pos"]`` of reset/step). ``object_pose`` names the ``info`` key holding the pose
    of the object being manipulated (position xyz + quaternion wxyz), or None when the suite has none.
    """

    cameras: tuple[str, ...]
    default_camera: str
    default_image_size: int
    state: tuple[str, ...]
    ee_pose: str = "state[:3]"
    object_pose: str | None = None

    def ee_position(self, obs: Mapping[str, Any], info: Mapping[str, Any]) -> np.ndarray:
        """The end-effector position (3,) float32 of an observation and its ``info``, as declared."""
        if self.ee_pose == "state[:3]":
            return np.asarray(obs["state"][:3], np.float32)
        return np.array(info["ee_pos"], np.float32)[:3]

    def object_position(self, info: Mapping[str, Any]) -> np.ndarray | None:
        """The manipulated object's position (3,) float32 from ``info``; None when the suite declares none."""
        if self.object_pose is None:
            return None
        return np.array(info[self.object_pose], np.float32)[:3]

    def __post_init__(self) -> None:
        if self.default_camera not in self.cameras:
            raise ValueError(f"default camera {self.default_camera!r} is not one of {self.cameras}")
        if self.ee_pose not in ("state[:3]", "info"):
            raise ValueError(f"ee_pose must be 'state[:3]' or 'info', got {self.ee_pose!r}")
        if self.default_image_size <= 0:
            raise ValueError(f"default_image_size must be positive, got {self.default_image_size}")


@dataclass(frozen=True)
class Split:
    """A range of episode ids: ``count`` ids from ``start`` (None: unbounded, as seeded resets are)."""

    start: int
    count: int | None = None
    description: str = ""

    def ids(self, n: int, offset: int = 0) -> range:
        if n < 0 or offset < 0:
            raise ValueError(f"episode count and offset must be >= 0, got {n} and {offset}")
        if self.count is not None and offset + n > self.count:
            raise ValueError(
                f"this split has {self.count} episodes per task ({self.description or 'fixed'}); "
                f"{offset + n} requested"
            )
        return range(self.start + offset, self.start + offset + n)

    def contains(self, episode_id: int) -> bool:
        return self.start <= episode_id and (self.count is None or episode_id < self.start + self.count)


@dataclass(frozen=True)
class Suite:
    """One benchmark, as the rest of daptq sees it. ``make_env(task, **options)`` builds a gymnasium-style env
    whose ``reset(seed=episode_id)`` / ``step(action)`` return dict observations (``image``, ``state``,
    ``instruction``) and an ``info`` with ``success`` (the simulator's own success test) and ``ee_pos``.
    ``make_expert(task)`` returns a callable ``expert(env) -> clean action`` (None: no scripted expert).

    ``scene_version`` is what policies declare they were trained on (a mismatch is warned about);
    ``generation_max_steps`` the step limit of demonstration rollouts (None: the task's evaluation limit);
    ``noise_std`` the default DART noise of demonstrations; ``packages`` the distributions whose versions key
    cached reference rollouts and are recorded in datasets."""

    name: str
    version: int
    tasks: Mapping[str, str]  # task -> instruction
    action_space: ActionSpace
    max_steps: Mapping[str, int]
    observations: Observations
    splits: Mapping[str, Split]
    make_env: Callable[..., Any]
    make_expert: Callable[[str], Callable[[Any], Any]] | None = None
    success: str = "the simulator's success test, info['success']"
    requires: tuple[str, ...] = ()  # importable modules the suite needs (an optional extra)
    install_hint: str = ""
    families: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # named task groups
    scene_version: int = 1
    generation_max_steps: int | None = None
    noise_std: float = 0.2
    packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a suite needs a non-empty name, got {self.name!r}")
        if not self.tasks:
            raise ValueError(f"suite {self.name!r} declares no tasks")
        missing = [t for t in self.tasks if t not in self.max_steps]
        if missing:
            raise ValueError(f"suite {self.name!r}: no step limit for {missing}")
        if "eval" not in self.splits:
            raise ValueError(f"suite {self.name!r} declares no 'eval' split")
        for family, members in self.families.items():
            unknown = [t for t in members if t not in self.tasks]
            if unknown:
                raise ValueError(f"suite {self.name!r}: family {family!r} names unknown tasks {unknown}")

    def check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise ValueError(
                f"unknown task {task!r} of suite {self.name}; valid tasks are: {', '.join(self.tasks)}"
            )
        return task

    def check_tasks(self, tasks: Sequence[str] | str | None) -> list[str]:
        """Task names (a family name expands to its tasks; None: all tasks), distinct and known."""
        if tasks is None:
            return list(self.tasks)
        names: list[str] = []
        for item in [tasks] if isinstance(tasks, str) else tasks:
            names.extend(self.families.get(item, (item,)))
        if not names:
            raise ValueError("at least one task is required")
        for task in names:
            self.check_task(task)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tasks in {names}")
        return names

    def episode_ids(self, split: str, count: int, offset: int = 0) -> range:
        if split not in self.splits:
            valid = ", ".join(self.splits)
            raise ValueError(f"unknown split {split!r} for suite {self.name}; valid splits: {valid}")
        return self.splits[split].ids(count, offset)

    def is_eval_episode(self, episode_id: int) -> bool:
        """Whether ``episode_id`` belongs to the evaluation split (calibration and training never read it)."""
        return self.splits["eval"].contains(int(episode_id))

    def split_room(self, split: str) -> int | None:
        """How many ids ``split`` has before the next split starts (None: unbounded)."""
        start = self.splits[split].start
        later = [s.start for s in self.splits.values() if s.start > start]
        room = min(later) - start if later else None
        count = self.splits[split].count
        return count if room is None else room if count is None else min(room, count)

    def generation_steps(self, task: str) -> int:
        """The step limit of a demonstration rollout of ``task``."""
        return int(self.generation_max_steps or self.max_steps[self.check_task(task)])

    def check_camera(self, camera: str) -> str:
        """A camera setting (one name or several comma-separated), each a camera this suite declares."""
        from daptq.cameras import parse_cameras

        unknown = [c for c in parse_cameras(camera) if c not in self.observations.cameras]
        if unknown:
            raise ValueError(
                f"unknown camera {unknown[0]!r} for suite {self.name}; "
                f"it has: {', '.join(self.observations.cameras)}"
            )
        return camera

    def available(self) -> bool:
        """Whether the suite's simulator packages import (without importing them)."""
        return all(importlib.util.find_spec(m) is not None for m in self.requires)

    def require(self) -> None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise ModuleNotFoundError(
                f"suite {self.name!r} needs {', '.join(missing)}; {self.install_hint or 'install it'}"
            )

    def cache_identity(self) -> dict[str, Any]:
        """What a cached reference rollout must match: suite, version, action and observation conventions."""
        return {
            "suite": self.name,
            "suite_version": self.version,
            "action_space": self.action_space.to_dict(),
            "state": list(self.observations.state),
        }


def register_suite(suite: Suite, *, replace: bool = False) -> Suite:
    """Register ``suite`` under ``suite.name``; registering a name twice is an error unless ``replace``."""
    if not isinstance(suite, Suite):
        raise TypeError(f"register_suite expects a Suite, got {type(suite).__name__}")
    if suite.name in _REGISTRY and not replace and _REGISTRY[suite.name] is not suite:
        raise ValueError(f"a suite named {suite.name!r} is already registered")
    _REGISTRY[suite.name] = suite
    return suite


def unregister_suite(name: str) -> None:
    """Remove a registered suite (tests register throwaway suites)."""
    _REGISTRY.pop(name, None)


def get_suite(name: str) -> Suite:
    """The suite registered as ``name``, importing its built-in module on first use."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown suite {name!r}; known suites are: {', '.join(suite_names())}")
    return _REGISTRY[name]


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in suite (importable by name in any process, e.g. evaluation workers)."""
    return name in _BUILTIN_MODULES


def suite_names() -> list[str]:
    """Built-in and registered suite names (built-ins are not imported to list them)."""
    return sorted(set(_BUILTIN_MODULES) | set(_REGISTRY))
