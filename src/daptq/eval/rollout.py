"""One closed-loop episode, and one paired episode (candidate vs full-precision reference).

Pairing: both rollouts start from ``env.reset(seed=seed)`` (identical initial state) and
``policy.reset(seed=seed)`` (identical sampling noise), so every difference between the two trajectories is
caused by the candidate's weights. A *shadow* reference, reset with the same seed, sees the candidate's
observations during the candidate rollout: its actions are the reference's answer at the same observation, the
basis of the action-error metrics.

Where the end effector (and the grasped object, for suites that declare one) is read from is the suite's
declaration (``daptq.envs.suite.Observations``), passed as ``observations``; None is Meta-World's convention
(``obs["state"][:3]``, no object).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daptq.envs.suite import Observations
from daptq.eval import metrics
from daptq.models.adapter import Policy
from daptq.models.batching import SharesVisionFeatures


@dataclass
class Rollout:
    """What one episode leaves: outcome, the end-effector path (T + 1, 3), the executed actions (T, D) and,
    where the suite declares a manipulated object, its path (T + 1, 3)."""

    success: bool
    ee: np.ndarray
    actions: np.ndarray
    shadow_actions: np.ndarray | None = None
    frames: list[np.ndarray] | None = None
    objects: np.ndarray | None = None

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])


class _Tracker:
    """The end-effector (and object) positions of an episode, read as the suite declares them."""

    def __init__(self, observations: Observations | None) -> None:
        self.observations = observations
        self.ee: list[np.ndarray] = []
        self.objects: list[np.ndarray] | None = (
            [] if observations is not None and observations.object_pose is not None else None
        )

    def add(self, obs: Any, info: Any) -> None:
        if self.observations is None:
            self.ee.append(np.asarray(obs["state"][:3], np.float32))
            return
        self.ee.append(self.observations.ee_position(obs, info))
        if self.objects is not None:
            self.objects.append(self.observations.object_position(info))

    def paths(self) -> tuple[np.ndarray, np.ndarray | None]:
        return np.stack(self.ee), None if self.objects is None else np.stack(self.objects)


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
    observations: Observations | None = None,
) -> Rollout:
    """Roll ``policy`` out until success (terminated) or the step limit (truncated).

    The environment is reset with ``seed``, the policy's (and shadow's) sampling noise with ``policy_seed``
    (default: ``seed``, which is what pairing needs; another value samples the same episode differently).
    ``observations``: the suite's observation conventions (where the end effector and object are).
    """
    obs, info = env.reset(seed=seed)
    policy_seed = seed if policy_seed is None else policy_seed
    policy.reset(seed=policy_seed)
    if shadow is not None:
        shadow.reset(seed=policy_seed)
    dim = policy.action_space.dim
    track = _Tracker(observations)
    track.add(obs, info)
    actions, shadow_actions = [], []
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
        track.add(obs, info)
        if frames is not None:
            frames.append(obs["image"])
        success = success or bool(info["success"])
        done = bool(terminated or truncated)
    ee, objects = track.paths()
    return Rollout(
        success=success,
        ee=ee,
        actions=np.stack(actions) if actions else np.zeros((0, dim), np.float32),
        shadow_actions=np.stack(shadow_actions) if shadow is not None and shadow_actions else None,
        frames=frames,
        objects=objects,
    )


class _ChunkPlayer:
    """One policy's action queues over a batch of episodes: a chunk per episode whose queue is empty, all of
    them from one ``predict_chunks`` call, each episode's noise from its own seeded generator."""

    def __init__(self, policy: Any, seeds: Sequence[int], slots: int | None) -> None:
        import torch

        self.policy = policy
        self.slots = slots
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.queues: list[deque[np.ndarray]] = [deque() for _ in seeds]

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


