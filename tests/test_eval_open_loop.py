"""Open-loop action error against recorded demonstrations (a tiny dataset written in the test)."""

import numpy as np
import pytest

from daptq.data.format import FORMAT_VERSION, Episode, atomic_write_json, shard_path, write_shard
from daptq.eval import open_loop_eval
from daptq.models.toy import toy_policy_from_spec

rng = np.random.default_rng(0)


def _episode(task, seed, steps):
    states = np.concatenate([rng.uniform(-0.1, 0.1, (steps, 3)) + [0, 0.6, 0.2], np.ones((steps, 1))], axis=1)
    actions = rng.uniform(-1, 1, (steps, 4)).astype(np.float32)
    return Episode(
        task=task,
        instruction=f"do {task}",
        seed=seed,
        success=True,
        images=np.zeros((steps, 8, 8, 3), np.uint8),
        states=states.astype(np.float32),
        actions=actions,
        ee_pos=states[:, :3].astype(np.float32),
        executed_actions=actions,
        step_success=np.zeros(steps, bool),
    )


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    episodes = {
        "reach": [_episode("reach", 200_000, 7), _episode("reach", 200_001, 5)],
        "push": [_episode("push", 200_000, 6)],
    }
    for task, eps in episodes.items():
        write_shard(shard_path(root, "val", task, 0), eps, [])
    info = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "tasks": ["reach", "push"],
        "action_dim": 4,
        "splits": {"val": {"episodes_per_task": 2, "seed_start": 200_000}},
    }
    atomic_write_json(root / "meta" / "info.json", info)
    atomic_write_json(root / "meta" / "stats.json", {})
    return root, episodes


def test_open_loop_error_matches_hand_computation(dataset, tmp_path):
    root, episodes = dataset
    result = open_loop_eval("toy:chunk=2", root, out=tmp_path / "out")
    policy = toy_policy_from_spec("toy:chunk=2")
    errors = []
    for ep in episodes["reach"]:
        policy.reset(seed=ep.seed)
        pred = np.stack(
            [policy.select_action({"state": s, "instruction": ep.instruction}) for s in ep.states]
        )
        errors.append(pred - ep.actions)
    err = np.concatenate(errors)
    reach = result["per_task"]["reach"]
    assert reach["episodes"] == 2 and reach["steps"] == 12
    np.testing.assert_allclose(reach["action_mae"], np.abs(err).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(reach["action_rmse"], np.sqrt((err**2).mean(axis=0)), rtol=1e-6)
    assert result["overall"]["steps"] == 18
    assert (tmp_path / "out" / "open_loop.json").is_file()
    capped = open_loop_eval("toy", root, tasks=["reach"], max_episodes=1)
    assert capped["per_task"]["reach"]["episodes"] == 1 and list(capped["per_task"]) == ["reach"]


def test_open_loop_bad_input(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(ValueError, match="acts in 3 dimensions"):
        open_loop_eval("toy:action_dim=3", root)
    with pytest.raises(ValueError, match="unknown split"):
        open_loop_eval("toy", root, split="train")
    with pytest.raises(FileNotFoundError):
        open_loop_eval("toy", tmp_path / "nothing")
