"""The ceiling benchmarks/eval_throughput.py puts beside its measured ratios (``attainable_speedups``),
checked against a hand count, and the per-row stage costs it is computed from (``eval_costs.stage_costs``)."""

from __future__ import annotations

import pytest
import torch
from benchmark_helpers import load_benchmark

from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig

bench = load_benchmark("eval_throughput")

STAGES = ("vision encoder", "backbone (excl. vision)", "DiT sampling")


def _profile(**seconds: float) -> dict:
    keys = ("physics (env step/reset)", "render", *STAGES, "Python, metrics, rest")
    return {"seconds_per_episode": dict(zip(keys, seconds.values(), strict=True))}


def _per_row(*seconds: float) -> dict[str, float]:
    return dict(zip(STAGES, seconds, strict=True))


def test_bound_matches_a_hand_count():
    base = _profile(physics=0.1, render=0.2, vision=0.3, backbone=0.6, dit=0.9, rest=0.0)
    stages = {1: _per_row(2.0, 4.0, 8.0), 8: _per_row(1.0, 4.0, 2.0)}
    # Cold: all three calls batched (gains 1/2, 1, 1/4), 2 of 3 vision passes, the same simulation:
    # 0.3 + 0.3 * 0.5 * 2/3 + 0.6 + 0.9 * 0.25 = 1.225 of 2.1 s. Cached: two calls, one vision pass, half
    # the simulation: 0.15 + 0.3 * 0.5 / 3 + (0.6 + 0.225) * 2/3 = 0.75.
    assert bench.attainable_speedups(base, stages, 8) == {
        "cold cache": round(2.1 / 1.225, 2),
        "cached reference": round(2.1 / 0.75, 2),
    }


def test_without_a_batching_gain_the_cold_path_gains_nothing():
    base = _profile(physics=0.2, render=0.4, vision=0.3, backbone=0.5, dit=1.0, rest=0.1)
    flat = {b: _per_row(1.0, 1.0, 1.0) for b in (1, 4)}
    bound = bench.attainable_speedups(base, flat, 4)
    assert bound["cold cache"] == pytest.approx(2.5 / (0.7 + 0.2 + 1.5), abs=0.01)  # only the shared pass
    assert bound["cached reference"] == pytest.approx(2.5 / (0.35 + 0.1 + 1.0), abs=0.01)


def test_stage_costs_cover_the_profiled_stages_per_batch():
    torch.manual_seed(0)
    config = ReferenceVLAConfig(
        image_size=32, d_model=32, n_layer=2, n_head=2, dit_d_model=32, dit_n_layer=2, dit_n_head=2,
        num_inference_steps=2,
    )  # fmt: skip
    costs = bench.stage_costs(ReferencePolicy(ReferenceVLA(config)), [1, 2], repeats=2)
    assert set(costs) == {1, 2}
    for per_row in costs.values():
        assert tuple(per_row) == STAGES and all(v > 0 for v in per_row.values())
