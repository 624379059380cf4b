"""Meta-World's scripted experts (SawyerXxxV3Policy) driven from a ``MetaWorldEnv``."""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP

from daptq.envs.tasks import check_task


class ExpertPolicy:
    """The scripted expert for one task; ``act(env)`` reads the simulator state (not the image)."""

    def __init__(self, task: str) -> None:
        self.task = check_task(task)
        self._policy = ENV_POLICY_MAP[f"{task}-v3"]()

    def act(self, env) -> np.ndarray:
        if env.task != self.task:
            raise ValueError(f"expert for {self.task!r} was given an environment for {env.task!r}")
        with warnings.catch_warnings():
            # move() warns whenever its P-controller saturates; the env clips to [-1, 1] anyway.
            warnings.simplefilter("ignore", UserWarning)
            action = self._policy.get_action(env.metaworld_obs)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)


_EXPERTS: dict[str, ExpertPolicy] = {}


def expert_action(env) -> np.ndarray:
    """The scripted expert's action (float32, (4,), clipped to [-1, 1]) for the env's current state."""
    if env.task not in _EXPERTS:
        _EXPERTS[env.task] = ExpertPolicy(env.task)
    return _EXPERTS[env.task].act(env)
