"""Metric functions of daptq.eval against hand computations."""

import math

import numpy as np
import pytest

from daptq.eval import metrics
from daptq.eval.summary import format_summary, summarize


def test_wilson_interval_matches_known_value():
    # 8/10 at 95%: the textbook Wilson interval is [0.4902, 0.9433] (Wald would give [0.552, 1.048]).
    lo, hi = metrics.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4)
    assert hi == pytest.approx(0.94332, abs=1e-4)


def test_wilson_interval_edges_and_bad_input():
    lo, hi = metrics.wilson_interval(0, 20)
    assert lo == 0.0 and 0.0 < hi < 0.2  # never degenerate at 0 successes
    lo, hi = metrics.wilson_interval(20, 20)
    assert hi == pytest.approx(1.0) and 0.8 < lo < 1.0
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        metrics.wilson_interval(5, 3)


def test_mcnemar_exact_on_discordant_pairs():
    # 1 pair where only the candidate succeeds, 9 where only the reference does, 5 concordant:
    # p = 2 * P(X <= 1 | n=10, 1/2) = 2 * 11 / 1024.
    cand = [True] * 1 + [False] * 9 + [True] * 3 + [False] * 2
    ref = [False] * 1 + [True] * 9 + [True] * 3 + [False] * 2
    res = metrics.mcnemar_exact(cand, ref)
    assert res["only_candidate"] == 1 and res["only_reference"] == 9
    assert res["p_value"] == pytest.approx(22 / 1024)
    assert metrics.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        metrics.mcnemar_exact([True], [True, False])


def test_paired_bootstrap_difference():
    mean, lo, hi = metrics.paired_bootstrap_diff([1, 1, 0, 1], [1, 1, 0, 1])
    assert (mean, lo, hi) == (0.0, 0.0, 0.0)
    mean, lo, hi = metrics.paired_bootstrap_diff([1, 1, 1, 0], [0, 0, 1, 0])
    assert mean == pytest.approx(0.5) and 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_deviation_holds_last_pose_of_shorter_episode():
    a = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], float)  # ended (success) after 2 steps
    b = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 3, 0]], float)
    dev = metrics.deviation_curve(a, b)
    np.testing.assert_allclose(dev, [0, 0, 1, math.sqrt(2), math.sqrt(10)])
    m = metrics.drift_metrics(a, b, threshold=1.0)
    assert m["drift_mean"] == pytest.approx(dev.mean())
    assert m["drift_max"] == pytest.approx(math.sqrt(10)) and m["drift_final"] == pytest.approx(math.sqrt(10))
    # Trapezoid, one unit per step: (0+0)/2 + (0+1)/2 + (1+r2)/2 + (r2+r10)/2.
    assert m["drift_auc"] == pytest.approx(0.5 + (1 + math.sqrt(2)) / 2 + (math.sqrt(2) + math.sqrt(10)) / 2)
    assert m["time_to_divergence"] == 3  # strictly above 1.0: step 2 is exactly 1.0


def test_time_to_divergence():
    assert metrics.time_to_divergence(np.array([0.0, 0.01, 0.02, 0.03]), 0.02) == 3
    assert metrics.time_to_divergence(np.array([0.0, 0.01, 0.015]), 0.02) is None
    with pytest.raises(ValueError, match="positive"):
        metrics.time_to_divergence(np.zeros(3), 0.0)


def test_gripper_toggles_and_disagreements():
    grip = np.array([-1.0, 0.5, 0.9, -0.2, -1.0, 1.0])
    assert metrics.gripper_toggles(grip) == 3
    assert metrics.gripper_toggles(np.ones(5)) == 0
    ref = np.array([-1.0, -0.5, 0.9, 0.3, -1.0, 1.0])
    assert metrics.gripper_disagreements(grip, ref) == 2


def test_high_frequency_share_on_pure_sines():
    t = np.arange(200)
    slow = np.sin(2 * np.pi * 0.05 * t)  # 10 periods: all power in bin 10 (0.05 cycles/step)
    fast = np.sin(2 * np.pi * 0.3 * t)  # bin 60 (0.3 cycles/step)
    assert metrics.high_frequency_share(slow, cutoff=0.25) == pytest.approx(0.0, abs=1e-12)
    assert metrics.high_frequency_share(fast, cutoff=0.25) == pytest.approx(1.0)
    # Power is amplitude^2 / 2 per sine: 0.5^2 / (1 + 0.5^2) = 0.2 of it is fast.
    mixed = np.stack([slow + 0.5 * fast, np.full(200, 3.0)], axis=1)
    share = metrics.high_frequency_share(mixed, cutoff=0.25)
    np.testing.assert_allclose(share, [0.2, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="cutoff"):
        metrics.high_frequency_share(slow, cutoff=0.7)


def test_jerk_and_action_error():
    t = np.arange(8, dtype=float)
    path = np.stack([t**3, np.zeros(8), np.zeros(8)], axis=1)  # third difference of t^3 is 6
    assert metrics.mean_jerk(path) == pytest.approx(6.0)
    err = metrics.action_error(np.array([[1.0, 0.0], [3.0, 0.0]]), np.zeros((2, 2)))
    assert err["mae"] == [2.0, 0.0]
    assert err["rmse"] == pytest.approx([math.sqrt(5), 0.0])


def test_summary_aggregates_paired_records():
    def rec(task, succ, ref_succ, drift, ttd):
        return {
            "task": task,
            "seed": 0,
            "success": succ,
            "steps": 10,
            "jerk": 0.0,
            "hf_share": [0.1, 0.2],
            "grip_toggles": 1,
            "ref_success": ref_succ,
            "ref_steps": 10,
            "ref_jerk": 0.0,
            "ref_hf_share": [0.1, 0.1],
            "ref_grip_toggles": 0,
            "drift_mean": drift,
            "drift_max": drift,
            "drift_final": drift,
            "drift_auc": drift,
            "time_to_divergence": ttd,
            "action_mae": [0.1, 0.3],
            "action_rmse": [0.1, 0.3],
            "grip_disagreements": 2,
        }

    records = [
        rec("a", True, True, 0.01, None),
        rec("a", False, True, 0.05, 4),
        rec("b", True, False, 0.03, 8),
    ]
    s = summarize(records, paired=True, tasks=["a", "b", "c"])
    assert s["overall"]["success_rate"] == pytest.approx(2 / 3)
    assert s["overall"]["ref_success_rate"] == pytest.approx(2 / 3)
    assert s["overall"]["drift_mean"] == pytest.approx(0.03)
    assert s["overall"]["diverged_fraction"] == pytest.approx(2 / 3)
    assert s["overall"]["time_to_divergence_median"] == 6.0
    assert s["overall"]["grip_disagreement_rate"] == pytest.approx(6 / 30)
    assert s["per_task"]["a"]["mcnemar"]["only_reference"] == 1
    assert s["per_task"]["c"] == {"episodes": 0}
    text = format_summary(s)
    assert text.splitlines()[2].split()[:3] == ["a", "2", "50.0"]
    assert text.splitlines()[-1].startswith("overall") and "c " in text
