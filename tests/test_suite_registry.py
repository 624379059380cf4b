"""daptq.envs.suite: the registry (with a third, fake suite defined here: adding a benchmark is one module),
lazy built-ins, and the Meta-World suite wrapping today's environments and expert unchanged."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from daptq.envs.suite import (
    Actions,
    Observations,
    Split,
    Suite,
    get_suite,
    register_suite,
    suite_names,
    unregister_suite,
)
from daptq.models.adapter import ActionSpace


class ToyLineEnv:
    """A 1-D point that must reach x >= 1: the whole of a benchmark, for the registry's sake."""

    def __init__(self, task: str, *, max_steps: int | None = None, **_: object) -> None:
        self.task, self.max_steps = task, max_steps or 5
        self.instruction = TOY_TASKS[task]

    def reset(self, *, seed: int | None = None):
        self.x, self.steps = float(np.random.default_rng(seed).uniform(0, 0.5)), 0
        return self._obs(), {"success": False, "ee_pos": np.array([self.x, 0, 0], np.float32)}

    def step(self, action):
        self.x += float(action[0]) * 0.25
        self.steps += 1
        success = self.x >= 1.0
        info = {"success": success, "ee_pos": np.array([self.x, 0, 0], np.float32)}
        return self._obs(), float(success), success, self.steps >= self.max_steps, info

    def _obs(self):
        image = np.zeros((8, 8, 3), np.uint8)
        return {
            "image": image,
            "state": np.array([self.x, 0, 0], np.float32),
            "instruction": self.instruction,
        }


TOY_TASKS = {"right": "move right", "far-right": "move far to the right"}


def make_toy_suite(name: str = "toy-line") -> Suite:
    return Suite(
        name=name,
        version=1,
        tasks=TOY_TASKS,
        action_space=Actions(("dx",), ("translation",)),
        max_steps={"right": 5, "far-right": 9},
        observations=Observations(
            cameras=("top",), default_camera="top", default_image_size=8, state=("x", "y", "z")
        ),
        splits={"train": Split(0), "eval": Split(1000, 3, "three fixed starts")},
        make_env=lambda task, **options: ToyLineEnv(task, **options),
        make_expert=lambda task: lambda env: np.array([1.0], np.float32),
        families={"all": tuple(TOY_TASKS)},
    )


@pytest.fixture
def toy_suite():
    suite = register_suite(make_toy_suite())
    yield suite
    unregister_suite(suite.name)


def test_a_third_suite_registers_and_runs_through_the_registry(toy_suite):
    suite = get_suite("toy-line")
    assert suite is toy_suite and "toy-line" in suite_names()
    assert suite.check_tasks("all") == ["right", "far-right"] and suite.check_tasks(None) == [
        "right",
        "far-right",
    ]
    env = suite.make_env("right", max_steps=suite.max_steps["right"])
    expert = suite.make_expert("right")
    obs, info = env.reset(seed=next(iter(suite.episode_ids("eval", 1))))
    for _ in range(suite.max_steps["right"]):
        obs, _, terminated, truncated, info = env.step(expert(env))
        if terminated or truncated:
            break
    assert info["success"] and obs["state"].shape == (len(suite.observations.state),)
    assert suite.cache_identity() == {
        "suite": "toy-line",
        "suite_version": 1,
        "action_space": suite.action_space.to_dict(),
        "state": ["x", "y", "z"],
    }


def test_registry_refuses_duplicates_and_names_unknown_suites(toy_suite):
    with pytest.raises(ValueError, match="already registered"):
        register_suite(make_toy_suite())
    assert register_suite(make_toy_suite(), replace=True).name == "toy-line"
    with pytest.raises(ValueError, match=r"unknown suite 'nope'.*libero.*metaworld.*toy-line"):
        get_suite("nope")
    with pytest.raises(TypeError, match="expects a Suite"):
        register_suite("toy-line")


