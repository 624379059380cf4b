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

``jacobian`` (:class:`DriftConfig`) picks the prior; which dimension is translation, rotation or gripper
always comes from the action space the suite / adapter declares (``ActionSpace.kinds``), not from the
method:

- ``"chain"`` (default): the paper's virtual planar chain above, Eqs. 12-17 as written.
- ``"fingertip"``: the real rigid-body Jacobian of delta end-effector control (robosuite's OSC_POSE, as in
  LIBERO). A translation action moves the controlled point by ``translation_scale`` metres per action unit
  along its axis; a rotation action turns the gripper by ``rotation_scale`` radians per unit about its axis
  (axis-angle, world frame) around the controlled point, so a point at lever arm ``r`` from it moves by
  ``rotation_scale * (e_k x r)``. The i-th translation (rotation) dimension in declared order is the x, y, z
  axis. The points are ``lever_arms`` (metres, world frame at the nominal pose): by default the Panda's two
  fingertip pads relative to robosuite's grip site (the OSC's controlled point, the TCP), measured from
  robosuite's ``PandaGripper`` with the fingers open (+-4.35 cm along the closing axis, 0.36 cm back towards
  the hand), at the home orientation (pointing down, closing along world y); a grasped object's centre can be
  added as a further point. The score of dimension j is the mean over the points of ``||J[:, j]||``: the
  fingertip displacement per unit action error (``de = J eps``, the paper's drift model); the gripper is not
  part of the arm's Jacobian and gets ``gripper_weight`` times the mean of the other scores; joint-space
  dimensions are refused (they need the robot's kinematics). For Meta-World (translation only) every
  translation scores the same. Independent of the calibration actions (first order in a small action).
- ``"fixed"``: the paper's weights as fixed per-kind scores, ``translation_weight`` (1.8) for translations and
  ``rotation_weight`` (0.15) for rotations, the gripper as in ``"fingertip"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from daptq.models.adapter import ActionSpace

GripperMode = Literal["chain", "separate"]
JacobianMode = Literal["chain", "fingertip", "fixed"]

# The Panda's fingertip pads relative to robosuite's grip site (OSC_POSE's controlled point), fingers open,
# in the world frame at robosuite's home orientation (gripper pointing down, fingers closing along world y):
# robosuite 1.4 PandaGripper, finger{1,2}_pad_collision at -+0.0435 along the closing axis, 0.0036 towards the
# hand.
PANDA_FINGERTIPS: tuple[tuple[float, float, float], ...] = ((0.0, 0.0435, 0.0036), (0.0, -0.0435, 0.0036))
# robosuite's OSC_POSE defaults (LIBERO): an action of 1 moves 5 cm and turns 0.5 rad per control step.
OSC_TRANSLATION_SCALE = 0.05
OSC_ROTATION_SCALE = 0.5


@dataclass(frozen=True)
class DriftConfig:
    """The drift prior's constants; defaults are the paper's reported values."""

    damping: float = 3e-4  # lambda of the damped pseudo-inverse (Eq. 14)
    translation_weight: float = 1.8  # w_x = w_y (Eq. 15)
    rotation_weight: float = 0.15  # w_theta (Eq. 15)
    gripper: GripperMode = "chain"
    gripper_weight: float = 1.0  # only for gripper="separate": score relative to the chain's mean
    action_scale: float = 1.0  # action units -> joint increments (rad)
    # "chain": the paper's virtual chain; "fingertip": the rigid-body Jacobian to lever_arms; "fixed": the
    # paper's translation/rotation weights as per-dimension scores (module docstring).
    jacobian: JacobianMode = "chain"
    translation_scale: float = OSC_TRANSLATION_SCALE  # "fingertip": metres per action unit
    rotation_scale: float = OSC_ROTATION_SCALE  # "fingertip": radians per action unit
    lever_arms: tuple[tuple[float, float, float], ...] = PANDA_FINGERTIPS  # "fingertip": points (m)

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
        if self.jacobian not in ("chain", "fingertip", "fixed"):
            raise ValueError(
                f"DriftConfig: jacobian must be 'chain', 'fingertip' or 'fixed', got {self.jacobian!r}"
            )
        if not (self.translation_scale > 0 and self.rotation_scale > 0):
            raise ValueError("DriftConfig: translation_scale and rotation_scale must be > 0")
        arms = np.asarray(self.lever_arms, dtype=np.float64)
        if arms.ndim != 2 or arms.shape[1] != 3 or len(arms) == 0 or not np.isfinite(arms).all():
            raise ValueError(
                f"DriftConfig: lever_arms must be one or more finite (x, y, z) points, got {arms}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lever_arms"] = [list(p) for p in self.lever_arms]
        return d


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
    if config.jacobian != "chain":
        return _per_kind_scores(space, config)
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


def _axes(space: ActionSpace, kind: str) -> dict[int, int]:
    """Action dimension -> axis (0, 1, 2 = x, y, z) for the dimensions of ``kind``, in declared order."""
    dims = [i for i, k in enumerate(space.kinds) if k == kind]
    if len(dims) > 3:
        raise ValueError(f"drift: {len(dims)} {kind} dimensions in {space.names}; at most 3 (x, y, z)")
    return {d: axis for axis, d in enumerate(dims)}


def fingertip_jacobian(space: ActionSpace, config: DriftConfig = DriftConfig()) -> np.ndarray:
    """The rigid-body Jacobian ``(P, 3, D)``: displacement of each lever-arm point (metres) per unit of each
    action dimension, for delta end-effector control (zero columns for the gripper)."""
    if "joint" in space.kinds:
        raise ValueError(
            f"drift: jacobian='fingertip' needs delta end-effector actions; {space.names} has joint "
            "dimensions (use jacobian='chain' or 'fixed')"
        )
    arms = np.asarray(config.lever_arms, dtype=np.float64)
    jac = np.zeros((len(arms), 3, space.dim))
    eye = np.eye(3)
    for d, axis in _axes(space, "translation").items():
        jac[:, :, d] = config.translation_scale * eye[axis]
    for d, axis in _axes(space, "rotation").items():
        jac[:, :, d] = config.rotation_scale * np.cross(eye[axis], arms)
    return jac


def _per_kind_scores(space: ActionSpace, config: DriftConfig) -> np.ndarray:
    """``jacobian="fingertip"`` or ``"fixed"`` (module docstring): normalized scores, mean 1."""
    moving = [i for i, k in enumerate(space.kinds) if k != "gripper"]
    if not moving:
        raise ValueError(f"drift: no action dimension of {space.names} moves the end effector")
    raw = np.zeros(space.dim)
    if config.jacobian == "fingertip":
        raw[moving] = np.linalg.norm(fingertip_jacobian(space, config), axis=1).mean(axis=0)[moving]
    else:
        if "joint" in space.kinds:
            raise ValueError(
                f"drift: jacobian='fixed' has no weight for the joint dimensions of {space.names}"
            )
        weight = {"translation": config.translation_weight, "rotation": config.rotation_weight}
        raw[moving] = [weight[space.kinds[i]] for i in moving]
    if not raw[moving].mean() > 0:
        raise ValueError(
            f"drift: every dimension of {space.names} scores zero under jacobian={config.jacobian!r}"
        )
    grippers = [i for i, k in enumerate(space.kinds) if k == "gripper"]
    raw[grippers] = config.gripper_weight * raw[moving].mean()
    return raw / raw.mean()
