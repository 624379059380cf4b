"""Closed-loop paired evaluation on the Meta-World simulator with the toy policy and short episodes."""

import json

import numpy as np
import pytest

from daptq.eval import evaluate, store, write_report

pytestmark = pytest.mark.slow

FAST = {"max_steps": 12, "image_size": 16, "progress": False}


def _records(run_dir):
    """Records keyed by episode, minus the wall-clock time (the only field allowed to differ between runs)."""
    out = {}
    for r in store.read_records(run_dir):
        r = dict(r)
        for key in ("wall_s", "simulated_steps", "reference_cached"):  # how it ran, not what it gave
            r.pop(key)
        out[(r["task"], r["seed"])] = r
    return out


def test_fp_against_itself_has_zero_drift_and_identical_outcomes(tmp_path):
    summary = evaluate("toy", "toy", tasks=["reach"], episodes=2, out=tmp_path / "run", **FAST)
    records = store.read_records(tmp_path / "run")
    assert len(records) == 2
    for r in records:
        assert r["success"] == r["ref_success"] and r["steps"] == r["ref_steps"]
        assert r["drift_max"] == 0.0 and r["drift_auc"] == 0.0 and r["time_to_divergence"] is None
        assert r["action_mae"] == [0.0] * 4 and r["grip_disagreements"] == 0
        arrays = store.load_arrays(tmp_path / "run", r["task"], r["seed"])
        np.testing.assert_array_equal(arrays["ee"], arrays["ref_ee"])
        np.testing.assert_array_equal(arrays["actions"], arrays["shadow_actions"])
        assert np.ptp(arrays["ee"], axis=0).max() > 1e-3  # the arm did move: zero drift is not trivial
    assert summary["overall"]["mcnemar"]["p_value"] == 1.0
    assert summary["overall"]["success_diff"] == 0.0


def test_growing_weight_noise_gives_growing_drift(tmp_path):
    drift, mae = [], []
    for level in (0.02, 0.1, 0.5):
        s = evaluate(
            f"toy:weight_noise={level}",
            "toy",
            tasks=["push"],
            episodes=2,
            out=tmp_path / str(level),
            max_steps=25,
            image_size=16,
            progress=False,
        )
        drift.append(s["overall"]["drift_mean"])
        mae.append(np.mean(s["overall"]["action_mae_mean"]))
    assert 0 < drift[0] < drift[1] < drift[2], drift
    assert 0 < mae[0] < mae[1] < mae[2], mae


class Interrupt(RuntimeError):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    kwargs = {"tasks": ["reach", "push"], "episodes": 2, **FAST}
    # The uninterrupted run uses two spawned workers: results must not depend on process or scheduling.
    full = evaluate("toy:weight_noise=0.2", "toy", workers=2, out=tmp_path / "full", **kwargs)
    assert full["complete"]

    finished = []

    def fail_after_two(record):
        finished.append(record)
        if len(finished) == 2:
            raise Interrupt("simulated crash")

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        evaluate("toy:weight_noise=0.2", "toy", out=part, on_episode=fail_after_two, **kwargs)
    assert len(store.read_records(part)) == 2
    with open(part / store.EPISODES_NAME, "ab") as f:  # a crash in the middle of writing the third line
        f.write(b'{"task": "push", "se')
    assert len(store.read_records(part)) == 2  # the torn line is not an episode

    resumed = evaluate("toy:weight_noise=0.2", "toy", out=part, resume=True, **kwargs)
    lines = (part / store.EPISODES_NAME).read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # every episode exactly once
    assert _records(part) == _records(tmp_path / "full")
    for task, seed in _records(part):
        a, b = store.load_arrays(part, task, seed), store.load_arrays(tmp_path / "full", task, seed)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    resumed.pop("complete"), full.pop("complete")
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full, sort_keys=True)


def test_unpaired_evaluation(tmp_path):
    s = evaluate("toy", None, tasks=["reach"], episodes=1, out=tmp_path / "run", **FAST)
    assert not s["paired"] and s["episodes"] == 1
    (r,) = store.read_records(tmp_path / "run")
    assert "drift_mean" not in r and "ref_success" not in r and r["steps"] == 12
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run"]["image_size"] == 16 and config["run"]["camera"] == "corner3"
    assert config["run"]["reference"] is None and config["provenance"]["versions"]["torch"]
    assert config["candidate"]["recipe"]["seed"] == 0
    text = write_report(tmp_path / "run").read_text()  # an unpaired run has no drift section
    assert "drift_over_time.png" not in text and "| reach | 1 |" in text


