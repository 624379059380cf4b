"""Scripted experts for the LIBERO pick-and-place tasks, from the simulator's object poses.

LIBERO ships no scripted experts (its demonstrations are teleoperated). Every LIBERO-Spatial and -Object task
is "put object A on / in B", read here from the task's BDDL goal (``("on", A, B)`` or ``("in", A, region)``).
The expert is a state machine over the simulator's state, re-evaluated at every step, so that DART noise on
the executed action is corrected rather than compounded (the clean action is the label, as on Meta-World):

approach above the grasp point with the wrist turned so the fingers close across the object's narrow side ->
descend -> close -> lift -> carry above B -> lower -> release -> retreat.

The grasp point is the object's centre for boxes, bottles and cans, and a point on the rim for bowls (wider
than the gripper's 8 cm opening): the fingers then straddle the rim. If the object is not following the
gripper after the lift (a missed grasp), the expert opens and starts again.

Actions are 7-D OSC_POSE deltas in [-1, 1] (robosuite: 1 = 5 cm, 1 = 0.5 rad per step; grip +1 closes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

# Gripper pointing down, fingers closing along world y: the Panda's home orientation in robosuite.
_DOWN = Rotation.from_euler("x", np.pi)
_POS_GAIN = 12.0  # action per metre of error (1 = 5 cm per step; saturates beyond ~8 cm)
_ROT_GAIN = 2.0  # action per radian of error (1 = 0.5 rad per step)
_MAX_OPENING = 0.075  # m: wider objects are grasped by the rim
_ROUND = 0.85  # a footprint whose short/long extent ratio is above this is treated as round (no wrist turn)
_CLOSE_STEPS = 14
_RELEASE_STEPS = 10
_STALL_STEPS = 8


def _subtree_points(env: Any, name: str) -> np.ndarray:
    """World-frame corners of the bounding boxes of ``name``'s collision geoms (N, 3)."""
    model, data = env.sim.model._model, env.sim.data._data
    root = env.robosuite_env.obj_body_id[name]
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    points = []
    for g in range(model.ngeom):
        body = int(model.geom_bodyid[g])
        while body not in (0, root):
            body = int(model.body_parentid[body])
        if body != root or (model.geom_contype[g] == 0 and model.geom_conaffinity[g] == 0):
            continue
        centre, half = model.geom_aabb[g][:3], model.geom_aabb[g][3:]
        local = centre + corners * half
        points.append(data.geom_xpos[g] + local @ data.geom_xmat[g].reshape(3, 3).T)
    if not points:
        raise ValueError(f"LIBERO object {name!r} has no collision geoms")
    return np.concatenate(points)


