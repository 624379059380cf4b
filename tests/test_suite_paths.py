"""Evaluation, data generation and calibration go through the suite registry: a third, fake suite (pure numpy,
``tests/fake_suite.py``, registered by a fixture) runs through ``daptq eval --suite fake`` paired against FP
(exactly zero FP-vs-FP drift, end effector and object read as the suite declares them), through ``daptq data
generate --suite fake`` into the same dataset format, and from there into calibration batches."""

from __future__ import annotations

import json

import fake_suite
import numpy as np
import pytest

from daptq.cli import main
from daptq.envs.suite import get_suite


@pytest.fixture
def fake():
    suite = fake_suite.register()
    yield suite
    fake_suite.unregister()


def _eval(out, cache, *extra):
    argv = ["eval", "toy", "--reference", "toy", "--suite", "fake", "--tasks", "all", "--episodes", "2"]
    argv += ["--workers", "1", "--no-progress", "--out", str(out), "--reference-cache", str(cache), *extra]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    return summary, records


def test_eval_on_a_registered_suite_pairs_fp_with_itself_at_zero_drift(fake, tmp_path, capsys):
    summary, records = _eval(tmp_path / "run", tmp_path / "cache", "--envs-per-worker", "1")
    assert "object cm" in capsys.readouterr().out  # the suite declares an object: its drift is shown
    run = summary["run"]
    assert (
        run["suite"] == "fake" and run["suite_version"] == 3 and run["tasks"] == ["reach-ball", "carry-ball"]
    )
    assert run["seed_start"] == 1_000_000 and run["max_steps"] == {"reach-ball": 30, "carry-ball": 60}
    assert run["image_size"] == 16 and run["camera"] == "top"  # the suite's defaults (the toy declares none)
    overall = summary["overall"]
    assert overall["episodes"] == 4 and overall["success_rate"] == overall["ref_success_rate"]
    for key in ("drift_mean", "drift_max_mean", "object_drift_mean", "floor_object_drift_mean"):
        assert key in overall
    assert overall["drift_mean"] == 0.0 and overall["object_drift_mean"] == 0.0
    assert all(r["drift_max"] == 0.0 and r["object_drift_max"] == 0.0 for r in records)

    # The end effector came from info["ee_pos"] (the suite's declaration), not from state[:3]; the object
    # path from info["object_pose"].
    from daptq.eval.store import load_arrays

    arrays = load_arrays(tmp_path / "run", "carry-ball", 1_000_000)
    env = fake.make_env("carry-ball")
    obs, info = env.reset(seed=1_000_000)
    np.testing.assert_array_equal(arrays["ee"][0], info["ee_pos"])
    np.testing.assert_array_equal(arrays["objects"][0], info["object_pose"][:3])
    assert not np.array_equal(arrays["ee"][0], obs["state"][:3])
    assert arrays["ee"].shape == arrays["objects"].shape == (arrays["actions"].shape[0] + 1, 3)

    # Cached reference rollouts (objects included) and batched rollouts (several envs in lockstep) agree.
    key = ("success", "steps", "ref_steps", "drift_mean", "object_drift_mean", "floor_object_drift_mean")
    strip = lambda rs: sorted(tuple([r["task"], r["seed"], *(r[k] for k in key)]) for r in rs)  # noqa: E731
    _, cached = _eval(tmp_path / "run2", tmp_path / "cache", "--envs-per-worker", "1")
    assert all(r["reference_cached"] for r in cached) and strip(cached) == strip(records)
    np.testing.assert_array_equal(load_arrays(tmp_path / "run2", "carry-ball", 1_000_000)["ref_objects"],
                                  arrays["ref_objects"])  # fmt: skip
    _, batched = _eval(tmp_path / "run3", tmp_path / "cache", "--envs-per-worker", "2")
    assert strip(batched) == strip(records)