def run_episodes(
    envs: Sequence[Any],
    policy: Any,
    seeds: Sequence[int],
    shadow: Any | None = None,
    policy_seeds: Sequence[int] | None = None,
    slots: int | None = None,
    observations: Observations | None = None,
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
    call, and it fills the batch rows an early success would otherwise leave as padding. Rollouts are
    returned in ``seeds`` order. A candidate and shadow with equal ``vision_key``s (``SharesVisionFeatures``:
    the encoder was not quantized) share one vision encoder pass per call, bitwise what each would compute.
    """
    n = len(seeds)
    if n == 0 or not envs:
        raise ValueError(f"run_episodes needs at least one seed and one environment, got {n} and {len(envs)}")
    n_envs = min(len(envs), n)
    if slots is not None and slots < n_envs:
        raise ValueError(f"slots={slots} < {n_envs} environments stepped together")
    policy_seeds = list(seeds if policy_seeds is None else policy_seeds)
    dim = policy.action_space.dim
    players = [_ChunkPlayer(policy, policy_seeds, slots)]
    if shadow is not None:
        players.append(_ChunkPlayer(shadow, policy_seeds, slots))
    share_vision = (
        shadow is not None
        and isinstance(policy, SharesVisionFeatures)
        and isinstance(shadow, SharesVisionFeatures)
        and policy.vision_key() == shadow.vision_key()
    )
    obs: dict[int, Any] = {}
    env_of: dict[int, Any] = {}
    free = list(reversed(envs[:n_envs]))
    waiting = deque(range(n))
    tracks = [_Tracker(observations) for _ in range(n)]
    actions: list[list[np.ndarray]] = [[] for _ in range(n)]
    shadow_actions: list[list[np.ndarray]] = [[] for _ in range(n)]
    success = [False] * n
    while waiting or env_of:
        if free and waiting and all(p.replans(i) for p in players for i in env_of):
            while free and waiting:
                i, env = waiting.popleft(), free.pop()
                env_of[i] = env
                obs[i], info = env.reset(seed=int(seeds[i]))
                tracks[i].add(obs[i], info)
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
            tracks[i].add(obs[i], info)
            success[i] = success[i] or bool(info["success"])
            if terminated or truncated:
                free.append(env_of.pop(i))
                del obs[i]
    rollouts = []
    for i in range(n):
        ee, objects = tracks[i].paths()
        rollouts.append(
            Rollout(
                success=success[i],
                ee=ee,
                actions=np.stack(actions[i]),
                shadow_actions=np.stack(shadow_actions[i]) if shadow is not None else None,
                objects=objects,
            )
        )
    return rollouts


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
    Where the suite declares a manipulated object, its paths are kept (``objects``, ``ref_objects``,
    ``floor_objects``) and its drift from the reference's is recorded as ``object_drift_*`` (and
    ``floor_object_drift_*``).
    """
    arrays = {"ee": candidate.ee, "actions": candidate.actions}
    record: dict[str, Any] = {
        "task": task,
        "seed": int(seed),
        "success": candidate.success,
        "steps": candidate.steps,
    }
    if reference is not None:
        shadow = candidate.shadow_actions
        if shadow is None or shadow.shape != candidate.actions.shape:
            raise RuntimeError(
                f"{task} seed {seed}: the shadow reference did not act at every candidate step"
            )
        record.update({"ref_success": reference.success, "ref_steps": reference.steps})
        arrays.update({"ref_ee": reference.ee, "ref_actions": reference.actions, "shadow_actions": shadow})
        if floor is not None:
            record["floor_success"] = floor.success
            arrays["floor_ee"] = floor.ee
    if candidate.objects is not None:
        arrays["objects"] = candidate.objects
        if reference is not None and reference.objects is not None:
            arrays["ref_objects"] = reference.objects
            if floor is not None and floor.objects is not None:
                arrays["floor_objects"] = floor.objects
    record.update(metrics.episode_metrics(arrays, divergence_threshold, hf_cutoff))
    return record, arrays
