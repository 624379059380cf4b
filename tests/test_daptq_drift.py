"""Drift profiling (Eqs. 12-17) against hand computations written with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daptq.methods.daptq.drift import DriftConfig, chain_jacobian, damped_pinv, drift_scores
from daptq.models.adapter import METAWORLD_ACTION_SPACE, ActionSpace

PAPER_SPACE = ActionSpace(
    ("dx", "dy", "dz", "drx", "dry", "drz", "dgrip"),
    ("translation",) * 3 + ("rotation",) * 3 + ("gripper",),
)


def _inv3(m):
    """3x3 inverse by cofactors (independent of numpy.linalg)."""
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    cof = [
        [e * i - f * h, -(d * i - f * g), d * h - e * g],
        [-(b * i - c * h), a * i - c * g, -(a * h - b * g)],
        [b * f - c * e, -(a * f - c * d), a * e - b * d],
    ]
    return [[cof[col][row] / det for col in range(3)] for row in range(3)]  # adjugate / det


def _hand_scores(actions, w=(1.8, 1.8, 0.15), lam=3e-4):
    """The paper's formulas for one chain over all dims, with explicit Python sums."""
    n = len(actions[0])
    total = [0.0] * n
    for q in actions:
        theta = [sum(q[: j + 1]) for j in range(n)]
        jac = [
            [-sum(math.sin(theta[k]) for k in range(j, n)) for j in range(n)],
            [sum(math.cos(theta[k]) for k in range(j, n)) for j in range(n)],
            [1.0] * n,
        ]
        gram = [[sum(jac[r][k] * jac[c][k] for k in range(n)) + (lam if r == c else 0.0) for c in range(3)]
                for r in range(3)]  # fmt: skip
        ginv = _inv3(gram)
        for j in range(n):
            for c in range(3):
                pinv_jc = sum(jac[r][j] * ginv[r][c] for r in range(3))
                total[j] += w[c] * abs(pinv_jc)
    s = [t / len(actions) for t in total]
    mean = sum(s) / n
    return [x / mean for x in s]


def test_paper_7d_matches_hand_computation():
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(25, 7))
    got = drift_scores(actions, PAPER_SPACE)
    want = _hand_scores(actions.tolist())
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert got.mean() == pytest.approx(1.0)


def test_metaworld_4d_matches_hand_computation_and_chunks_are_flattened():
    rng = np.random.default_rng(1)
    chunks = rng.uniform(-1, 1, size=(6, 8, 4))  # (B, K, D) calibration chunks
    got = drift_scores(chunks, METAWORLD_ACTION_SPACE)
    np.testing.assert_allclose(got, _hand_scores(chunks.reshape(-1, 4).tolist()), rtol=1e-9)


def test_zero_action_jacobian_by_hand():
    # theta = 0: J_x = 0, J_y(j) = n - j (0-based), J_theta = 1.
    jac = chain_jacobian(np.zeros((1, 4)))[0]
    np.testing.assert_allclose(jac, [[0, 0, 0, 0], [4, 3, 2, 1], [1, 1, 1, 1]], atol=1e-12)


def test_damped_pinv_tends_to_moore_penrose():
    jac = chain_jacobian(np.random.default_rng(2).uniform(-1, 1, size=(3, 5)))
    np.testing.assert_allclose(damped_pinv(jac, 1e-12), np.linalg.pinv(jac), atol=1e-6)


def test_separate_gripper_gets_its_documented_weight():
    rng = np.random.default_rng(3)
    actions = rng.uniform(-1, 1, size=(10, 4))
    cfg = DriftConfig(gripper="separate", gripper_weight=0.5)
    got = drift_scores(actions, METAWORLD_ACTION_SPACE, cfg)
    chain = np.array(_hand_scores(actions[:, :3].tolist()))  # normalized chain scores (mean 1)
    raw = np.append(chain, 0.5 * chain.mean())
    np.testing.assert_allclose(got, raw / raw.mean(), rtol=1e-9)


def test_row_weights_change_scores():
    actions = np.random.default_rng(4).uniform(-1, 1, size=(10, 4))
    a = drift_scores(actions, METAWORLD_ACTION_SPACE)
    b = drift_scores(actions, METAWORLD_ACTION_SPACE, DriftConfig(rotation_weight=5.0))
    np.testing.assert_allclose(b, _hand_scores(actions.tolist(), w=(1.8, 1.8, 5.0)), rtol=1e-9)
    assert not np.allclose(a, b)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="D=4"):
        drift_scores(np.zeros((3, 7)), METAWORLD_ACTION_SPACE)
    with pytest.raises(ValueError, match="NaN"):
        drift_scores(np.full((3, 4), np.nan), METAWORLD_ACTION_SPACE)
    with pytest.raises(ValueError, match="damping"):
        DriftConfig(damping=0.0)
    with pytest.raises(ValueError, match="no action dimension"):
        drift_scores(np.zeros((3, 1)), ActionSpace(("g",), ("gripper",)), DriftConfig(gripper="separate"))
