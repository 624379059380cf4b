"""The LIBERO suite: its declarations (no LIBERO needed), official init states, seeded resets, observations,
7-D stepping, and the scripted expert solving an easy task (needs the ``libero`` extra: ./setup.sh installs
it unless DAPTQ_LIBERO=0; skipped with that reason otherwise)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from daptq.envs.suite import get_suite

needs_libero = pytest.mark.skipif(
    importlib.util.find_spec("libero") is None or importlib.util.find_spec("robosuite") is None,
    reason="LIBERO is not installed (the libero extra: ./setup.sh, or pip install -e '.[libero]')",
)


def test_libero_suite_declarations():
    from daptq.envs.libero_suite import EVAL_START

    suite = get_suite("libero")
    assert len(suite.tasks) == 20
    assert suite.check_tasks("libero_spatial") == [f"spatial-{i}" for i in range(10)]
    assert suite.check_tasks("libero_object") == [f"object-{i}" for i in range(10)]
    assert suite.action_space.names == ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "grip")
    assert suite.action_space.kinds == ("translation",) * 3 + ("rotation",) * 3 + ("gripper",)
    from daptq.models.adapter import ActionSpace

    assert ActionSpace.from_dict(suite.action_space.to_dict()).dim == 7  # what the model layer rebuilds
    assert {suite.max_steps[t] for t in suite.check_tasks("libero_spatial")} == {220}
    assert {suite.max_steps[t] for t in suite.check_tasks("libero_object")} == {280}
    assert list(suite.episode_ids("eval", 2)) == [EVAL_START, EVAL_START + 1]
    with pytest.raises(ValueError, match="50 episodes per task"):
        suite.episode_ids("eval", 51)
    ranges = [(s.start, s.start + 100_000) for name, s in suite.splits.items() if name != "eval"]
    assert all(hi <= EVAL_START for _, hi in ranges)  # seeded splits never reach the official states' ids
    assert len(suite.observations.state) == 8 and suite.observations.object_pose == "object_pose"


def test_quat2axisangle_matches_robosuite_convention():
    from scipy.spatial.transform import Rotation

    from daptq.envs.libero_suite import quat2axisangle

    rotation = Rotation.from_rotvec([0.3, -1.2, 2.0])
    np.testing.assert_allclose(quat2axisangle(rotation.as_quat()), [0.3, -1.2, 2.0], atol=1e-9)
    np.testing.assert_array_equal(quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))


@needs_libero
def test_instructions_are_liberos():
    from libero.libero import benchmark

    from daptq.envs.libero_suite import TASK_INDEX

    suite = get_suite("libero")
    benchmarks = benchmark.get_benchmark_dict()
    for task, (name, index) in TASK_INDEX.items():
        assert benchmarks[name]().get_task(index).language == suite.tasks[task], task


@pytest.fixture(scope="module")
def spatial_env():
    if importlib.util.find_spec("libero") is None:
        pytest.skip("LIBERO is not installed")
    env = get_suite("libero").make_env("spatial-0", lazy_images=True, settle_steps=0)
    yield env
    env.close()


@needs_libero
@pytest.mark.slow
def test_reset_to_an_official_init_state_then_step(spatial_env):
    from daptq.envs.libero_suite import EVAL_START

    env = spatial_env
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    obs, info = env.reset(seed=EVAL_START + 3)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # noqa: NPY002 (caller's stream untouched)
    np.testing.assert_allclose(env.sim.get_state().flatten(), env.init_states[3])
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    assert env.action_space.shape == (7,)
    np.testing.assert_allclose(obs["state"][:3], info["ee_pos"])
    assert info["object_pose"].shape == (7,) and not info["success"]
    image = obs["image"]
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and image.std() > 5
    obs2, reward, terminated, truncated, info = env.step(np.array([1.0, 0, 0, 0, 0, 0, -1]))
    assert obs2["state"][0] > obs["state"][0]  # +x moved the hand along +x
    assert not terminated and not truncated and env.steps == 1
    env.step(np.zeros(7))
    with pytest.raises(RuntimeError, match="old observation"):  # obs2's image was never rendered
        obs2["image"]  # noqa: B018
    with pytest.raises(ValueError, match="shape \\(7,\\)"):
        env.step(np.zeros(4))
    with pytest.raises(ValueError, match="50 official init states"):
        env.reset(seed=EVAL_START + 50)


@needs_libero
@pytest.mark.slow
def test_seeded_resets_are_reproducible_and_differ_by_seed(spatial_env):
    env = spatial_env
    env.reset(seed=100_000)
    a = env.sim.get_state().flatten().copy()
    env.reset(seed=100_001)
    b = env.sim.get_state().flatten().copy()
    env.reset(seed=100_000)
    np.testing.assert_array_equal(env.sim.get_state().flatten(), a)
    assert not np.allclose(a, b)


@needs_libero
@pytest.mark.slow
def test_expert_solves_an_easy_task_from_an_official_state():
    from daptq.envs.libero_expert import LiberoExpert
    from daptq.envs.libero_suite import EVAL_START

    suite = get_suite("libero")
    env = suite.make_env("object-1", lazy_images=True)  # cream cheese into the basket
    try:
        expert = LiberoExpert("object-1")
        env.reset(seed=EVAL_START)
        info = {"success": False}
        for _ in range(suite.max_steps["object-1"]):
            _, _, terminated, truncated, info = env.step(expert.act(env))
            if terminated or truncated:
                break
        assert info["success"], f"expert ended in phase {expert.phase} after {env.steps} steps"
    finally:
        env.close()
