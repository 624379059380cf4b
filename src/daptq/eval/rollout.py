"""One closed-loop episode, and one paired episode (candidate vs full-precision reference).

Pairing: both rollouts start from ``env.reset(seed=seed)`` (identical initial state) and
``policy.reset(seed=seed)`` (identical sampling noise), so every difference between the two trajectories is
caused by the candidate's weights. A *shadow* reference, reset with the same seed, sees the candidate's
observations during the candidate rollout: its actions are the reference's answer at the same observation, the
basis of the action-error metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from daptq.eval import metrics
from daptq.models.adapter import Policy


@dataclass
class Rollout:
    """What one episode leaves: outcome, the end-effector path (T + 1, 3) and the executed actions (T, D)."""

    success: bool
    ee: np.ndarray
    actions: np.ndarray
    shadow_actions: np.ndarray | None = None
    frames: list[np.ndarray] | None = None

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])


def _checked_action(action: Any, dim: int, who: str, step: int) -> np.ndarray:
    a = np.asarray(action, dtype=np.float32)
    if a.shape != (dim,):
        raise ValueError(f"{who} returned an action of shape {a.shape} at step {step}, expected ({dim},)")
    if not np.all(np.isfinite(a)):
        raise FloatingPointError(f"{who} returned a non-finite action {a.tolist()} at step {step}")
    return a


def run_episode(
    env: Any,
    policy: Policy,
    seed: int,
    shadow: Policy | None = None,
    record_frames: bool = False,
    policy_seed: int | None = None,
) -> Rollout:
    """Roll ``policy`` out until success (terminated) or the step limit (truncated).

    The environment is reset with ``seed``, the policy's (and shadow's) sampling noise with ``policy_seed``
    (default: ``seed``, which is what pairing needs; another value samples the same episode differently).
    """
    obs, _ = env.reset(seed=seed)
    policy_seed = seed if policy_seed is None else policy_seed
    policy.reset(seed=policy_seed)
    if shadow is not None:
        shadow.reset(seed=policy_seed)
    dim = policy.action_space.dim
    ee, actions, shadow_actions = [np.asarray(obs["state"][:3], np.float32)], [], []
    frames = [obs["image"]] if record_frames else None
    success = False
    done = False
    while not done:
        step = len(actions)
        action = _checked_action(policy.select_action(obs), dim, "policy", step)
        if shadow is not None:
            shadow_actions.append(_checked_action(shadow.select_action(obs), dim, "shadow reference", step))
        obs, _, terminated, truncated, info = env.step(action)
        actions.append(action)
        ee.append(np.asarray(obs["state"][:3], np.float32))
        if frames is not None:
            frames.append(obs["image"])
        success = success or bool(info["success"])
        done = bool(terminated or truncated)
    return Rollout(
        success=success,
        ee=np.stack(ee),
        actions=np.stack(actions) if actions else np.zeros((0, dim), np.float32),
        shadow_actions=np.stack(shadow_actions) if shadow is not None and shadow_actions else None,
        frames=frames,
    )


def _behaviour(rollout: Rollout, hf_cutoff: float) -> dict[str, Any]:
    grip = rollout.actions[:, -1] if rollout.steps else np.zeros(0)
    return {
        "jerk": metrics.mean_jerk(rollout.ee),
        "hf_share": np.atleast_1d(metrics.high_frequency_share(rollout.actions, hf_cutoff)).tolist(),
        "grip_toggles": metrics.gripper_toggles(grip),
    }


def episode_record(
    task: str,
    seed: int,
    candidate: Rollout,
    reference: Rollout | None,
    divergence_threshold: float,
    hf_cutoff: float,
    floor: Rollout | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON record (scalar metrics) and the per-step arrays of one (paired) episode.

    ``floor`` is the reference re-sampled with another noise seed: its drift from the reference (``floor_*``)
    is how far the policy's own sampling noise alone moves a trajectory, the floor for the candidate's drift.
    """
    record: dict[str, Any] = {
        "task": task,
        "seed": int(seed),
        "success": candidate.success,
        "steps": candidate.steps,
    }
    record.update(_behaviour(candidate, hf_cutoff))
    arrays = {"ee": candidate.ee, "actions": candidate.actions}
    if reference is not None:
        ref = _behaviour(reference, hf_cutoff)
        record.update({"ref_success": reference.success, "ref_steps": reference.steps})
        record.update({f"ref_{k}": v for k, v in ref.items()})
        record.update(metrics.drift_metrics(candidate.ee, reference.ee, divergence_threshold))
        shadow = candidate.shadow_actions
        if shadow is None or shadow.shape != candidate.actions.shape:
            raise RuntimeError(
                f"{task} seed {seed}: the shadow reference did not act at every candidate step"
            )
        record.update({f"action_{k}": v for k, v in metrics.action_error(candidate.actions, shadow).items()})
        record["grip_disagreements"] = metrics.gripper_disagreements(candidate.actions[:, -1], shadow[:, -1])
        arrays.update({"ref_ee": reference.ee, "ref_actions": reference.actions, "shadow_actions": shadow})
        if floor is not None:
            fl = metrics.drift_metrics(floor.ee, reference.ee, divergence_threshold)
            record.update({f"floor_{k}": v for k, v in fl.items()})
            record["floor_success"] = floor.success
            arrays["floor_ee"] = floor.ee
    return record, arrays