def _footprint(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Unit short horizontal axis of a point cloud, its extent along it and along the long axis."""
    xy = points[:, :2] - points[:, :2].mean(0)
    _, vecs = np.linalg.eigh(xy.T @ xy)
    short = vecs[:, 0]
    extent = lambda axis: float(np.ptp(xy @ axis))  # noqa: E731
    return short, extent(short), extent(vecs[:, 1])


def _open_side(env: Any, centre: np.ndarray, radius: float, grasp_z: float) -> np.ndarray:
    """Of the rim's four sides (+y, -y, +x, -x: the fingers close along world y or x), the one where the outer
    finger has the most room below the grasp height, from a vertical ray just outside the rim (a bowl in a
    drawer has walls on some sides)."""
    import mujoco

    model, data = env.sim.model._model, env.sim.data._data
    best, best_room = None, -np.inf
    geom = np.zeros(1, dtype=np.int32)
    for side in ((0.0, 1.0), (0.0, -1.0), (1.0, 0.0), (-1.0, 0.0)):
        direction = np.array(side)
        across = np.array([-direction[1], direction[0]])
        highest = -np.inf  # the highest obstacle under the outer finger (open: 4 cm out from the grasp point)
        for out in (0.0, 0.015, 0.03):
            for lateral in (-0.012, 0.0, 0.012):
                xy = centre[:2] + direction * (radius + out) + across * lateral
                start = np.array([*xy, grasp_z + 0.15])
                distance = mujoco.mj_ray(model, data, start, np.array([0.0, 0.0, -1.0]), None, 1, -1, geom)
                if distance >= 0:
                    highest = max(highest, start[2] - distance)
        room = grasp_z - highest
        if room > best_room + 0.005:  # prefer the earlier (no wrist turn) side on a near tie
            best, best_room = direction, room
    return best


def _wrap(angle: float) -> float:
    """An angle taken modulo pi into (-pi/2, pi/2]: a parallel gripper is symmetric under a half turn."""
    return float((angle + np.pi / 2) % np.pi - np.pi / 2)


class LiberoExpert:
    """The expert for one LIBERO task; ``act(env)`` returns the clean action for the env's current state."""

    def __init__(self, task: str) -> None:
        from daptq.envs.libero_suite import LIBERO

        self.task = LIBERO.check_task(task)
        self._episode: tuple[int, int] | None = None  # (id(env), reset count) the plan was made for
        self.phase = "approach"

    # -- planning (once per episode, from the reset state) ---------------------------------------------------
    def _plan(self, env: Any) -> None:
        predicate, obj, target = env.goal_predicates[0]
        self.obj, self.predicate = obj, predicate
        points = _subtree_points(env, obj)
        lo, hi = points.min(0), points.max(0)
        centre = env.body_pose(obj)[:3]
        short, width, length = _footprint(points)
        self.height = float(hi[2] - lo[2])
        self.rim_grasp = width > _MAX_OPENING
        if self.rim_grasp:  # a bowl: the fingers straddle the rim on its most open side
            radius = 0.5 * width
            self.grasp_z = float(hi[2] - 0.02)
            side = _open_side(env, centre, radius, self.grasp_z)
            self.yaw = 0.0 if side[1] else -np.pi / 2  # close along the radius: world y at yaw 0, x at -pi/2
            self.grasp_offset = np.array([*(side * (radius - 0.012)), 0.0])
        else:
            round_ = width / max(length, 1e-6) > _ROUND
            # closing axis (sin yaw, -cos yaw) along the short axis
            self.yaw = 0.0 if round_ else _wrap(float(np.arctan2(short[0], -short[1])))
            self.grasp_offset = np.zeros(3)
            self.grasp_z = float(max(hi[2] - min(0.03, 0.5 * self.height), lo[2] + 0.012))
        self.grasp_xy = (centre + self.grasp_offset)[:2]
        # the grasp point's height above the object's bottom: where the object hangs once lifted
        self.hang = self.grasp_z - float(lo[2])
        if predicate == "in":  # a region site (the basket's inside): drop from just above its rim
            base = target.removesuffix("_contain_region")
            container = _subtree_points(env, base) if base in env.robosuite_env.obj_body_id else None
            self.place_xy = env.site_pos(target)[:2]
            rim = float(container[:, 2].max()) if container is not None else env.site_pos(target)[2] + 0.08
            self.place_bottom = rim + 0.02
        else:  # on an object: set down on its top
            top = _subtree_points(env, target)
            self.place_xy = env.body_pose(target)[:2]
            self.place_bottom = float(top[:, 2].max()) + 0.01
        self.target = target
        # carry high enough to clear everything on the table between here and there
        table_top = float(lo[2])
        self.carry_z = max(self.place_bottom + 0.08, table_top + 0.2) + self.hang
        self.phase, self.counter, self.retries = "approach", 0, 0
        self._best, self.stalled, self._phase_seen = np.inf, 0, None

    # -- control ---------------------------------------------------------------------------------------------
    def _move(self, env: Any, goal: np.ndarray, grip: float, yaw: float | None = None) -> np.ndarray:
        raw = env.raw_observation
        pos = np.asarray(raw["robot0_eef_pos"], dtype=np.float64)
        action = np.zeros(7)
        action[:3] = np.clip((goal - pos) * _POS_GAIN, -1.0, 1.0)
        current = Rotation.from_quat(np.asarray(raw["robot0_eef_quat"], dtype=np.float64))  # xyzw
        wanted = Rotation.from_euler("z", self.yaw if yaw is None else yaw) * _DOWN
        error = (wanted * current.inv()).as_rotvec()  # world frame, as OSC_POSE applies it
        action[3:6] = np.clip(error * _ROT_GAIN, -1.0, 1.0)
        action[6] = grip
        return action

    def _reached(self, error: float, tolerance: float) -> bool:
        """Within ``tolerance``, or as close as the controller gets: no progress (1 mm) for ``_STALL_STEPS``
        steps within 3 cm (a heavy object or a contact leaves a P-controller short of its goal; measured on
        progress, not motion, because DART noise keeps the hand moving)."""
        if self._phase_seen != self.phase:
            self._phase_seen, self._best, self.stalled = self.phase, np.inf, 0
        if error < self._best - 0.001:
            self._best, self.stalled = error, 0
        else:
            self.stalled += 1
        return error < tolerance or (self.stalled >= _STALL_STEPS and error < 0.03)

    def _error(self, env: Any, goal: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(env.raw_observation["robot0_eef_pos"]) - goal))

    def act(self, env: Any) -> np.ndarray:
        if env.task != self.task:
            raise ValueError(f"LIBERO expert for {self.task!r} was given an environment for {env.task!r}")
        key = (id(env), env.reset_count)
        if self._episode != key:
            self._plan(env)
            self._episode = key
        return np.clip(self._step(env), -1.0, 1.0).astype(np.float32)

    def _step(self, env: Any) -> np.ndarray:
        obj = env.body_pose(self.obj)[:3]
        eef = np.asarray(env.raw_observation["robot0_eef_pos"], dtype=np.float64)
        grasp = np.array([*self.grasp_xy, self.grasp_z])
        above = grasp + np.array([0.0, 0.0, 0.10])
        phase = self.phase
        if phase == "approach":
            if self._reached(self._error(env, above), 0.015):
                self.phase = "descend"
            return self._move(env, above, -1.0)
        if phase == "descend":
            if self._reached(self._error(env, grasp), 0.008):
                self.phase, self.counter = "close", 0
            return self._move(env, grasp, -1.0)
        if phase == "close":
            self.counter += 1
            if self.counter >= _CLOSE_STEPS:
                self.phase = "lift"
                self.carried = eef - obj  # where the object hangs below the hand
            return self._move(env, grasp, 1.0)
        place = np.array([*self.place_xy, self.place_bottom + self.hang])
        place[:2] += self.carried[:2]  # the hand's offset from the object's origin, as held
        if phase in ("lift", "carry", "lower"):
            if np.linalg.norm((eef - obj) - self.carried) > 0.03:  # dropped or never held: start again
                self.retries += 1
                self.phase = "reopen"
                self.counter = 0
                return self._move(env, eef + np.array([0, 0, 0.05]), -1.0)
        if phase == "lift":
            lift = np.array([eef[0], eef[1], self.carry_z])
            if eef[2] > self.carry_z - 0.02:
                self.phase = "carry"
            return self._move(env, lift, 1.0)
        if phase == "carry":
            carry = np.array([place[0], place[1], self.carry_z])
            if self._reached(float(np.linalg.norm((eef - carry)[:2])), 0.02):  # lowering corrects the rest
                self.phase = "lower"
            return self._move(env, carry, 1.0)
        if phase == "lower":
            if self._reached(self._error(env, place), 0.01):
                self.phase, self.counter = "release", 0
            return self._move(env, place, 1.0)
        if phase == "release":
            self.counter += 1
            if self.counter >= _RELEASE_STEPS:
                self.phase = "retreat"
            return self._move(env, place, -1.0)
        if phase == "reopen":
            self.counter += 1
            if self.counter >= _RELEASE_STEPS:
                self._replan_grasp(env)
            return self._move(env, eef + np.array([0, 0, 0.05]), -1.0)
        # retreat: straight up, open
        return self._move(env, place + np.array([0.0, 0.0, 0.10]), -1.0)

    def _replan_grasp(self, env: Any) -> None:
        """After a missed grasp: plan the grasp again from where the object now lies."""
        retries = self.retries
        place = (self.place_xy.copy(), self.place_bottom, self.carry_z, self.target)
        self._plan(env)
        self.place_xy, self.place_bottom, self.carry_z, self.target = place
        self.retries = retries


def expert_action(env: Any, _experts: dict[str, LiberoExpert] = {}) -> np.ndarray:  # noqa: B006
    """The task's scripted expert's clean action for the env's current state (one expert per task)."""
    if env.task not in _experts:
        _experts[env.task] = LiberoExpert(env.task)
    return _experts[env.task].act(env)
