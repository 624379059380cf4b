"""daptq.envs: seeded determinism, upright images, step limits, success termination and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from daptq.envs import DEFAULT_MAX_STEPS, MT10, SEED_SPLITS, TASKS, expert_action, make_env, seed_range

pytestmark = pytest.mark.slow  # runs the simulator


@pytest.fixture
def envs():
    made = []

    def _make(task, **kwargs):
        env = make_env(task, **kwargs)
        made.append(env)
        return env

    yield _make
    for env in made:
        env.close()


def test_task_table_is_mt10():
    assert MT10 == tuple(TASKS) and len(MT10) == 10
    assert all(name and not name.endswith("-v3") for name in MT10)
    assert all(1 <= DEFAULT_MAX_STEPS[t] <= 500 for t in MT10)
    starts = sorted(SEED_SPLITS.values())
    assert starts[0] == 0 and all(b - a >= 100_000 for a, b in zip(starts, starts[1:], strict=False))


def test_unknown_task_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"'pick_place'.*pick-place"):
        make_env("pick_place")


def test_task_lists_are_checked():
    from daptq.envs import check_tasks

    assert check_tasks(("reach", "push")) == ["reach", "push"]
    with pytest.raises(ValueError, match="at least one task"):
        check_tasks([])
    with pytest.raises(ValueError, match="duplicate tasks"):
        check_tasks(["reach", "reach"])
    with pytest.raises(ValueError, match="unknown task 'reech'"):
        check_tasks(["reach", "reech"])


def test_unknown_split_and_bad_max_steps_raise(envs):
    with pytest.raises(ValueError, match="'test'"):
        seed_range("test", 3)
    with pytest.raises(ValueError, match="max_steps"):
        envs("reach", max_steps=0)
    with pytest.raises(ValueError, match="unknown camera 'nope'"):
        envs("reach", camera="nope")


def test_observation_contract(envs):
    env = envs("push", image_size=40)
    obs, info = env.reset(seed=3)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (40, 40, 3)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (4,)
    assert obs["instruction"] == TASKS["push"]
    assert info["ee_pos"].dtype == np.float64 and info["ee_pos"].shape == (3,)
    np.testing.assert_allclose(obs["state"][:3], info["ee_pos"], rtol=1e-6)
    assert 0.0 <= obs["state"][3] <= 1.0
    assert (
        env.action_space.shape == (4,)
        and env.action_space.low.min() == -1
        and env.action_space.high.max() == 1
    )
    obs, reward, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert set(info) >= {"success", "ee_pos"} and isinstance(info["success"], bool)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(3))


def test_same_seed_reproduces_first_image_and_expert_trajectory(envs):
    a, b = envs("pick-place", image_size=48), envs("pick-place", image_size=48)
    trajectories = []
    for env in (a, b):
        obs, _ = env.reset(seed=11)
        frames, states = [obs["image"]], [obs["state"]]
        for _ in range(5):
            obs, *_ = env.step(expert_action(env))
            frames.append(obs["image"])
            states.append(obs["state"])
        trajectories.append((np.stack(frames), np.stack(states)))
    np.testing.assert_array_equal(trajectories[0][0], trajectories[1][0])
    np.testing.assert_array_equal(trajectories[0][1], trajectories[1][1])
    # Reset on the same instance after other episodes also reproduces it.
    a.reset(seed=5)
    obs, _ = a.reset(seed=11)
    np.testing.assert_array_equal(obs["image"], trajectories[0][0][0])


def test_different_seeds_place_objects_differently(envs):
    env = envs("push", image_size=48)
    first = {seed: env.reset(seed=seed)[0]["image"] for seed in (0, 1, 2)}
    goals = {seed: (env.reset(seed=seed), env.metaworld_obs[-3:].copy())[1] for seed in (0, 1, 2)}
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    assert np.linalg.norm(goals[0] - goals[1]) > 1e-3


def _project(env, point: np.ndarray) -> tuple[float, float]:
    """Pinhole projection of a world point to (row, col) of the upright image (180-degree-rotated render)."""
    mw = env._mw
    cam = mw.model.camera(env.camera).id
    rotation = mw.data.cam_xmat[cam].reshape(3, 3)
    rel = rotation.T @ (point - mw.data.cam_xpos[cam])
    focal = (env.image_size / 2) / np.tan(np.deg2rad(mw.model.cam_fovy[cam] / 2))
    u, v = rel[0] / -rel[2] * focal, rel[1] / -rel[2] * focal  # camera right, camera up
    # The camera is rolled upside down; the upright image is the raw one rotated by 180 degrees.
    return env.image_size / 2 + v, env.image_size / 2 - u


@pytest.mark.parametrize("task", ["reach", "pick-place"])
def test_images_are_upright_and_goal_marker_visible(envs, task):
    env = envs(task, image_size=96)
    obs, _ = env.reset(seed=4)
    image = obs["image"].astype(int)
    green = (image[..., 1] > 150) & (image[..., 0] < 100) & (image[..., 2] < 100)
    assert green.sum() >= 4, "goal marker not visible"
    rows, cols = np.nonzero(green)
    goal = env._mw.data.site("goal").xpos.copy()
    row, col = _project(env, goal)
    assert abs(rows.mean() - row) < 3 and abs(cols.mean() - col) < 3
    # Upright: a point above the goal appears higher in the image (smaller row).
    assert _project(env, goal + np.array([0.0, 0.0, 0.2]))[0] < row - 5
    # The marker sits where the pinhole model puts it only if the render is rotated, not mirrored or raw
    # (measured: the mirrored image puts it 20 px off in columns, the raw one 46 px off in rows too).


def test_step_limit_truncates(envs):
    env = envs("drawer-close", max_steps=3)
    env.reset(seed=0)
    flags = [env.step(np.zeros(4, np.float32))[3] for _ in range(3)]
    assert flags == [False, False, True]


def test_expert_success_terminates_episode(envs):
    env = envs("reach", image_size=16)
    env.reset(seed=2)
    for _ in range(DEFAULT_MAX_STEPS["reach"]):
        _, _, terminated, truncated, info = env.step(expert_action(env))
        if terminated or truncated:
            break
    assert terminated and info["success"]


def test_several_cameras_stack_their_views_in_order(envs):
    from daptq.envs import parse_cameras

    assert parse_cameras("corner3, topview") == ("corner3", "topview")
    for bad, message in (("", "non-empty"), ("corner3,", "empty camera"), ("topview,topview", "duplicate")):
        with pytest.raises(ValueError, match=message):
            parse_cameras(bad)
    both = envs("reach", image_size=32, camera="corner3,topview")
    assert both.observation_space["image"].shape == both.image_shape == (2, 32, 32, 3)
    obs, _ = both.reset(seed=5)
    assert obs["image"].shape == (2, 32, 32, 3)
    for view, camera in enumerate(("corner3", "topview")):
        single, _ = envs("reach", image_size=32, camera=camera).reset(seed=5)
        np.testing.assert_array_equal(obs["image"][view], single["image"])
    assert not np.array_equal(obs["image"][0], obs["image"][1])
    with pytest.raises(ValueError, match="unknown camera 'nope'"):
        envs("reach", camera="corner3,nope")


@pytest.mark.parametrize("task", ["reach", "drawer-open", "window-open", "peg-insert-side"])
def test_first_image_shows_the_episodes_own_scene(envs, task):
    # Meta-World places goal markers and some objects by editing the model; without forward kinematics after
    # reset, the first frame drew them where an earlier draw of the reset had put them.
    import mujoco

    env = envs(task, image_size=48)
    obs, _ = env.reset(seed=7)
    mw = env.unwrapped_metaworld
    body_pos, site_pos = mw.data.xpos.copy(), mw.data.site_xpos.copy()
    mujoco.mj_forward(mw.model, mw.data)
    np.testing.assert_allclose(mw.data.xpos, body_pos, atol=1e-12)
    np.testing.assert_allclose(mw.data.site_xpos, site_pos, atol=1e-12)
    np.testing.assert_array_equal(env.render(), obs["image"])
    if task == "reach":
        np.testing.assert_allclose(mw.data.site("goal").xpos, mw._target_pos, atol=1e-9)


def test_aimed_observation_shifts_only_the_goal_of_reach_and_pick_place():
    from daptq.envs.expert import aimed_observation

    obs = np.arange(39, dtype=np.float64)
    tcp = np.array([0.0, 1.0, -2.5])
    reach = aimed_observation("reach", obs, tcp)
    np.testing.assert_array_equal(reach[:-3], obs[:-3])
    np.testing.assert_allclose(reach[-3:], obs[-3:] + (obs[:3] - tcp))
    pick = aimed_observation("pick-place", obs, tcp)
    np.testing.assert_allclose(pick[-3:], obs[-3:] + (obs[:3] - obs[4:7]))
    assert aimed_observation("push", obs, tcp) is obs
    assert obs[-1] == 38  # the caller's array is not modified


@pytest.mark.parametrize("task, seed", [("reach", 200004), ("reach", 200003), ("pick-place", 200007)])
def test_corrected_experts_bring_the_scored_point_to_the_goal(envs, task, seed):
    # Meta-World's own experts stop 4.4-5.0 cm (reach, limit 5) and 6.5-7.0 cm (pick-place, limit 7) away;
    # goal heights of these seeds: 0.25, 0.06 and 0.30 m.
    env = envs(task, image_size=16, max_steps=400)
    env.reset(seed=seed)
    for _ in range(150):
        env.step(expert_action(env))
    assert env.goal_distance() < 0.02


def test_goal_distance_measures_the_point_meta_world_scores(envs):
    env = envs("reach", image_size=16)
    with pytest.raises(RuntimeError, match="reset"):
        env.goal_distance()
    env.reset(seed=3)
    mw = env.unwrapped_metaworld
    goal = mw._target_pos
    assert env.goal_distance() == pytest.approx(np.linalg.norm(mw.tcp_center - goal))
    # Push and pick-place score the puck, which the reach scene also holds (instruction swaps use it).
    assert env.goal_distance("push") == pytest.approx(np.linalg.norm(env.metaworld_obs[4:7] - goal))
    assert env.goal_distance("push") != pytest.approx(env.goal_distance())
    # The hand is not the scored point: Meta-World's reach expert aiming it was the demonstrations' flaw.
    assert np.linalg.norm(env.metaworld_obs[:3] - goal) != pytest.approx(env.goal_distance(), abs=1e-3)
    with pytest.raises(ValueError, match="drawer-open"):
        env.goal_distance("drawer-open")


def test_importing_envs_and_models_has_no_side_effects():
    """``import daptq.envs`` imports no simulator and sets no variable; the encoders leave the hub setting
    alone. The CLI and evaluation workers set both where their process starts."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys; import daptq.envs, daptq.envs.tasks, daptq.eval, daptq.models.encoders; "
        "from daptq.envs import MT10, check_tasks; check_tasks(['reach']); "
        "assert 'mujoco' not in sys.modules and 'metaworld' not in sys.modules, 'simulator imported'; "
        "assert 'MUJOCO_GL' not in os.environ and 'HF_HUB_OFFLINE' not in os.environ, 'variable set'; "
        "from daptq.eval.runner import set_process_defaults; set_process_defaults(); "
        "assert os.environ['MUJOCO_GL'] == 'egl' and os.environ['HF_HUB_OFFLINE'] == '1'"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "HF_HUB_OFFLINE")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_lazy_images_render_only_on_access_and_change_nothing():
    eager = make_env("push", image_size=32)
    lazy = make_env("push", image_size=32, lazy_images=True)
    rng = np.random.default_rng(0)
    obs_e, _ = eager.reset(seed=5)
    obs_l, _ = lazy.reset(seed=5)
    unread = None
    for step in range(12):
        if step == 1:
            unread = obs_l  # its image is never read while current
        np.testing.assert_array_equal(obs_e["state"], obs_l["state"])
        assert "image" in obs_l and sorted(obs_l) == ["image", "instruction", "state"]
        if step % 4 == 0:  # read the image every 4th step only, as a chunked policy does
            np.testing.assert_array_equal(obs_e["image"], obs_l["image"])
        action = rng.uniform(-1, 1, 4)
        obs_e, *_ = eager.step(action)
        obs_l, *_ = lazy.step(action)
    np.testing.assert_array_equal(obs_e["state"], obs_l["state"])  # skipped renders did not move physics
    np.testing.assert_array_equal(obs_e["image"], obs_l["image"])
    with pytest.raises(RuntimeError, match="moved on"):
        unread["image"]  # an old observation's image would show the current state: refused
    eager.close()
    lazy.close()


