"""DA-PTQ's drift weights with real rotation dimensions (LIBERO's 7-D OSC_POSE actions).

The rigid-body ("fingertip") Jacobian is checked against an independent numeric reference: finite differences
of where the fingertips end up after a small action, with the rotation applied as a rotation matrix
(scipy's ``Rotation.from_rotvec``) rather than the cross product the implementation uses.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from daptq.envs.suite import get_suite
from daptq.methods.daptq.config import DAPTQConfig
from daptq.methods.daptq.drift import (
    OSC_ROTATION_SCALE,
    OSC_TRANSLATION_SCALE,
    PANDA_FINGERTIPS,
    DriftConfig,
    drift_scores,
    fingertip_jacobian,
)
from daptq.models.adapter import METAWORLD_ACTION_SPACE, ActionSpace

# The action space as the LIBERO suite declares it (kinds come from the suite, not from the method).
LIBERO_SPACE = ActionSpace.from_dict(get_suite("libero").action_space.to_dict())
BOWL = PANDA_FINGERTIPS + ((0.05, 0.0, -0.02),)  # plus a grasped bowl's centre, 5 cm off the rim grasp


def _fd_displacements(points, eps=1e-6):
    """Fingertip displacement per unit action (finite differences), (P, D) norms, by moving the gripper."""
    points = np.asarray(points, dtype=np.float64)
    out = np.zeros((len(points), 7))
    for j in range(7):
        a = np.zeros(7)
        a[j] = eps
        shift = OSC_TRANSLATION_SCALE * a[:3]
        rot = Rotation.from_rotvec(OSC_ROTATION_SCALE * a[3:6])  # axis-angle about the controlled point
        moved = rot.apply(points) + shift  # the gripper (grip site at the origin) moved by the action
        out[:, j] = np.linalg.norm(moved - points, axis=1) / eps
    return out


@pytest.mark.parametrize("points", [PANDA_FINGERTIPS, BOWL, ((0.01, -0.02, 0.1),)])
def test_fingertip_weights_match_finite_differences(points):
    cfg = DriftConfig(jacobian="fingertip", lever_arms=points)
    fd = _fd_displacements(points)  # gripper column stays 0: it does not move the arm
    raw = fd[:, :6].mean(axis=0)
    want = np.append(raw, raw.mean())  # gripper_weight 1: the mean of the moving dimensions
    want = want / want.mean()
    got = drift_scores(np.zeros((3, 7)), LIBERO_SPACE, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jac = fingertip_jacobian(LIBERO_SPACE, cfg)
    np.testing.assert_allclose(np.linalg.norm(jac, axis=1), fd, rtol=1e-5, atol=1e-9)


def test_fingertip_weights_on_libero_by_hand():
    # Pads at (0, +-0.0435, 0.0036): a roll (about x) swings them by 0.5 * |(0, -0.0036, 0.0435)|, a pitch
    # (about y) only by 0.5 * 0.0036, a yaw (about z) by 0.5 * 0.0435; a translation by 0.05.
    got = drift_scores(np.zeros((1, 7)), LIBERO_SPACE, DriftConfig(jacobian="fingertip"))
    raw = np.array([0.05, 0.05, 0.05, 0.5 * np.hypot(0.0435, 0.0036), 0.5 * 0.0036, 0.5 * 0.0435, 0.0])
    raw[6] = raw[:6].mean()
    np.testing.assert_allclose(got, raw / raw.mean(), rtol=1e-9)
    assert got[4] < 0.1 < got[3] < got[0]  # pitch moves the pads least, translations most


def test_fingertip_scores_do_not_depend_on_the_calibration_actions():
    rng = np.random.default_rng(0)
    cfg = DriftConfig(jacobian="fingertip")
    a = drift_scores(rng.uniform(-1, 1, size=(50, 7)), LIBERO_SPACE, cfg)
    np.testing.assert_allclose(a, drift_scores(np.zeros((1, 7)), LIBERO_SPACE, cfg))


def test_paper_fixed_weights_option():
    got = drift_scores(np.zeros((2, 7)), LIBERO_SPACE, DriftConfig(jacobian="fixed"))
    raw = np.array([1.8, 1.8, 1.8, 0.15, 0.15, 0.15, 0.0])
    raw[6] = raw[:6].mean()
    np.testing.assert_allclose(got, raw / raw.mean(), rtol=1e-12)


def test_kinds_come_from_the_action_space_not_the_order():
    # The same dims declared in another order get their kinds' weights: nothing is keyed on the index.
    space = ActionSpace(("grip", "drz", "dx"), ("gripper", "rotation", "translation"))
    got = drift_scores(np.zeros((1, 3)), space, DriftConfig(jacobian="fixed"))
    raw = np.array([0.0, 0.15, 1.8])
    raw[0] = raw[1:].mean()
    np.testing.assert_allclose(got, raw / raw.mean(), rtol=1e-12)


def test_metaworld_default_is_still_the_paper_chain_and_fingertip_is_uniform():
    actions = np.random.default_rng(1).uniform(-1, 1, size=(20, 4))
    chain = drift_scores(actions, METAWORLD_ACTION_SPACE)
    assert DriftConfig().jacobian == "chain"
    np.testing.assert_allclose(
        chain, drift_scores(actions, METAWORLD_ACTION_SPACE, DriftConfig(jacobian="chain"))
    )
    flat = drift_scores(actions, METAWORLD_ACTION_SPACE, DriftConfig(jacobian="fingertip"))
    np.testing.assert_allclose(flat, np.ones(4))


def test_config_field_reaches_the_drift_config_and_is_recorded():
    cfg = DAPTQConfig(drift_jacobian="fingertip")
    assert cfg.drift_config().jacobian == "fingertip"
    recorded = cfg.drift_config().to_dict()
    assert recorded["jacobian"] == "fingertip"
    assert recorded["lever_arms"] == [list(p) for p in PANDA_FINGERTIPS]
    assert DAPTQConfig().drift_config().jacobian == "chain"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="jacobian"):
        DriftConfig(jacobian="planar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lever_arms"):
        DriftConfig(lever_arms=((0.0, 0.0),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="joint"):
        drift_scores(
            np.zeros((1, 2)), ActionSpace(("q1", "q2"), ("joint", "joint")), DriftConfig(jacobian="fingertip")
        )
    with pytest.raises(ValueError, match="at most 3"):
        drift_scores(
            np.zeros((1, 4)), ActionSpace(tuple("abcd"), ("rotation",) * 4), DriftConfig(jacobian="fingertip")
        )