def test_a_quantized_stand_in_drifts_and_its_object_drift_is_recorded(fake, tmp_path):
    argv = ["eval", "toy:weight_noise=0.5", "--reference", "toy", "--suite", "fake", "--tasks", "carry-ball"]
    argv += ["--episodes", "2", "--workers", "1", "--no-progress", "--no-reference-cache"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    overall = json.loads((tmp_path / "run" / "summary.json").read_text())["overall"]
    assert overall["drift_mean"] > 0.0 and overall["object_drift_mean"] >= 0.0


def test_suite_options_are_checked_against_the_suite_before_any_work(fake, tmp_path, capsys):
    base = ["eval", "toy", "--suite", "fake", "--out", str(tmp_path / "run")]
    assert main([*base, "--tasks", "reach"]) == 2
    err = capsys.readouterr().err
    assert "--tasks" in err and "unknown task 'reach' of suite fake" in err and "reach-ball" in err
    assert main([*base, "--camera", "corner3"]) == 2
    assert "--camera" in capsys.readouterr().err
    assert main(["eval", "toy", "--suite", "nope", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--suite" in err and "unknown suite 'nope'" in err and "fake" in err
    assert main([*base, "--workers", "2"]) == 2  # a suite registered in this process cannot reach workers
    assert "workers=1" in capsys.readouterr().err
    assert main([*base, "--episodes", "21", "--workers", "1"]) == 2  # the eval split has 20 fixed starts
    assert "20 episodes per task" in capsys.readouterr().err
    assert (
        main(
            ["eval", "toy:action_dim=7", "--suite", "fake", "--out", str(tmp_path / "run"), "--workers", "1"]
        )
        == 2
    )
    assert "acts in 7 dimensions, the fake suite in 4 (dx, dy, dz, grip)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_cache_key_names_the_suite_and_its_version(fake):
    from daptq.eval.cache import base_key

    ref = {"digest": "d", "declares": {}}
    run = {"image_size": 16, "camera": "top", "scene_version": 1, "suite": "fake"}
    key = base_key(run, ref)
    assert key["suite"]["suite"] == "fake" and key["suite"]["suite_version"] == 3
    legacy = base_key({k: v for k, v in run.items() if k != "suite"}, ref)  # a run from before suites
    assert legacy["suite"]["suite"] == "metaworld"
    assert key != legacy


def test_data_generate_on_a_registered_suite_writes_the_dataset_format_and_calibrates(fake, tmp_path, capsys):
    from daptq.data.calibration import calibration_for_policy, sample_calibration
    from daptq.data.format import open_dataset
    from daptq.models.toy import toy_policy_from_spec

    root = tmp_path / "data"
    argv = ["data", "generate", "--suite", "fake", "--root", str(root), "--tasks", "carry-ball"]
    assert main([*argv, "--train", "3", "--calib", "4", "--val", "0", "--episodes-per-shard", "2"]) == 0
    assert "carry-ball" in capsys.readouterr().out
    ds = open_dataset(root)
    info = ds.info
    assert info["suite"] == "fake" and info["suite_version"] == 3 and info["tasks"] == ["carry-ball"]
    assert info["state_names"] == ["gripper_opening", "ee_x", "ee_y", "ee_z"] and info["action_dim"] == 4
    assert info["config"]["noise_std"] == 0.1 and info["config"]["suite"] == "fake"  # the suite's defaults
    assert info["image_size"] == 16 and info["camera"] == "top"
    calib = list(ds.episodes("calib"))
    assert len(calib) == 4 and all(ep.success for ep in calib)  # failed episodes are not kept
    assert all(100_000 <= ep.seed < 200_000 for ep in calib)
    for ep in calib:
        assert ep.images.shape[1:] == (16, 16, 3) and ep.states.shape[1] == 4
        assert not np.array_equal(ep.actions, ep.executed_actions)  # DART noise executed, clean labels
        assert np.all(np.abs(ep.actions[:, 3]) == 1.0)  # the expert's own (clean) gripper commands
        np.testing.assert_array_equal(ep.ee_pos[:, :3], ep.states[:, 1:])  # ee from info, not state[:3]
    assert (root / "meta" / "stats.json").is_file()

    calibration = sample_calibration(root, 4, chunk_size=2, frames_per_trajectory=2)
    assert calibration.provenance["action_space"]["names"] == ["dx", "dy", "dz", "grip"]
    policy = toy_policy_from_spec("toy:chunk=2")
    calibration.check(policy.action_space)
    assert calibration.num_samples == 8

    # The cached calibration split of a suite, generated through the registry on first use.
    cached = calibration_for_policy(
        policy, n_trajectories=2, tasks=["reach-ball"], cache_dir=tmp_path / "cache", suite="fake"
    )
    assert cached.provenance["tasks"] == ["reach-ball"]
    made = list((tmp_path / "cache").iterdir())
    assert [p.name for p in made] == ["calib-fake-v3-top-16px"]


def test_generation_refuses_the_eval_split_and_unknown_tasks(fake, tmp_path):
    from daptq.data.generate import generate_dataset

    with pytest.raises(ValueError, match="reserved split 'eval'"):
        generate_dataset(tmp_path / "d", None, {"eval": 1}, suite="fake")
    with pytest.raises(ValueError, match="unknown task 'reach' of suite fake"):
        generate_dataset(tmp_path / "d", ["reach"], {"train": 1}, suite="fake")
    with pytest.raises(ValueError, match="workers=1"):
        generate_dataset(tmp_path / "d", None, {"train": 1}, suite="fake", workers=2)
    assert not (tmp_path / "d").exists()


def test_suite_lookup_is_lazy_and_the_fake_suite_is_not_registered_by_import():
    import importlib

    importlib.reload(fake_suite)
    with pytest.raises(ValueError, match="unknown suite 'fake'"):
        get_suite("fake")


def test_calibration_picks_the_suite_acting_in_the_policys_kinds_of_dimensions(fake):
    from types import SimpleNamespace

    from daptq.data.calibration import _suite_for
    from daptq.envs.actions import ActionSpace

    libero_like = ActionSpace(
        ("x", "y", "z", "roll", "pitch", "yaw", "gripper"),
        ("translation",) * 3 + ("rotation",) * 3 + ("gripper",),
    )
    assert _suite_for(SimpleNamespace(action_space=libero_like), None).name == "libero"
    four = get_suite("metaworld").action_space  # the fake suite acts in the same kinds: ambiguous -> default
    assert _suite_for(SimpleNamespace(action_space=four), None).name == "metaworld"
    assert _suite_for(SimpleNamespace(action_space=four), "fake").name == "fake"
    assert _suite_for(object(), None).name == "metaworld"


def test_reports_and_gifs_of_a_suite_run_name_the_suite_and_refuse_mixing_suites(fake, tmp_path):
    import shutil

    from daptq.eval import render_rollout_gif, write_report

    _eval(tmp_path / "run", tmp_path / "cache", "--envs-per-worker", "1")
    report = write_report(tmp_path / "run").read_text()
    assert "- suite: fake (version 3)" in report
    assert "object drift mean / final (cm) | FP floor object drift (cm) |" in report
    assert "| carry-ball | 2 |" in report
    gif = render_rollout_gif(tmp_path / "run", "reach-ball", 1_000_000)  # re-run on the suite's env
    assert gif.is_file() and gif.stat().st_size > 0
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "run", other)
    config = json.loads((other / "config.json").read_text())
    config["run"]["suite"] = "metaworld"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"different suites \['fake', 'metaworld'\]"):
        write_report([tmp_path / "run", other], out=tmp_path / "both")


def test_object_drift_in_a_record_is_checked_against_its_arrays(fake, tmp_path):
    from daptq.eval import store

    argv = ["eval", "toy:weight_noise=0.5", "--reference", "toy", "--suite", "fake", "--tasks", "carry-ball"]
    argv += ["--episodes", "1", "--workers", "1", "--no-progress", "--no-reference-cache"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    config = store.read_config(tmp_path / "run")
    (record,) = store.read_records(tmp_path / "run")
    assert store.episode_problem(tmp_path / "run", config, record) is None
    edited = {**record, "object_drift_mean": record["object_drift_mean"] + 0.01}
    assert "object_drift_mean" in store.episode_problem(tmp_path / "run", config, edited)
