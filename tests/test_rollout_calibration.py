"""Calibration on the states a quantized policy reaches (daptq.data.rollout_calibration, issue #29):
closed-loop rollouts on calibration seeds only, labelled by the model being quantized, mixed with expert
samples at a fraction, recorded as provenance in the second quantization's record; ``daptq quantize
--calibration-from-policy``; the benchmark's smoke mode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fake_suite
import numpy as np
import pytest

from daptq.cli import main
from daptq.data.calibration import CalibrationSet
from daptq.data.rollout_calibration import check_calibration_seeds, fp_labeler, rollout_calibration
from daptq.envs.suite import register_suite, unregister_suite
from daptq.integrity import sha256_file
from daptq.sources import load_policy


@pytest.fixture
def recording():
    """The fake suite under another name, whose environments record every seed they are reset with."""
    seeds: list[int] = []

    def make_env(task, **options):
        env = fake_suite.FakeArmEnv(task, **options)
        reset = env.reset

        def recorded_reset(*, seed=None):
            seeds.append(int(seed))
            return reset(seed=seed)

        env.reset = recorded_reset
        return env

    suite = register_suite(dataclasses.replace(fake_suite.make_suite("fake-rec"), make_env=make_env))
    yield suite, seeds
    unregister_suite("fake-rec")


def test_rollouts_reset_only_calibration_seeds(recording):
    suite, seeds = recording
    fp, first = load_policy("toy"), load_policy("toy:weight_noise=0.5")
    cal = rollout_calibration(first, fp, suite="fake-rec", episodes_per_task=2, max_steps=6, seed=3)
    assert sorted(set(seeds)) == [100_000, 100_001] and len(seeds) == 4  # 2 seeds x 2 tasks
    for s in seeds:  # never a validation or evaluation episode
        assert suite.splits["calib"].contains(s) and s < suite.splits["val"].start
        assert not suite.is_eval_episode(s)
    prov = cal.provenance
    assert prov["split"] == "calib" and prov["seeds"] == [100_000, 100_001] and prov["suite"] == "fake-rec"
    assert (
        prov["policy"]["digest"] == first.info().digest and prov["rollout_samples"] == cal.num_samples == 16
    )
    assert [(e["task"], e["seed"]) for e in prov["episodes"]] == [
        ("reach-ball", 100_000), ("reach-ball", 100_001), ("carry-ball", 100_000), ("carry-ball", 100_001)
    ]  # fmt: skip
    cal.check(fp.action_space)
    # The check itself refuses validation, evaluation and training seeds.
    for bad in (200_000, 1_000_000, 5):
        with pytest.raises(ValueError, match="not a calibration seed"):
            check_calibration_seeds(suite, [bad])


def test_states_come_from_the_rollout_policy_and_labels_from_the_model_being_quantized(recording):
    fp, first = load_policy("toy"), load_policy("toy:weight_noise=0.5")
    on_first = rollout_calibration(first, fp, suite="fake-rec", tasks=["carry-ball"], episodes_per_task=1,
                                   max_steps=12, frames_per_episode=12)  # fmt: skip
    on_fp = rollout_calibration(fp, fp, suite="fake-rec", tasks=["carry-ball"], episodes_per_task=1,
                                max_steps=12, frames_per_episode=12)  # fmt: skip
    a, b = on_first.batches[0], on_fp.batches[0]
    np.testing.assert_array_equal(a["state"][0], b["state"][0])  # same initial state (same seed)
    assert not np.allclose(a["state"], b["state"])  # then the first model's own trajectory
    labels = fp_labeler(fp, 0)({k: v for k, v in a.items() if k != "actions"})
    np.testing.assert_allclose(a["actions"], labels)  # the FP model's chunks at those states
    assert a["actions"].shape == (12, fp.config.chunk, 4)


def test_mix_draws_that_share_from_the_expert_set(recording):
    fp, first = load_policy("toy"), load_policy("toy:weight_noise=0.5")
    rows = 20
    expert = CalibrationSet(
        [{"state": np.full((rows, 4), 7.0, np.float32), "instruction": ["expert"] * rows,
          "actions": np.zeros((rows, fp.config.chunk, 4), np.float32)}],
        {"split": "calib", "dataset": "experts"},
    )  # fmt: skip
    cal = rollout_calibration(first, fp, suite="fake-rec", tasks=["reach-ball"], episodes_per_task=2,
                              max_steps=5, expert=expert, mix=0.5)  # fmt: skip
    instructions = [s for b in cal.batches for s in b["instruction"]]
    assert instructions.count("expert") == 8 and len(instructions) == 16
    assert cal.provenance["expert_samples"] == 8 and cal.provenance["expert"]["dataset"] == "experts"
    with pytest.raises(ValueError, match="expert calibration set has 20"):
        rollout_calibration(first, fp, suite="fake-rec", tasks=["reach-ball"], episodes_per_task=2,
                            max_steps=5, expert=expert, mix=0.9)  # fmt: skip
    with pytest.raises(ValueError, match="needs an expert"):
        rollout_calibration(first, fp, suite="fake-rec", episodes_per_task=1, max_steps=2, mix=0.5)


def _quantize(out, *extra):
    argv = ["quantize", "toy", "--method", "gptq", "--w-bits", "3", "--group-size", "8", "--out", str(out)]
    return main([*argv, *extra])


def test_cli_records_the_rollout_provenance_and_refuses_a_bad_directory(tmp_path, capsys):
    first = tmp_path / "first"
    assert (
        main(
            ["quantize", "toy", "--method", "rtn", "--w-bits", "3", "--group-size", "8", "--out", str(first)]
        )
        == 0
    )
    second = tmp_path / "second"
    rollout = ["--calibration-from-policy", str(first), "--calib-tasks", "reach", "--rollout-episodes", "2"]
    assert _quantize(second, *rollout, "--rollout-max-steps", "6") == 0
    qconfig = json.loads((second / "quantization_config.json").read_text())
    prov = qconfig["record"]["calibration"]
    assert prov["source"] == "rollouts" and prov["split"] == "calib" and prov["suite"] == "metaworld"
    assert prov["policy"]["spec"] == str(first)
    assert prov["policy"]["record_sha256"] == sha256_file(first / "quantization_config.json")
    assert prov["policy"]["digest"] == load_policy(str(first)).info().digest
    assert prov["seeds"] == [100_000, 100_001] and prov["max_steps"] == {"reach": 6}
    capsys.readouterr()

    for bad, why in ((tmp_path / "missing", "no such directory"), (tmp_path / "empty", "empty directory")):
        if why == "empty directory":
            bad.mkdir()
        assert _quantize(tmp_path / "out", "--calibration-from-policy", str(bad)) == 2
        err = capsys.readouterr().err
        assert "--calibration-from-policy" in err and why in err
        assert not (tmp_path / "out").exists()
    assert _quantize(first, "--calibration-from-policy", str(first)) == 2  # never over the rolled-out policy
    assert "refusing to replace" in capsys.readouterr().err
    assert _quantize(tmp_path / "out", "--rollout-mix", "0.5") == 2
    assert "applies to --calibration-from-policy" in capsys.readouterr().err
    argv = ["quantize", "toy", "--method", "rtn", "--w-bits", "4", "--out", str(tmp_path / "rtn")]
    assert main([*argv, "--calibration-from-policy", str(first)]) == 2
    assert "takes no calibration" in capsys.readouterr().err


def test_benchmark_smoke_mode_compares_the_two_models(tmp_path):
    from benchmark_helpers import load_benchmark

    module = load_benchmark("requantize_on_rollouts")
    assert (
        module.main(["--toy", "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 0
    )
    result = json.loads((tmp_path / "results" / "requantize_on_rollouts_toy.json").read_text())
    assert result["episodes"] == 2 and set(result) >= {
        "first",
        "second",
        "drift_diff_cm",
        "mcnemar_second_vs_first",
    }
    second = Path(result["directories"]["second"])
    prov = json.loads((second / "quantization_config.json").read_text())["record"]["calibration"]
    assert prov["policy"]["spec"] == result["directories"]["first"] and prov["split"] == "calib"
    assert (tmp_path / "results" / "requantize_on_rollouts_toy.md").read_text().count("| first |") == 1
