"""A gymnasium environment over one Meta-World V3 task with images, an instruction and a seeded reset."""

from __future__ import annotations

from daptq.envs import use_headless_rendering

use_headless_rendering()  # simulator modules only: MUJOCO_GL must be set before MuJoCo is imported

import copy  # noqa: E402
import types  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE  # noqa: E402

from daptq.cameras import parse_cameras  # noqa: E402
from daptq.envs.render import OffscreenRenderer  # noqa: E402
from daptq.envs.tasks import (  # noqa: E402
    DEFAULT_MAX_STEPS,
    METAWORLD_MAX_STEPS,
    SCENE_VERSION,
    TASKS,
    check_task,
)

# Reach, push and pick-place use differently coloured goal markers (red, green, blue) in Meta-World, which
# would tell the policy the task without the instruction. We paint them one colour and make them a little
# larger so the 2 cm marker is still a few pixels at 96 px. The goal is a visual-only site: physics and
# success are unchanged.
SHARED_GOAL_TASKS = ("reach", "push", "pick-place")
# What Meta-World V3 scores in that shared scene: which point must come within how many metres of the goal.
# Any of the three can be checked on one scene (benchmarks/instruction_following.py swaps instructions).
SHARED_SCENE_SUCCESS: dict[str, tuple[str, float]] = {
    "reach": ("fingertips", 0.05),
    "push": ("puck", 0.05),
    "pick-place": ("puck", 0.07),
}
GOAL_RGBA = np.array([0.0, 1.0, 0.0, 1.0])
GOAL_SIZE = 0.03

# Each task's scene as MuJoCo compiled it from its XML, once per process: compiling is 80% of building an
# env (0.2-0.4 s), copying a compiled model 0.02 s. Never handed out: every env gets its own copy.
_COMPILED_MODELS: dict[str, mujoco.MjModel] = {}


def _initialize_from_compiled(mw: Any) -> tuple[mujoco.MjModel, mujoco.MjData]:
    """gymnasium's ``MujocoEnv._initialize_simulation`` with the XML compiled once per process."""
    compiled = _COMPILED_MODELS.get(mw.fullpath)
    if compiled is None:
        compiled = _COMPILED_MODELS[mw.fullpath] = mujoco.MjModel.from_xml_path(mw.fullpath)
    model = copy.copy(compiled)  # mj_copyModel: an independent model
    # As gymnasium does: grow the offscreen framebuffer to the render size, never shrink it.
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, mw.width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, mw.height)
    return model, mujoco.MjData(model)


def _metaworld_env(task: str) -> Any:
    """Meta-World's goal-observable env of ``task``, its scene copied from the process's compiled model.

    Meta-World's constructor calls ``super(type(env), env).__init__()``, so a subclass would recurse; the
    compile step is replaced on the instance instead, for its constructor only.
    """
    cls = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-v3-goal-observable"]
    mw = cls.__new__(cls)
    mw._initialize_simulation = types.MethodType(_initialize_from_compiled, mw)
    try:
        # seed=0 only stops Meta-World's constructor from consuming the global numpy RNG; reset() reseeds.
        cls.__init__(mw, seed=0)
    finally:
        del mw._initialize_simulation
    return mw


