"""Batched, vectorized rollouts (--envs-per-worker N) against the one-env rollout of the same seeds."""

import numpy as np
import pytest
import torch

from daptq.eval import evaluate, store

pytestmark = pytest.mark.slow

FAST = {"tasks": ["reach", "push"], "episodes": 3, "max_steps": 12, "image_size": 16, "progress": False}
# Batched kernels are not bitwise batch-size invariant: measured 1e-8 m (toy) and 3e-7 m (reference VLA, 16
# steps) between batch 1 and batch 3, against a reseed floor of ~0.5-14 mm. The tolerance leaves room.
TOLERANCE_M = 1e-5


def _arrays(run, key):
    return store.load_arrays(run, *key)


def test_batched_and_one_env_runs_agree(tmp_path):
    one = evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "one", **FAST)
    batched = evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "batched", envs_per_worker=3, **FAST)
    assert batched["complete"] and batched["episodes"] == one["episodes"] == 6
    a = {(r["task"], r["seed"]): r for r in store.read_records(tmp_path / "one")}
    b = {(r["task"], r["seed"]): r for r in store.read_records(tmp_path / "batched")}
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key]["success"], a[key]["steps"]) == (b[key]["success"], b[key]["steps"])
        A, B = _arrays(tmp_path / "one", key), _arrays(tmp_path / "batched", key)
        for name in ("ee", "ref_ee", "floor_ee", "actions", "shadow_actions"):
            np.testing.assert_allclose(A[name], B[name], atol=TOLERANCE_M, rtol=0, err_msg=f"{key} {name}")
        assert np.ptp(A["ee"], axis=0).max() > 1e-3  # the arm moved
        assert abs(a[key]["drift_mean"] - b[key]["drift_mean"]) < TOLERANCE_M
    assert store.read_config(tmp_path / "batched")["execution"]["envs_per_worker"] == 3


def test_fp_against_its_cached_batched_self_has_exactly_zero_drift(tmp_path):
    cache = tmp_path / "cache"
    kwargs = {**FAST, "envs_per_worker": 2, "reference_cache": cache}
    evaluate("toy:weight_noise=0.2", "toy", out=tmp_path / "warm", **kwargs)
    s = evaluate("toy", "toy", out=tmp_path / "fp", workers=2, **kwargs)
    assert s["overall"]["drift_max_mean"] == 0.0 and s["overall"]["action_mae_mean"] == [0.0] * 4
    for r in store.read_records(tmp_path / "fp"):
        assert r["reference_cached"] is True and r["simulated_steps"] == r["steps"]
        arrays = _arrays(tmp_path / "fp", (r["task"], r["seed"]))
        np.testing.assert_array_equal(arrays["ee"], arrays["ref_ee"])
        np.testing.assert_array_equal(arrays["actions"], arrays["shadow_actions"])
    # The one-env path keys its cache entries apart: it never reuses a batched rollout.
    one = evaluate("toy", "toy", out=tmp_path / "one", reference_cache=cache, **FAST)
    assert one["overall"]["drift_max_mean"] == 0.0
    assert all(r["reference_cached"] is False for r in store.read_records(tmp_path / "one"))


@pytest.mark.parametrize("spec", ["toy", "ref:metaworld-mt10"])
def test_predict_chunks_samples_what_select_action_samples(spec):
    from daptq.envs import make_env
    from daptq.models.registry import load_policy

    torch.set_num_threads(1)
    policy = load_policy(spec)
    info = policy.info()
    env = make_env("push", image_size=info.image_size or 16, camera=info.camera or "corner3")
    observations = [env.reset(seed=s)[0] for s in (3, 4)]
    env.close()
    expected = []
    for seed, obs in zip((3, 4), observations, strict=True):
        policy.reset(seed=seed)
        first = policy.select_action(obs)
        expected.append(first)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    chunks = policy.predict_chunks(observations, gens, slots=4)
    assert chunks.shape[0] == 2 and chunks.shape[2] == policy.action_space.dim
    for want, chunk in zip(expected, chunks, strict=True):
        np.testing.assert_allclose(chunk[0], want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="slots"):
        policy.predict_chunks(observations, gens, slots=1)
