"""Drift profiling (paper Eqs. 12-17): how much each action dimension moves the end effector downstream.

The paper reads a 7-D action ``[dx, dy, dz, drx, dry, drz, dgrip]`` as the joint increments ``q`` of a
*virtual planar serial chain* (a prior from the action ordering, not the robot's kinematics):

- Eq. 12: ``theta_j = sum_{i<=j} q_i``
- Eq. 13: ``J_x(j) = -sum_{k>=j} sin(theta_k)``, ``J_y(j) = sum_{k>=j} cos(theta_k)``, ``J_theta(j) = 1``;
  ``J`` is ``3 x n`` (rows: planar x, planar y, planar orientation theta).
- Eq. 14: damped pseudo-inverse ``J+ = J^T (J J^T + lambda I_3)^-1`` (``n x 3``), lambda = 3e-4.
- Eqs. 15-16: ``s_j = E_a[ sum_c w_c |J+_{j,c}| ]`` with row weights ``w_x = w_y`` = translation weight (1.8)
  and ``w_theta`` = rotation weight (0.15).
- Eq. 17: ``s^_j = s_j / mean(s)``.

Generalization to D action dimensions (``ActionSpace``), as implemented here:

- The chain's joints are the action dimensions in their declared order. Translation, rotation and joint
  dimensions are always joints of the chain (in joint-space control every dimension is a real joint).
- The gripper: ``gripper="chain"`` (default, the paper's literal 7-D formula, where ``dgrip`` is the last
  joint) keeps it in the chain. ``gripper="separate"`` leaves it out of the chain and gives it the score
  ``gripper_weight * mean(chain scores)`` before the final normalization (the gripper does not move the
  end effector, but an error in it drops objects; its weight is then an explicit choice).
- The three task-space rows and their weights stay those of the paper for every D: the chain is planar.
- Actions are used in the policy's action units (``[-1, 1]`` for Meta-World) times ``action_scale``
  (default 1: the paper reads the normalized deltas as joint increments, in radians).

For Meta-World (dx, dy, dz, grip) the default is a 4-joint chain, averaged over the calibration actions.
Note what the formula gives: ``J+`` is the minimum-norm joint motion producing a task-space motion, so the
scores are *not* monotone in the dimension index (the paper's "earlier dimensions move more" is about the
columns of ``J``, not ``J+``). For actions uniform in [-1, 1]^4 they are about (0.82, 1.12, 1.18, 0.89); at
a = 0 (a straight chain, singular in x) (1.41, 0.41, 0.59, 1.59).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from daptq.models.adapter import ActionSpace

GripperMode = Literal["chain", "separate"]


@dataclass(frozen=True)
class DriftConfig:
    """The drift prior's constants; defaults are the paper's reported values."""

    damping: float = 3e-4  # lambda of the damped pseudo-inverse (Eq. 14)
    translation_weight: float = 1.8  # w_x = w_y (Eq. 15)
    rotation_weight: float = 0.15  # w_theta (Eq. 15)
    gripper: GripperMode = "chain"
    gripper_weight: float = 1.0  # only for gripper="separate": score relative to the chain's mean
    action_scale: float = 1.0  # action units -> joint increments (rad)

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise ValueError(f"DriftConfig: damping must be > 0, got {self.damping}")
        if self.translation_weight < 0 or self.rotation_weight < 0:
            raise ValueError("DriftConfig: row weights must be >= 0")
        if self.translation_weight + self.rotation_weight == 0:
            raise ValueError("DriftConfig: at least one row weight must be > 0")
        if self.gripper not in ("chain", "separate"):
            raise ValueError(f"DriftConfig: gripper must be 'chain' or 'separate', got {self.gripper!r}")
        if not self.gripper_weight > 0:
            raise ValueError(f"DriftConfig: gripper_weight must be > 0, got {self.gripper_weight}")
        if not self.action_scale > 0:
            raise ValueError(f"DriftConfig: action_scale must be > 0, got {self.action_scale}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chain_jacobian(q: np.ndarray) -> np.ndarray:
    """Eqs. 12-13 for a batch of joint increments ``q`` (N, n) -> Jacobians (N, 3, n), float64."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] == 0:
        raise ValueError(f"chain_jacobian: q must be (N, n) with n >= 1, got shape {q.shape}")
    theta = np.cumsum(q, axis=1)
    # Suffix sums: sum_{k>=j} f(theta_k).
    jx = -np.flip(np.cumsum(np.flip(np.sin(theta), axis=1), axis=1), axis=1)
    jy = np.flip(np.cumsum(np.flip(np.cos(theta), axis=1), axis=1), axis=1)
    return np.stack([jx, jy, np.ones_like(theta)], axis=1)


def damped_pinv(jac: np.ndarray, damping: float) -> np.ndarray:
    """Eq. 14: ``J+ = J^T (J J^T + lambda I)^-1`` for a batch (N, m, n) -> (N, n, m)."""
    m = jac.shape[1]
    gram = jac @ np.swapaxes(jac, 1, 2) + damping * np.eye(m)
    # J^T G^-1 = (G^-1 J)^T since G is symmetric.
    return np.swapaxes(np.linalg.solve(gram, jac), 1, 2)


def chain_dims(space: ActionSpace, config: DriftConfig) -> list[int]:
    """Indices of the action dimensions that are joints of the virtual chain."""
    dims = [i for i, k in enumerate(space.kinds) if config.gripper == "chain" or k != "gripper"]
    if not dims:
        raise ValueError(f"drift: no action dimension of {space.names} is a chain joint")
    return dims


def drift_scores(actions: np.ndarray, space: ActionSpace, config: DriftConfig = DriftConfig()) -> np.ndarray:
    """Eqs. 12-17: normalized per-dimension drift scores ``s^`` (D,), mean 1, from calibration actions.

    ``actions``: (..., D) calibration actions (chunks are flattened into single actions).
    """
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim < 1 or a.shape[-1] != space.dim:
        raise ValueError(f"drift_scores: actions must end in D={space.dim} ({space.names}), got {a.shape}")
    a = a.reshape(-1, space.dim)
    if a.shape[0] == 0:
        raise ValueError("drift_scores: no calibration actions")
    if not np.isfinite(a).all():
        raise ValueError("drift_scores: calibration actions contain NaN or inf")
    dims = chain_dims(space, config)
    pinv = damped_pinv(chain_jacobian(a[:, dims] * config.action_scale), config.damping)
    w = np.array([config.translation_weight, config.translation_weight, config.rotation_weight])
    chain = (np.abs(pinv) * w).sum(axis=2).mean(axis=0)  # Eqs. 15-16, expectation over actions
    raw = np.empty(space.dim)
    raw[dims] = chain
    others = [i for i in range(space.dim) if i not in dims]
    raw[others] = config.gripper_weight * chain.mean()
    if not raw.mean() > 0:
        raise ValueError("drift_scores: all raw scores are zero")
    return raw / raw.mean()  # Eq. 17
