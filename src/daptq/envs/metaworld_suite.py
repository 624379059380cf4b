"""Meta-World MT10 as a :class:`~daptq.envs.suite.Suite`: today's environments, expert and splits, unchanged.

Everything is read from ``daptq.envs.tasks`` (plain data) and the simulator is imported only when an env or
expert is built, so looking the suite up costs nothing.
"""

from __future__ import annotations

from typing import Any

from daptq.envs.actions import ActionSpace
from daptq.envs.suite import Observations, Split, Suite, register_suite
from daptq.envs.tasks import (
    DEFAULT_MAX_STEPS,
    ENV_VERSION,
    METAWORLD_MAX_STEPS,
    SCENE_VERSION,
    SEED_SPLITS,
    TASKS,
)


def _make_env(task: str, **options: Any) -> Any:
    from daptq.envs.metaworld_env import make_env

    return make_env(task, **options)


def _make_expert(task: str):
    from daptq.envs.expert import ExpertPolicy

    return ExpertPolicy(task).act


def _splits() -> dict[str, Split]:
    order = sorted(SEED_SPLITS, key=SEED_SPLITS.get)
    splits = {}
    for split in order:
        splits[split] = Split(SEED_SPLITS[split], None, f"seeded resets from {SEED_SPLITS[split]}")
    return splits


METAWORLD = register_suite(
    Suite(
        name="metaworld",
        # The rollout's identity: ENV_VERSION (reset, stepping, observations) and SCENE_VERSION (what the
        # camera sees) combined, so bumping either invalidates cached reference rollouts.
        version=ENV_VERSION * 1000 + SCENE_VERSION,
        tasks=dict(TASKS),
        # daptq.models.adapter.METAWORLD_ACTION_SPACE (tested equal)
        action_space=ActionSpace(
            ("dx", "dy", "dz", "grip"), ("translation", "translation", "translation", "gripper")
        ),
        max_steps=dict(DEFAULT_MAX_STEPS),
        observations=Observations(
            cameras=("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV"),
            default_camera="corner3",
            default_image_size=96,
            state=("ee_x", "ee_y", "ee_z", "gripper_opening"),
            ee_pose="state[:3]",
            object_pose=None,
        ),
        splits=_splits(),
        make_env=_make_env,
        make_expert=_make_expert,
        success="Meta-World V3's info['success'] (task-specific distance thresholds)",
        requires=("metaworld", "mujoco"),
        install_hint="run ./setup.sh",
        families={"mt10": tuple(TASKS)},
        scene_version=SCENE_VERSION,
        # Demonstrations roll out to Meta-World's horizon, so that step limits can be measured from the data.
        generation_max_steps=METAWORLD_MAX_STEPS,
        noise_std=0.2,
        packages=("mujoco", "metaworld"),
    )
)
