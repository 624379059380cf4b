"""The toy policy honours the Policy contract: seeded sampling noise, a chunk queue, seeded weight noise."""

import numpy as np
import pytest
import torch

from daptq.models.adapter import METAWORLD_ACTION_SPACE, Policy
from daptq.models.toy import ToyConfig, parse_toy_spec, toy_policy_from_spec

OBS = {"state": np.array([0.0, 0.6, 0.2, 1.0], np.float32), "instruction": "open the door"}


def _actions(policy, seed, n=9):
    policy.reset(seed=seed)
    return np.stack([policy.select_action(OBS) for _ in range(n)])


def test_spec_parsing_and_errors():
    assert parse_toy_spec("toy") == ToyConfig()
    assert parse_toy_spec("toy:seed=3,weight_noise=0.5") == ToyConfig(seed=3, weight_noise=0.5)
    with pytest.raises(ValueError, match="bad item"):
        parse_toy_spec("toy:colour=red")
    with pytest.raises(ValueError, match="not a valid"):
        parse_toy_spec("toy:seed=abc")
    with pytest.raises(ValueError, match=">= 0"):
        parse_toy_spec("toy:weight_noise=-1")


def test_contract_and_seeded_sampling_noise():
    policy = toy_policy_from_spec("toy")
    assert isinstance(policy, Policy)
    assert policy.action_space == METAWORLD_ACTION_SPACE
    a = _actions(policy, seed=7)
    assert a.shape == (9, 4) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    np.testing.assert_array_equal(a, _actions(policy, seed=7))  # reset(seed) fixes the noise
    np.testing.assert_array_equal(a, _actions(toy_policy_from_spec("toy"), seed=7))  # rebuilt from the spec
    assert not np.array_equal(a, _actions(policy, seed=8))


def test_chunk_queue_plays_a_chunk_before_replanning():
    policy = toy_policy_from_spec("toy:chunk=3")
    policy.reset(seed=0)
    first = policy.select_action(OBS)
    # The next two actions come from the queue: a different observation must not change them.
    other = {**OBS, "state": np.array([0.3, 0.4, 0.1, 0.0], np.float32)}
    queued = [policy.select_action(other) for _ in range(2)]
    policy.reset(seed=0)
    np.testing.assert_array_equal(first, policy.select_action(OBS))
    np.testing.assert_array_equal(queued, [policy.select_action(OBS) for _ in range(2)])
    chunk = policy.predict_chunk({"state": torch.zeros(5, 4)}, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (5, 3, 4)


def test_weight_noise_is_seeded_and_relative():
    fp = toy_policy_from_spec("toy")
    noisy = [toy_policy_from_spec(f"toy:weight_noise={w}") for w in (0.01, 0.1)]
    w_fp = fp.net[0].weight.detach()
    d_small = ((noisy[0].net[0].weight.detach() - w_fp).std() / w_fp.std()).item()
    d_large = ((noisy[1].net[0].weight.detach() - w_fp).std() / w_fp.std()).item()
    assert d_small == pytest.approx(0.01, rel=0.2) and d_large == pytest.approx(0.1, rel=0.2)
    np.testing.assert_array_equal(
        _actions(noisy[0], 1), _actions(toy_policy_from_spec("toy:weight_noise=0.01"), 1)
    )
    np.testing.assert_array_equal(_actions(fp, 1), _actions(toy_policy_from_spec("toy:weight_noise=0"), 1))
    assert not np.array_equal(_actions(fp, 1), _actions(noisy[0], 1))
