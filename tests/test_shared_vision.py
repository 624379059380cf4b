"""A candidate and its shadow share one vision encoder pass when their encoders are the same, bitwise."""

import numpy as np
import pytest
import torch

from daptq.envs import make_env
from daptq.eval.rollout import run_episodes
from daptq.models.batching import SharesVisionFeatures
from daptq.models.registry import load_policy

pytestmark = pytest.mark.slow

MODEL = "ref:metaworld-mt10"


def _counting(policy) -> list[int]:
    calls = [0]
    policy.model.vision.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _rollouts(candidate, shadow, envs):
    return run_episodes(envs, candidate, [3, 4, 5], shadow=shadow, slots=2)


def test_candidate_and_shadow_with_one_encoder_share_its_features_bitwise():
    candidate, shadow = load_policy(MODEL), load_policy(MODEL)
    with torch.no_grad():  # a "quantized" backbone: the candidate differs, its vision encoder does not
        for p in candidate.model.blocks.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert isinstance(candidate, SharesVisionFeatures)
    assert candidate.vision_key() == shadow.vision_key()
    envs = [
        make_env("reach", image_size=candidate.image_size, camera=candidate.camera, max_steps=10)
        for _ in "ab"
    ]
    try:
        cand_calls, shadow_calls = _counting(candidate), _counting(shadow)
        shared = _rollouts(candidate, shadow, envs)
        assert cand_calls[0] > 0 and shadow_calls[0] == 0  # one pass, by the candidate's encoder

        shadow.vision_key = lambda: "another encoder"  # the same policy, not recognised as shareable
        separate = _rollouts(candidate, shadow, envs)
        assert shadow_calls[0] == cand_calls[0] // 2 > 0
    finally:
        for env in envs:
            env.close()
    for a, b in zip(shared, separate, strict=True):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.shadow_actions, b.shadow_actions)
        np.testing.assert_array_equal(a.ee, b.ee)
    assert any(not np.array_equal(r.actions, r.shadow_actions) for r in shared)  # the candidate does differ


def test_a_changed_vision_encoder_changes_the_key():
    candidate, shadow = load_policy(MODEL), load_policy(MODEL)
    with torch.no_grad():
        next(candidate.model.vision.parameters()).mul_(1.001)
    assert candidate.vision_key() != shadow.vision_key()
    with pytest.raises(ValueError, match="slots=1 < 2"):
        shadow.vision_features([{}, {}], slots=1)
