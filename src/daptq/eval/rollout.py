"""One closed-loop episode, and one paired episode (candidate vs full-precision reference).

Pairing: both rollouts start from ``env.reset(seed=seed)`` (identical initial state) and
``policy.reset(seed=seed)`` (identical sampling noise), so every difference between the two trajectories is
caused by the candidate's weights. A *shadow* reference, reset with the same seed, sees the candidate's
observations during the candidate rollout: its actions are the reference's answer at the same observation, the
basis of the action-error metrics.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daptq.eval import metrics
from daptq.models.adapter import Policy
from daptq.models.batching import SharesVisionFeatures


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


class _ChunkPlayer:
    """One policy's action queues over a batch of episodes: a chunk per episode whose queue is empty, all of
    them from one ``predict_chunks`` call, each episode's noise from its own seeded generator (made when the
    episode starts: a generator's draws depend only on its seed and its own calls)."""

    def __init__(self, policy: Any, slots: int | None) -> None:
        self.policy = policy
        self.slots = slots
        self.generators: list[Any] = []
        self.queues: list[deque[np.ndarray]] = []

    def start(self, policy_seed: int) -> None:
        """Add the next episode (index ``len(queues)``), its noise seeded with ``policy_seed``."""
        import torch

        self.generators.append(torch.Generator().manual_seed(int(policy_seed)))
        self.queues.append(deque())

    def replans(self, episode: int) -> bool:
        """Whether ``episode``'s next action needs a new chunk (a policy call)."""
        return not self.queues[episode]

    def needing(self, active: Sequence[int]) -> list[int]:
        """The episodes of ``active`` whose next action needs a new chunk, in the order of one call's rows."""
        return [i for i in active if not self.queues[i]]

    def actions(
        self, observations: Mapping[int, Any], active: Sequence[int], vision_features: Any = None
    ) -> dict[int, np.ndarray]:
        need = self.needing(active)
        if need:
            extra = {} if vision_features is None else {"vision_features": vision_features}
            chunks = self.policy.predict_chunks(
                [observations[i] for i in need], [self.generators[i] for i in need], slots=self.slots, **extra
            )
            for i, chunk in zip(need, chunks, strict=True):
                self.queues[i].extend(np.asarray(chunk, dtype=np.float32))
        return {i: self.queues[i].popleft() for i in active}


SeedFeed = Callable[[], "tuple[int, int] | None"]  # the next episode's (env seed, policy seed), or None


def run_episodes(
    envs: Sequence[Any],
    policy: Any,
    seeds: Sequence[int] | SeedFeed,
    shadow: Any | None = None,
    policy_seeds: Sequence[int] | None = None,
    slots: int | None = None,
) -> list[Rollout]:
    """``run_episode`` for several episodes stepped in lockstep on ``envs``, the policy (and the shadow)
    called once per step on the batch of episodes that need a new chunk (``predict_chunks``).

    Episode i resets its environment with ``seeds[i]`` and draws its sampling noise from a generator
    seeded with ``policy_seeds[i]`` (default ``seeds[i]``), as ``policy.reset(seed)`` seeds it in the
    one-env rollout, so both rollouts sample the same noise. ``slots`` fixes the batch size of every
    call (padding rows).

    There may be more seeds than environments: the first ``len(envs)`` episodes start together, and an
    environment whose episode ended takes the next seed at the first step where every running episode
    re-plans (or none is left), so the new episode joins a call that runs anyway: refilling adds no policy
    call, and it fills the batch rows an early success would otherwise leave as padding. ``seeds`` may
    also be a feed, a callable giving the next episode's (seed, policy seed) or None when there is none
    (then ``policy_seeds`` must be None): it is called only when an environment is free, so several
    workers can share one stream of seeds and none holds seeds it cannot start. Rollouts are returned in
    the order the seeds came. A candidate and shadow with equal ``vision_key``s (``SharesVisionFeatures``:
    the encoder was not quantized) share one vision encoder pass per call, bitwise what each would compute.
    """
    feed = seeds if callable(seeds) else None
    if feed is not None and policy_seeds is not None:
        raise ValueError("policy_seeds needs a list of seeds, not a feed")
    seeds = [] if feed is not None else [int(s) for s in seeds]
    if not envs or (feed is None and not seeds):
        raise ValueError(
            f"run_episodes needs at least one seed and one environment, got {len(seeds)} and {len(envs)}"
        )
    n_envs = len(envs) if feed is not None else min(len(envs), len(seeds))
    if slots is not None and slots < n_envs:
        raise ValueError(f"slots={slots} < {n_envs} environments stepped together")
    policy_seeds = list(seeds if policy_seeds is None else policy_seeds)
    if len(policy_seeds) != len(seeds):
        raise ValueError(f"{len(policy_seeds)} policy seeds for {len(seeds)} seeds")
    dim = policy.action_space.dim
    players = [_ChunkPlayer(policy, slots)]
    if shadow is not None:
        players.append(_ChunkPlayer(shadow, slots))
    share_vision = (
        shadow is not None
        and isinstance(policy, SharesVisionFeatures)
        and isinstance(shadow, SharesVisionFeatures)
        and policy.vision_key() == shadow.vision_key()
    )
    obs: dict[int, Any] = {}
    env_of: dict[int, Any] = {}
    free = list(reversed(envs[:n_envs]))
    started = 0  # episodes started so far: episode i is the i-th seed
    ee: list[list[np.ndarray]] = []
    actions: list[list[np.ndarray]] = []
    shadow_actions: list[list[np.ndarray]] = []
    success: list[bool] = []

    def next_episode() -> int | None:
        if feed is not None:
            item = feed()
            if item is None:
                return None
            seeds.append(int(item[0]))
            policy_seeds.append(int(item[1]))
        elif started == len(seeds):
            return None
        for player in players:
            player.start(policy_seeds[started])
        for per_episode in (ee, actions, shadow_actions):
            per_episode.append([])
        success.append(False)
        return started

    exhausted = False
    while not exhausted or env_of:
        if free and not exhausted and all(p.replans(i) for p in players for i in env_of):
            while free:
                i = next_episode()
                if i is None:
                    exhausted = True
                    break
                started += 1
                env = env_of[i] = free.pop()
                obs[i] = env.reset(seed=seeds[i])[0]
                ee[i].append(np.asarray(obs[i]["state"][:3], np.float32))
        if not env_of:
            break
        active = sorted(env_of)
        features = None
        if share_vision and (need := players[0].needing(active)) and need == players[1].needing(active):
            features = policy.vision_features([obs[i] for i in need], slots)  # one encoder pass for both
        chosen = players[0].actions(obs, active, features)
        shadowed = players[1].actions(obs, active, features) if shadow is not None else {}
        for i in active:
            step = len(actions[i])
            action = _checked_action(chosen[i], dim, "policy", step)
            if shadow is not None:
                shadow_actions[i].append(_checked_action(shadowed[i], dim, "shadow reference", step))
            obs[i], _, terminated, truncated, info = env_of[i].step(action)
            actions[i].append(action)
            ee[i].append(np.asarray(obs[i]["state"][:3], np.float32))
            success[i] = success[i] or bool(info["success"])
            if terminated or truncated:
                free.append(env_of.pop(i))
                del obs[i]
    return [
        Rollout(
            success=success[i],
            ee=np.stack(ee[i]),
            actions=np.stack(actions[i]),
            shadow_actions=np.stack(shadow_actions[i]) if shadow is not None else None,
        )
        for i in range(started)
    ]


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
