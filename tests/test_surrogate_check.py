"""The cheap pieces of benchmarks/surrogate_check.py: the layer grouping, the rank statistics against scipy,
and that a group's restricted scope quantizes only that group."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from benchmark_helpers import load_benchmark
from scipy import stats

from daptq.methods import quantize_policy
from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig
from daptq.quant import QuantLinear

sc = load_benchmark("surrogate_check")

SMALL = ReferenceVLAConfig(
    image_size=32, d_model=32, n_layer=2, n_head=2, dit_d_model=32, dit_n_layer=3, dit_n_head=2,
    num_inference_steps=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def policy() -> ReferencePolicy:
    torch.manual_seed(0)
    return ReferencePolicy(ReferenceVLA(SMALL))


def test_grouping_covers_each_scoped_layer_once(policy):
    names = sc.scoped_layers(policy)
    groups = sc.layer_groups(names)
    flat = [n for layers in groups.values() for n in layers]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert list(groups) == [
        "backbone.input_proj",
        "backbone.0.attn",
        "backbone.0.mlp",
        "backbone.1.attn",
        "backbone.1.mlp",
        "interface.z_proj",
        "head.t_embed",
        "head.action_in",
        "head.0.attn",
        "head.0.mlp",
        "head.0.adaLN",
        "head.1.attn",
        "head.1.mlp",
        "head.1.adaLN",
        "head.2.attn",
        "head.2.mlp",
        "head.2.adaLN",
        "head.final_adaLN",
        "head.action_out",
    ]  # model order
    assert groups["backbone.1.attn"] == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert groups["head.2.mlp"] == ["head.blocks.2.mlp.fc", "head.blocks.2.mlp.proj"]
    assert groups["backbone.input_proj"] == ["vision_proj", "language_proj", "state_proj"]
    roles = {q.name: q.role for q in policy.adapter.quantizable_modules()}
    covered = {roles[layers[0]] for layers in groups.values()}
    assert covered == {"backbone", "interface", "action_head"}


def test_grouping_refuses_a_layer_no_pattern_knows():
    with pytest.raises(ValueError, match="encoder.conv: matches 0"):
        sc.layer_groups(["blocks.0.attn.qkv", "encoder.conv"])


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 15).astype(float)  # ties
    y = x + rng.normal(size=15)
    assert sc.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(sc.spearman(np.ones(5), np.arange(5.0)))


def _scipy_p(x, y, n_resamples=np.inf):
    def rho(a, axis=-1):  # permute x against fixed y (pairings)
        return sc._pearson_rows(stats.rankdata(a, axis=axis), stats.rankdata(y))

    res = stats.permutation_test(
        (x,), rho, permutation_type="pairings", vectorized=True, n_resamples=n_resamples
    )
    return res.pvalue


def test_exact_permutation_p_matches_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=7)
    y = x + rng.normal(size=7)
    assert sc.permutation_p(x, y) == pytest.approx(_scipy_p(x, y), abs=1e-12)


def test_monte_carlo_permutation_p_is_close_to_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=9)
    y = 0.6 * x + rng.normal(size=9)
    exact = _scipy_p(x, y)  # 9! pairings, enumerated by scipy
    assert 0.01 < exact < 0.5
    assert sc.permutation_p(x, y, n_perm=200_000) == pytest.approx(exact, abs=0.005)


def test_rank_report_picks_the_monotone_estimate():
    rng = np.random.default_rng(4)
    drift = rng.uniform(0.01, 0.1, 14)
    report = sc.rank_report({"noise": rng.normal(size=14), "cubic": drift**3}, drift)
    assert report["estimators"]["cubic"]["rho"] == pytest.approx(1.0)
    assert report["estimators"]["cubic"]["rho_bootstrap_ci95"] == pytest.approx([1.0, 1.0])
    assert report["estimators"]["cubic"]["p_permutation"] < 1e-3
    assert report["best"]["estimator"] == "cubic" and report["best"]["runner_up"] == "noise"
    assert report["best"]["bootstrap_share_beats_runner_up"] > 0.95


def test_group_scope_quantizes_only_the_group(policy):
    policy = copy.deepcopy(policy)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    group = sc.layer_groups(sc.scoped_layers(policy))["head.1.mlp"]
    record = quantize_policy(policy, sc.group_config(group, sc.check_spec(2, 32, symmetric=False)))
    assert sorted(record.modules) == sorted(group)
    for name, module in policy.model.named_modules():
        assert isinstance(module, QuantLinear) == (name in group), name
    after = policy.model.state_dict()
    for name in group:
        q = policy.model.get_submodule(name)
        assert q.spec.weight.bits == 2 and not q.spec.weight.symmetric
    touched = [k for k in before if any(k.startswith(n + ".") for n in group)]
    assert touched  # the group's own weights exist under their names
    for key, value in before.items():
        if key in touched:
            continue
        assert torch.equal(after[key], value), key
