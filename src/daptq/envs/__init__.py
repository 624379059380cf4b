"""Meta-World environments with images, instructions, end-effector pose and success flags.

Importing this package sets ``MUJOCO_GL=egl`` (unless already set) before mujoco is imported, so rendering
works headless on CPU-only machines. Set ``MUJOCO_GL`` yourself before importing daptq to choose another
backend (e.g. ``osmesa``).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from daptq.cameras import parse_cameras  # noqa: E402
from daptq.envs.expert import ExpertPolicy, expert_action  # noqa: E402
from daptq.envs.metaworld_env import MetaWorldEnv, make_env  # noqa: E402
from daptq.envs.tasks import (  # noqa: E402
    DEFAULT_MAX_STEPS,
    MT10,
    SCENE_VERSION,
    SEED_SPLITS,
    TASKS,
    check_task,
    check_tasks,
    seed_range,
)

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
]
