"""A third suite for the tests, pure numpy (no simulator): a point gripper in a unit box that touches or
carries a ball. It is the whole of a benchmark as daptq sees one (tasks, instructions, observation
conventions, 7-D object pose, 4-D actions, step limits, splits, a scripted expert), so that evaluation,
data generation and calibration are shown to go through the suite registry alone: adding a benchmark is
this one module.

Its conventions differ from Meta-World's on purpose: the end effector is *not* ``state[:3]`` (the state starts
with the gripper opening; the suite declares ``ee_pose="info"``), and a manipulated object is declared, so a
rollout that read ``obs["state"][:3]`` or ignored the object would be caught.

Nothing registers on import: ``register()`` does (and returns the suite), ``unregister()`` removes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from daptq.envs.suite import Actions, Observations, Split, Suite, register_suite, unregister_suite

NAME = "fake"
TASKS = {"reach-ball": "touch the red ball", "carry-ball": "carry the red ball to the blue bin"}
STEP = 0.05  # metres per unit action
RADIUS = 0.06  # success and grasp radius
BIN = np.array([0.8, 0.8, 0.1])


class _Box:
    """What the evaluator reads of ``env.action_space``: its shape."""

    shape = (4,)


class LazyImage(Mapping):
    """An observation whose image is drawn only when read (as daptq's lazy images are rendered)."""

    def __init__(self, env: FakeArmEnv, state: np.ndarray) -> None:
        self._env, self._state, self._image = env, state, None

    def __getitem__(self, key: str) -> Any:
        if key == "image":
            if self._image is None:
                self._image = self._env.render()
            return self._image
        return {"state": self._state, "instruction": self._env.instruction}[key]

    def __iter__(self):
        return iter(("image", "state", "instruction"))

    def __len__(self) -> int:
        return 3


class FakeArmEnv:
    """The fake suite's environment: ``reset(seed=episode_id)`` / ``step(action)`` as daptq's envs do."""

    def __init__(
        self,
        task: str,
        *,
        image_size: int = 16,
        camera: str = "top",
        max_steps: int | None = None,
        terminate_on_success: bool = True,
        lazy_images: bool = False,
    ) -> None:
        self.task = SUITE_TEMPLATE.check_task(task)
        self.instruction = TASKS[task]
        self.image_size, self.camera = int(image_size), camera
        self.max_steps = int(max_steps or SUITE_TEMPLATE.max_steps[task])
        self.terminate_on_success, self.lazy_images = terminate_on_success, lazy_images
        self.action_space = _Box()
        self.renders = 0
        self.closed = False

    def reset(self, *, seed: int | None = None):
        rng = np.random.default_rng(seed)
        self.ee = rng.uniform(0.1, 0.5, 3)
        self.ball = np.concatenate([rng.uniform(0.3, 0.7, 2), [0.1]])
        self.grip = 1.0  # opening: 1 open, 0 closed
        self.held = False
        self.steps = 0
        return self._obs(), self._info(False)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(f"fake suite: action must be 4 finite numbers, got {action}")
        action = np.clip(action, -1.0, 1.0)
        self.ee = np.clip(self.ee + STEP * action[:3], 0.0, 1.0)
        self.grip = 0.0 if action[3] > 0 else 1.0
        if self.grip == 0.0 and np.linalg.norm(self.ee - self.ball) < RADIUS:
            self.held = True
        elif self.grip == 1.0:
            self.held = False
        if self.held:
            self.ball = self.ee.copy()
        self.steps += 1
        success = self.success()
        terminated = success and self.terminate_on_success
        return self._obs(), float(success), terminated, self.steps >= self.max_steps, self._info(success)

    def success(self) -> bool:
        if self.task == "reach-ball":
            return bool(np.linalg.norm(self.ee - self.ball) < RADIUS)
        return bool(np.linalg.norm(self.ball - BIN) < RADIUS)

    def render(self) -> np.ndarray:
        self.renders += 1
        n = self.image_size
        image = np.zeros((n, n, 3), np.uint8)
        for pos, channel in ((self.ee, 1), (self.ball, 0), (BIN, 2)):
            x, y = (np.clip(pos[:2], 0, 0.999) * n).astype(int)
            image[y, x, channel] = 255
        return image

    def close(self) -> None:
        self.closed = True

    def _obs(self):
        state = np.array([self.grip, *self.ee], np.float32)
        if self.lazy_images:
            return LazyImage(self, state)
        return {"image": self.render(), "state": state, "instruction": self.instruction}

    def _info(self, success: bool) -> dict[str, Any]:
        pose = np.concatenate([self.ball, [1.0, 0.0, 0.0, 0.0]]).astype(np.float32)
        return {"success": success, "ee_pos": self.ee.astype(np.float32), "object_pose": pose}


def expert(env: FakeArmEnv) -> np.ndarray:
    """Go to the ball with the gripper open, close on it, carry it to the bin (reach: touch it)."""
    if env.task == "reach-ball" or not env.held:
        target, close = env.ball, env.task != "reach-ball" and np.linalg.norm(env.ee - env.ball) < 0.03
    else:
        target, close = BIN, True
    move = np.clip((target - env.ee) / STEP, -1.0, 1.0)
    return np.array([*move, 1.0 if close else -1.0], np.float32)


def make_suite(name: str = NAME) -> Suite:
    return Suite(
        name=name,
        version=3,
        tasks=TASKS,
        action_space=Actions(
            ("dx", "dy", "dz", "grip"), ("translation", "translation", "translation", "gripper")
        ),
        max_steps={"reach-ball": 30, "carry-ball": 60},
        observations=Observations(
            cameras=("top",),
            default_camera="top",
            default_image_size=16,
            state=("gripper_opening", "ee_x", "ee_y", "ee_z"),
            ee_pose="info",
            object_pose="object_pose",
        ),
        splits={
            "train": Split(0),
            "calib": Split(100_000),
            "val": Split(200_000),
            "eval": Split(1_000_000, 20, "20 fixed starts per task"),
        },
        make_env=lambda task, **options: FakeArmEnv(task, **options),
        make_expert=lambda task: expert,
        success="ball within 6 cm of the gripper (reach) or of the bin (carry)",
        families={"all": tuple(TASKS)},
        noise_std=0.1,
    )


SUITE_TEMPLATE = make_suite()


def register() -> Suite:
    """Register the fake suite (idempotent); tests call it from a fixture, never at import."""
    return register_suite(SUITE_TEMPLATE, replace=True)


def unregister() -> None:
    unregister_suite(NAME)