def test_bad_input_is_rejected_without_losing_episodes(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'fly'"):
        evaluate("toy", "toy", tasks=["reach", "fly"], episodes=1, out=tmp_path / "a", **FAST)
    with pytest.raises(ValueError, match="different action spaces"):
        evaluate("toy:action_dim=3", "toy", tasks=["reach"], episodes=1, out=tmp_path / "b", **FAST)
    with pytest.raises(ValueError, match="acts in 3 dimensions, the reach environment in 4"):
        evaluate("toy:action_dim=3", None, tasks=["reach"], episodes=1, out=tmp_path / "d", **FAST)
    with pytest.raises(ValueError, match="model spec"):
        evaluate("toy", "", tasks=["reach"], episodes=1, out=tmp_path / "c", **FAST)

    run = tmp_path / "run"
    evaluate("toy:weight_noise=0.1", "toy", tasks=["reach"], episodes=1, out=run, **FAST)
    log_before = (run / store.EPISODES_NAME).read_bytes()
    with pytest.raises(ValueError, match="pass resume=True"):  # a fresh run into an existing run directory
        evaluate("toy:weight_noise=0.1", "toy", tasks=["reach"], episodes=1, out=run, **FAST)
    with pytest.raises(
        ValueError, match="differs from the requested one in: candidate, candidate_model, episodes"
    ):
        evaluate("toy:weight_noise=0.3", "toy", tasks=["reach"], episodes=2, out=run, resume=True, **FAST)
    assert (run / store.EPISODES_NAME).read_bytes() == log_before  # no finished episode lost

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    with pytest.raises(ValueError, match="not a daptq evaluation run"):
        evaluate("toy", "toy", tasks=["reach"], episodes=1, out=foreign, resume=True, **FAST)
    with pytest.raises(ValueError, match="not empty"):
        evaluate("toy", "toy", tasks=["reach"], episodes=1, out=foreign, **FAST)
    (foreign / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        evaluate("toy", "toy", tasks=["reach"], episodes=1, out=foreign, resume=True, **FAST)
    (foreign / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a daptq evaluation run config"):
        evaluate("toy", "toy", tasks=["reach"], episodes=1, out=foreign, resume=True, **FAST)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate("toy", "toy", tasks=["reach"], episodes=1, out=tmp_path / "missing", resume=True, **FAST)

    # A damaged line in the middle of the log is corruption, not a torn tail: refuse instead of dropping it.
    lines = log_before.split(b"\n")
    (run / store.EPISODES_NAME).write_bytes(b"{broken\n" + log_before)
    with pytest.raises(ValueError, match="line 1 is corrupted"):
        evaluate("toy:weight_noise=0.1", "toy", tasks=["reach"], episodes=1, out=run, resume=True, **FAST)
    assert (run / store.EPISODES_NAME).read_bytes() == b"{broken\n" + log_before
    assert len(lines) == 2


def test_observation_settings_follow_the_policies():
    from daptq.eval.runner import _observation_settings
    from daptq.models.adapter import PolicyInfo

    plain, vla = PolicyInfo("a"), PolicyInfo("b", image_size=64, camera="corner2")
    assert _observation_settings([plain], None, None) == (96, "corner3")
    assert _observation_settings([plain, vla], None, None) == (64, "corner2")
    assert _observation_settings([vla, vla], 64, None) == (64, "corner2")
    with pytest.raises(ValueError, match="image_size=32 requested, but the policies expect 64"):
        _observation_settings([vla], 32, None)
    with pytest.raises(ValueError, match="different camera"):
        _observation_settings([vla, PolicyInfo("c", camera="corner3")], None, None)


def test_a_policy_trained_on_another_scene_version_is_warned_about():
    import warnings

    from daptq.envs import SCENE_VERSION
    from daptq.eval.runner import _warn_on_scene_mismatch
    from daptq.models.adapter import PolicyInfo

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_on_scene_mismatch(
            [PolicyInfo("a"), PolicyInfo("b", scene_version=SCENE_VERSION)], SCENE_VERSION
        )
    with pytest.warns(UserWarning, match=f"trained on scene version {SCENE_VERSION + 1}"):
        _warn_on_scene_mismatch([PolicyInfo("c", scene_version=SCENE_VERSION + 1)], SCENE_VERSION)


def test_model_directory_digests_detect_a_changed_model(tmp_path):
    from daptq.eval.runner import _file_digests

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights v1")
    before = _file_digests(str(tmp_path / "model"))
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights v2")
    assert set(before) == {"model.safetensors"} and _file_digests(str(tmp_path / "model")) != before
    assert _file_digests("toy:seed=1") is None