def test_suites_validate_what_they_declare():
    suite = make_toy_suite()
    with pytest.raises(ValueError, match="unknown task 'left' of suite toy-line.*right, far-right"):
        suite.check_tasks(["left"])
    with pytest.raises(ValueError, match="duplicate tasks"):
        suite.check_tasks(["right", "all"])
    with pytest.raises(ValueError, match="3 episodes per task.*4 requested"):
        suite.episode_ids("eval", 4)
    assert list(suite.episode_ids("eval", 2, offset=1)) == [1001, 1002]
    assert list(suite.episode_ids("train", 2)) == [0, 1]
    with pytest.raises(ValueError, match="unknown split 'test'.*train, eval"):
        suite.episode_ids("test", 1)
    kwargs = {k: getattr(suite, k) for k in suite.__dataclass_fields__}
    with pytest.raises(ValueError, match="no step limit"):
        Suite(**{**kwargs, "max_steps": {"right": 5}})
    with pytest.raises(ValueError, match="no 'eval' split"):
        Suite(**{**kwargs, "splits": {"train": Split(0)}})
    with pytest.raises(ValueError, match="unknown kinds \\['yaw'\\]"):
        Actions(("dyaw",), ("yaw",))
    with pytest.raises(ValueError, match="default camera 'side'"):
        Observations(cameras=("top",), default_camera="side", default_image_size=8, state=())
    missing = Suite(
        **{**kwargs, "name": "needs-sim", "requires": ("no_such_simulator_xyz",), "install_hint": "pip it"}
    )
    assert not missing.available()
    with pytest.raises(ModuleNotFoundError, match="no_such_simulator_xyz; pip it"):
        missing.require()


def test_looking_suites_up_imports_no_simulator():
    code = (
        "import sys; from daptq.envs.suite import get_suite, suite_names; suite_names();"
        "get_suite('metaworld'); get_suite('libero');"
        "bad = [m for m in ('mujoco', 'metaworld', 'libero', 'robosuite') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metaworld_suite_declares_todays_tables():
    from daptq.envs.tasks import DEFAULT_MAX_STEPS, SEED_SPLITS, TASKS
    from daptq.models.adapter import METAWORLD_ACTION_SPACE

    suite = get_suite("metaworld")
    assert dict(suite.tasks) == TASKS and dict(suite.max_steps) == DEFAULT_MAX_STEPS
    assert ActionSpace.from_dict(suite.action_space.to_dict()) == METAWORLD_ACTION_SPACE
    assert suite.action_space == METAWORLD_ACTION_SPACE and Actions is ActionSpace  # one type, in a leaf
    assert {s: suite.splits[s].start for s in suite.splits} == SEED_SPLITS
    assert list(suite.episode_ids("eval", 2)) == [SEED_SPLITS["eval"], SEED_SPLITS["eval"] + 1]
    assert suite.check_tasks("mt10") == list(TASKS)
    assert suite.observations.default_camera == "corner3" and suite.observations.default_image_size == 96


@pytest.mark.slow
def test_metaworld_suite_env_and_expert_are_todays():
    from daptq.envs import expert_action, make_env

    suite = get_suite("metaworld")
    seed = next(iter(suite.episode_ids("eval", 1)))
    ours, theirs = suite.make_env("pick-place", image_size=32), make_env("pick-place", image_size=32)
    try:
        for camera in suite.observations.cameras:  # every declared camera exists in the scene
            probe = suite.make_env("reach", image_size=8, camera=camera)
            probe.close()
        a, info_a = ours.reset(seed=seed)
        b, info_b = theirs.reset(seed=seed)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["state"], b["state"])
        np.testing.assert_array_equal(info_a["ee_pos"], info_b["ee_pos"])
        assert a["instruction"] == b["instruction"] == suite.tasks["pick-place"]
        expert = suite.make_expert("pick-place")
        for _ in range(5):
            action = expert(ours)
            np.testing.assert_array_equal(action, expert_action(theirs))
            a = ours.step(action)[0]
            b = theirs.step(action)[0]
            np.testing.assert_array_equal(a["state"], b["state"])
        assert ours.max_steps == suite.max_steps["pick-place"]
        assert int(ours.action_space.shape[0]) == suite.action_space.dim
    finally:
        ours.close()
        theirs.close()