class MetaWorldEnv(gym.Env):
    """One MT10 task: dict observations (upright RGB image, ee xyz + gripper opening, instruction).

    ``camera`` names one camera (``image`` is (H, W, 3)) or several joined by commas, e.g.
    ``"corner3,topview"`` (``image`` is (V, H, W, 3), views in that order).

    ``reset(seed=s)`` draws the object and goal positions from ``s`` alone, so a (task, seed) pair reproduces
    the same initial state and first image exactly. ``terminated`` is True on the first success (unless
    ``terminate_on_success=False``, which data generation uses to record a few steps past success);
    ``truncated`` is True once ``max_steps`` steps have been taken.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        task: str,
        *,
        image_size: int = 96,
        camera: str = "corner3",
        max_steps: int | None = None,
        instruction: str | None = None,
        terminate_on_success: bool = True,
        lazy_images: bool = False,
    ) -> None:
        self.task = check_task(task)
        self.lazy_images = lazy_images
        self._observation_id = 0  # bumped by reset and step: a lazy image renders only the current state
        if max_steps is None:
            max_steps = DEFAULT_MAX_STEPS[task]
        if not 1 <= max_steps <= METAWORLD_MAX_STEPS:
            raise ValueError(f"max_steps must be in [1, {METAWORLD_MAX_STEPS}], got {max_steps}")
        self.max_steps = max_steps
        self.instruction = TASKS[task] if instruction is None else instruction
        self.image_size = image_size
        self.camera = camera
        self.cameras = parse_cameras(camera)
        self.terminate_on_success = terminate_on_success
        self.scene_version = SCENE_VERSION
        self.render_mode = "rgb_array"

        self._mw = _metaworld_env(task)
        self._mw.max_path_length = METAWORLD_MAX_STEPS
        if task in SHARED_GOAL_TASKS:
            self._mw.model.site("goal").rgba = GOAL_RGBA
            self._mw.model.site("goal").size[:] = GOAL_SIZE
        self._renderers = [OffscreenRenderer(self._mw.model, image_size, name) for name in self.cameras]

        self.action_space = spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, self.image_shape, dtype=np.uint8),
                "state": spaces.Box(-np.inf, np.inf, (4,), dtype=np.float32),
                "instruction": spaces.Text(max_length=1000),
            }
        )
        self._mw_obs: np.ndarray | None = None
        self._steps = 0

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, 3) for one camera, (V, H, W, 3) for V cameras."""
        size = (self.image_size, self.image_size, 3)
        return size if len(self.cameras) == 1 else (len(self.cameras), *size)

    @property
    def metaworld_obs(self) -> np.ndarray:
        """Meta-World's 39-dim goal-observable state vector (what its scripted experts read)."""
        if self._mw_obs is None:
            raise RuntimeError("call reset() before reading the environment state")
        return self._mw_obs

    def goal_distance(self, task: str | None = None) -> float:
        """Distance (m) from the goal of the point Meta-World scores for ``task`` (default: this env's task)
        in the shared reach/push/pick-place scene: the fingertip centre for reach, the puck otherwise."""
        task = self.task if task is None else task
        if task not in SHARED_SCENE_SUCCESS:
            raise ValueError(f"goal_distance is defined for {', '.join(SHARED_SCENE_SUCCESS)}, not {task!r}")
        self.metaworld_obs  # noqa: B018 (raises before the first reset)
        what = SHARED_SCENE_SUCCESS[task][0]
        point = self._mw.tcp_center if what == "fingertips" else self._mw._get_pos_objects()
        return float(np.linalg.norm(np.asarray(point) - self._mw._target_pos))

    @property
    def unwrapped_metaworld(self):
        """The wrapped Meta-World env, for task-specific state (``tcp_center``, ``_target_pos``, objects)."""
        return self._mw

    @property
    def steps(self) -> int:
        return self._steps

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._mw.seed(int(seed))  # seeds Meta-World's own np_random, which draws the positions below
        self._mw._freeze_rand_vec = False
        self._mw.seeded_rand_vec = True
        mw_obs, _ = self._mw.reset()
        # Meta-World places goal markers and some objects (drawers, windows, the peg box) by editing the
        # model, and their rendered world positions are only recomputed by the next physics step: without
        # this, an episode's first image draws them where an earlier stage of the reset put them.
        # Forward kinematics leaves the simulated state (qpos, qvel) unchanged.
        mujoco.mj_forward(self._mw.model, self._mw.data)
        self._mw_obs = np.asarray(mw_obs, dtype=np.float64)
        self._steps = 0
        return self._observation(), {"success": False, "ee_pos": self._mw_obs[:3].copy()}

    def step(self, action):
        if self._mw_obs is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (4,):
            raise ValueError(f"action must have shape (4,), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        mw_obs, reward, _, _, mw_info = self._mw.step(np.clip(action, -1.0, 1.0))
        self._mw_obs = np.asarray(mw_obs, dtype=np.float64)
        self._steps += 1
        success = bool(mw_info["success"])
        terminated = success and self.terminate_on_success
        truncated = self._steps >= self.max_steps
        info = {"success": success, "ee_pos": self._mw_obs[:3].copy()}
        return self._observation(), float(reward), terminated, truncated, info

    def render(self) -> np.ndarray:
        if self._renderers is None:
            raise RuntimeError("the environment is closed")
        images = [renderer.render(self._mw.data) for renderer in self._renderers]
        return images[0] if len(images) == 1 else np.stack(images)

    def close(self) -> None:
        if self._renderers is not None:
            for renderer in self._renderers:
                renderer.close()
            self._renderers = None
        self._mw.close()

    def _observation(self) -> Mapping[str, Any]:
        state = np.concatenate([self._mw_obs[:3], self._mw_obs[3:4]]).astype(np.float32)
        self._observation_id += 1
        if self.lazy_images:
            return LazyImageObservation(self, state, self._observation_id)
        return {"image": self.render(), "state": state, "instruction": self.instruction}


class LazyImageObservation(Mapping):
    """An observation whose image is rendered on first access, for consumers that look at few frames.

    A chunked policy reads the image only when it re-plans (one step in four for the reference VLA), and
    rendering is most of a step's cost on CPU. Rendering only reads the simulation state, so trajectories are
    unchanged (tested). Reading the image after the environment has moved on raises instead of rendering the
    wrong state.
    """

    _KEYS = ("image", "state", "instruction")

    def __init__(self, env: MetaWorldEnv, state: np.ndarray, observation_id: int) -> None:
        self._env, self._state, self._id = env, state, observation_id
        self._image: np.ndarray | None = None

    def __getitem__(self, key: str) -> Any:
        if key == "image":
            if self._image is None:
                if self._env._observation_id != self._id:
                    raise RuntimeError(
                        "the image of an old observation was read after the environment moved on"
                    )
                self._image = self._env.render()
            return self._image
        if key == "state":
            return self._state
        if key == "instruction":
            return self._env.instruction
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._KEYS

    def __iter__(self):
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


def make_env(task: str, **options: Any) -> MetaWorldEnv:
    """Build the environment for one MT10 task (names without "-v3"); ``options`` are ``MetaWorldEnv``'s."""
    return MetaWorldEnv(task, **options)
