"""Meta-World's scripted experts (SawyerXxxV3Policy) driven from a ``MetaWorldEnv``.

Two of them aim at the wrong point, and we correct their aim:

- reach: Meta-World's expert moves the *hand* to the goal, but success is the *fingertip centre* (4.5 cm
  lower) within 5 cm of it, so demonstrations reached success 4.9 cm (median) from the goal, at its edge. A
  policy imitating it has well under a centimetre of room for error (least for goals above the start height,
  which the hand approaches from below). We give the expert the goal shifted by the hand-to-fingertip offset.
- pick-place: the expert moves the hand to the goal with the puck hanging 4 cm below it; success is the puck
  within 7 cm, and demonstrations succeeded at 6.8 cm (median). We shift the goal by the hand-to-puck
  offset, so the puck, not the hand, is carried to the goal.

Datasets record this as ``demo_version`` 2 (``daptq.data.format.DEMO_VERSION``); version 1, the uncorrected
experts, made the first bundled checkpoint.
"""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from daptq.envs.metaworld_env import SHARED_SCENE_SUCCESS
from daptq.envs.tasks import check_task

# Tasks whose expert is given a shifted goal; the point brought to the goal instead of the hand is the one
# Meta-World scores (SHARED_SCENE_SUCCESS: fingertip centre for reach, puck for pick-place).
AIM_CORRECTED_TASKS = ("reach", "pick-place")


def aimed_observation(task: str, metaworld_obs: np.ndarray, tcp_center: np.ndarray) -> np.ndarray:
    """Meta-World's state vector with the goal (last 3 entries) shifted so the expert brings the scored point
    to the real goal; other tasks' observations are returned unchanged."""
    if task not in AIM_CORRECTED_TASKS:
        return metaworld_obs
    obs = np.array(metaworld_obs, dtype=np.float64, copy=True)
    scored = tcp_center if SHARED_SCENE_SUCCESS[task][0] == "fingertips" else obs[4:7]  # obs[4:7]: the puck
    obs[-3:] += obs[:3] - np.asarray(scored, dtype=np.float64)  # + (hand - scored point)
    return obs


class ExpertPolicy:
    """The scripted expert for one task; ``act(env)`` reads the simulator state (not the image).

    ``aim_corrected=False`` gives Meta-World's expert as published (what demo version 1 recorded).
    """

    def __init__(self, task: str, aim_corrected: bool = True) -> None:
        self.task = check_task(task)
        self.aim_corrected = aim_corrected
        self._policy = ENV_POLICY_MAP[f"{task}-v3"]()

    def act(self, env) -> np.ndarray:
        if env.task != self.task:
            raise ValueError(f"expert for {self.task!r} was given an environment for {env.task!r}")
        obs = env.metaworld_obs
        if self.aim_corrected:
            obs = aimed_observation(self.task, obs, env.unwrapped_metaworld.tcp_center)
        with warnings.catch_warnings():
            # move() warns whenever its P-controller saturates; the env clips to [-1, 1] anyway.
            warnings.simplefilter("ignore", UserWarning)
            action = self._policy.get_action(obs)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)


_EXPERTS: dict[str, ExpertPolicy] = {}


def expert_action(env) -> np.ndarray:
    """The scripted expert's action (float32, (4,), clipped to [-1, 1]) for the env's current state."""
    if env.task not in _EXPERTS:
        _EXPERTS[env.task] = ExpertPolicy(env.task)
    return _EXPERTS[env.task].act(env)
