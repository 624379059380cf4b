"""Meta-World environments with images, instructions, end-effector pose and success flags.

Importing this package has no side effects and does not import MuJoCo or Meta-World: task names, seed splits
and step limits (``daptq.envs.tasks``) are plain data. The simulator is imported on first use of
``make_env`` / ``MetaWorldEnv`` / the expert. Headless rendering needs ``MUJOCO_GL`` set before MuJoCo is
imported: processes that start here (the ``daptq`` CLI, evaluation workers) call
``use_headless_rendering()`` first, and first use does so too if nobody did, so ``egl`` is the default unless
``MUJOCO_GL`` is already set (e.g. ``osmesa``).
"""

from __future__ import annotations

import os
from typing import Any

from daptq.cameras import parse_cameras
from daptq.envs.tasks import (
    DEFAULT_MAX_STEPS,
    MT10,
    SCENE_VERSION,
    SEED_SPLITS,
    TASKS,
    check_task,
    check_tasks,
    seed_range,
)

DEFAULT_MUJOCO_GL = "egl"

_SIMULATOR_NAMES = {
    "ExpertPolicy": "daptq.envs.expert",
    "expert_action": "daptq.envs.expert",
    "MetaWorldEnv": "daptq.envs.metaworld_env",
    "make_env": "daptq.envs.metaworld_env",
}


def use_headless_rendering() -> str:
    """Default ``MUJOCO_GL`` to egl (headless, CPU-only machines) unless set; returns the backend in use.

    Call it where a process starts, before MuJoCo is imported; afterwards it has no effect on rendering.
    """
    return os.environ.setdefault("MUJOCO_GL", DEFAULT_MUJOCO_GL)


def __getattr__(name: str) -> Any:
    # Lazy: only what needs the simulator imports it (and fixes the GL backend first).
    if name in _SIMULATOR_NAMES:
        import importlib

        use_headless_rendering()
        return getattr(importlib.import_module(_SIMULATOR_NAMES[name]), name)
    raise AttributeError(f"module 'daptq.envs' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_STEPS",
    "MT10",
    "SCENE_VERSION",
    "SEED_SPLITS",
    "TASKS",
    "ExpertPolicy",
    "MetaWorldEnv",
    "check_task",
    "check_tasks",
    "expert_action",
    "make_env",
    "parse_cameras",
    "seed_range",
    "use_headless_rendering",
]
