"""``run_episodes`` with more seeds than environments: refilled at aligned re-plans, no extra calls, and each
episode exactly as it runs alone."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from daptq.eval.rollout import run_episodes

CHUNK = 2


class LengthEnv:
    """An episode of ``seed`` lasts ``seed`` steps (success at the end); the state moves by the action."""

    def reset(self, *, seed):
        self.seed, self.t, self.pos = seed, 0, np.zeros(3, np.float32)
        return self._obs(), {}

    def _obs(self):
        return {"state": np.concatenate([self.pos, [self.seed]]).astype(np.float32)}

    def step(self, action):
        self.t += 1
        self.pos = self.pos + np.asarray(action[:3], np.float32)
        done = self.t >= self.seed
        return self._obs(), 0.0, done, False, {"success": done}


class NoisyChunkPolicy:
    """Chunks of ``CHUNK`` actions: the observed state plus noise from each row's own generator; records
    which episodes (by their seed) each call served and its batch size."""

    action_space = SimpleNamespace(dim=4)

    def __init__(self):
        self.calls: list[list[int]] = []

    def predict_chunks(self, observations, generators, slots=None):
        if slots is not None:
            assert len(observations) <= slots
        self.calls.append([int(o["state"][3]) for o in observations])
        out = []
        for obs, gen in zip(observations, generators, strict=True):
            noise = torch.randn(CHUNK, 4, generator=gen).numpy()
            out.append(obs["state"][None, :] * 0.1 + noise)
        return np.stack(out).astype(np.float32)


def test_more_seeds_than_envs_refills_at_aligned_replans_without_extra_calls():
    policy = NoisyChunkPolicy()
    seeds = [1, 4, 6, 2]  # episode lengths
    rollouts = run_episodes([LengthEnv(), LengthEnv()], policy, seeds, slots=2)
    # steps 0-1: episodes of length 1 and 4; length 1 ends at step 1, mid-chunk, so its env waits for the
    # re-plan at step 2, where length 6 joins; length 4 ends at step 4, length 2 joins at that re-plan.
    assert policy.calls == [[1, 4], [4, 6], [6, 2]] + [[6]]
    assert [r.steps for r in rollouts] == seeds
    assert all(r.success for r in rollouts)
    for seed, rollout in zip(seeds, rollouts, strict=True):
        lone = run_episodes([LengthEnv()], NoisyChunkPolicy(), [seed], slots=2)[0]
        np.testing.assert_array_equal(rollout.actions, lone.actions)
        np.testing.assert_array_equal(rollout.ee, lone.ee)


def test_shadow_and_policy_seeds_follow_each_episode_through_a_refill():
    policy, shadow = NoisyChunkPolicy(), NoisyChunkPolicy()
    seeds, policy_seeds = [3, 1, 5], [30, 10, 50]
    rollouts = run_episodes([LengthEnv()], policy, seeds, shadow=shadow, policy_seeds=policy_seeds, slots=1)
    assert policy.calls == shadow.calls
    for seed, p, rollout in zip(seeds, policy_seeds, rollouts, strict=True):
        lone = run_episodes([LengthEnv()], NoisyChunkPolicy(), [seed], shadow=NoisyChunkPolicy(),
                            policy_seeds=[p], slots=1)[0]  # fmt: skip
        np.testing.assert_array_equal(rollout.actions, lone.actions)
        np.testing.assert_array_equal(rollout.shadow_actions, lone.shadow_actions)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="at least one seed and one environment"):
        run_episodes([], NoisyChunkPolicy(), [1])
    with pytest.raises(ValueError, match="slots=1 < 2"):
        run_episodes([LengthEnv(), LengthEnv()], NoisyChunkPolicy(), [1, 2], slots=1)