def test_envs_copied_from_the_compiled_scene_match_a_fresh_compile():
    """Each task's XML is compiled once per process and every env gets a copy: the copy must be the scene a
    fresh compile gives, and an env that ran must leave the next copy untouched."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    from daptq.envs import metaworld_env

    metaworld_env._COMPILED_MODELS.clear()
    first = make_env("drawer-close", image_size=32)  # compiles
    direct = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE["drawer-close-v3-goal-observable"](seed=0)
    for name in ("body_pos", "body_quat", "geom_size", "geom_rgba", "site_pos", "qpos0", "jnt_range"):
        np.testing.assert_array_equal(getattr(first._mw.model, name), getattr(direct.model, name))
    assert first._mw.model is not metaworld_env._COMPILED_MODELS[first._mw.fullpath]
    rng = np.random.default_rng(1)
    first.reset(seed=3)
    for _ in range(30):
        first.step(rng.uniform(-1, 1, 4))
    runs = []
    for _ in range(2):  # the second is a copy made after the first env moved its own model and data
        env = make_env("drawer-close", image_size=32) if runs else first
        obs, _ = env.reset(seed=7)
        images, states = [obs["image"]], [obs["state"]]
        for action in np.random.default_rng(2).uniform(-1, 1, (10, 4)):
            obs, *_ = env.step(action)
            images.append(obs["image"])
            states.append(obs["state"])
        runs.append((np.stack(images), np.stack(states)))
        if env is not first:
            env.close()
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    first.close()
    direct.close()
