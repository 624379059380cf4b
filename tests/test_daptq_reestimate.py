"""DA-PTQ budget with re-estimated sensitivities (issue #29, interactions; daptq.methods.daptq.reestimate):
the second solve prices each layer on the model rounded as first allocated, under the same byte budget, and
every round is recorded."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import daptq_calibration, single_thread, tiny_reference_policy

from daptq.data.calibration import CalibrationSet
from daptq.methods import config_from_dict, quantize_policy
from daptq.methods.daptq import DAPTQConfig
from daptq.methods.daptq.reestimate import costs_on_allocation, rounded_weights
from daptq.methods.daptq.sensitivity import bit_sensitivities, gradient_stats
from daptq.models.reference import ReferencePolicy, ReferenceVLAConfig
from daptq.quant.spec import WeightSpec

pytestmark = pytest.mark.usefixtures(single_thread.__name__)  # one torch thread: the cores are shared

SMALL = ReferenceVLAConfig(
    image_size=32, d_model=32, n_layer=1, n_head=2, dit_d_model=32, dit_n_layer=2, dit_n_head=2,
    num_inference_steps=3,
)  # fmt: skip


def _policy() -> ReferencePolicy:
    return tiny_reference_policy(config=SMALL)


def _calibration(n_batches: int = 2, b: int = 8) -> CalibrationSet:
    return daptq_calibration(SMALL, n_batches, b)


def test_one_round_re_solves_on_re_estimated_costs_within_the_budget():
    cfg = DAPTQConfig.budget(average_bits=3.0, reestimate_rounds=1, use_csrc=False)
    assert config_from_dict(cfg.to_dict()) == cfg
    record = quantize_policy(_policy(), cfg, _calibration())
    re = record.decisions["reestimate"]
    assert re["rounds_asked"] == 1 and re["rounds_run"] == 1 and len(re["rounds"]) == 2
    first, second = re["rounds"]
    alloc = record.decisions["allocation"]
    assert alloc["costs"] == second["costs"]  # the final solve used the re-estimated costs
    assert {n: str(b) for n, b in record.decisions["bit_map"].items()} == second["choices"]
    assert alloc["total_bytes"] <= alloc["budget_bytes"] and second["total_bytes"] <= alloc["budget_bytes"]
    changed = [
        n for n in first["costs"] for c in first["costs"][n] if first["costs"][n][c] != second["costs"][n][c]
    ]
    assert changed  # the costs moved once the other layers were rounded
    for row in second["costs"].values():  # float stays free, rounding costs something
        assert row["16"] == 0.0 and all(v >= 0.0 for v in row.values())
    # Without rounds the allocation is the one additive solve, with nothing recorded about rounds.
    plain = quantize_policy(_policy(), DAPTQConfig.budget(average_bits=3.0, use_csrc=False), _calibration())
    assert "reestimate" not in plain.decisions
    assert plain.decisions["allocation"]["costs"] == first["costs"]


def test_costs_on_an_allocation_see_its_rounded_layers_and_restore_the_weights():
    policy = _policy()
    adapter = policy.adapter
    batches = list(adapter.calibration_batches(iter(_calibration().batches)))
    names = ["head.blocks.1.mlp.fc", "head.blocks.0.attn.qkv", "head.blocks.0.mlp.proj", "head.z_proj"]
    grid = {b: WeightSpec(b, symmetric=False, granularity="per_group", group_size=16) for b in (2, 4)}
    candidates = {n: {**grid, 16: WeightSpec(16)} for n in names}
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}

    all_float = {n: WeightSpec(16) for n in names}
    costs_fp, _ = costs_on_allocation(adapter, batches, all_float, candidates, dim_weights=None, seed=0)
    additive = bit_sensitivities(
        policy.model, gradient_stats(adapter, batches, names, None, 0), candidates[names[0]]
    )
    assert costs_fp[names[0]] == pytest.approx(
        additive[names[0]], rel=1e-9
    )  # nothing rounded: the old estimate

    others_at_2 = {n: grid[2] for n in names[1:]} | {names[0]: WeightSpec(16)}
    costs_q, _ = costs_on_allocation(adapter, batches, others_at_2, candidates, dim_weights=None, seed=0)
    assert costs_q[names[0]][2] != pytest.approx(costs_fp[names[0]][2], rel=1e-6)
    after = policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # rounded in place, restored bitwise

    with pytest.raises(RuntimeError, match="boom"), rounded_weights(policy.model, {names[0]: grid[2]}):
        assert not torch.equal(policy.model.get_submodule(names[0]).weight, before[f"{names[0]}.weight"])
        raise RuntimeError("boom")
    assert torch.equal(policy.model.get_submodule(names[0]).weight, before[f"{names[0]}.weight"])


def test_reestimate_rounds_validation_names_the_option():
    with pytest.raises(ValueError, match="reestimate_rounds"):
        DAPTQConfig.paper(reestimate_rounds=1)
    with pytest.raises(ValueError, match="reestimate_rounds"):
        DAPTQConfig.budget(reestimate_rounds=-1)
    with pytest.raises(ValueError, match="reestimate_rounds"):
        DAPTQConfig.budget(reestimate_rounds=1, activation_choices=(8, 16))
    with pytest.raises(ValueError, match="reestimate_rounds"):
        DAPTQConfig.budget(reestimate_rounds=1, estimator="action_deviation")


def test_cli_option_reaches_the_budget_config(tmp_path, capsys):
    from daptq.cli import main
    from daptq.methods.workflow import config_from_options

    config = config_from_options("daptq", avg_bits=3.0, method_options={"reestimate_rounds": 2})
    assert config.preset == "budget" and config.reestimate_rounds == 2
    argv = ["quantize", "toy", "--method", "daptq", "--reestimate-rounds", "1", "--out", str(tmp_path / "q")]
    assert main(argv) == 2  # the paper preset: refused before any work, naming the option
    assert "reestimate_rounds" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_closed_loop_benchmark_variant_differs_only_in_the_rounds():
    import dataclasses

    from benchmark_helpers import load_benchmark

    mcl = load_benchmark("methods_closed_loop")
    base, variant = mcl.method_config("daptq", "avg2.5"), mcl.method_config("daptq-reest1", "avg2.5")
    assert variant == dataclasses.replace(base, reestimate_rounds=1)


class _Alloc:
    def __init__(self, bits):
        self.bits, self.objective, self.total_bytes, self.average_bits = bits, 0.0, 0, 0.0


def test_each_round_solves_on_the_mean_of_the_re_estimates_and_stops_at_a_fixed_point(monkeypatch):
    from daptq.methods.daptq import reestimate

    estimates = iter([{"a": {2: 1.0, 4: 0.0}}, {"a": {2: 0.0, 4: 3.0}}, {"a": {2: 0.0, 4: 3.0}}])
    monkeypatch.setattr(reestimate, "costs_on_allocation", lambda *args, **kwargs: (next(estimates), None))
    solved = []

    def solve(costs):
        solved.append(costs)
        return _Alloc({"a": min(costs["a"], key=costs["a"].get)})

    candidates = {"a": {2: WeightSpec(2), 4: WeightSpec(4)}}
    config = DAPTQConfig.budget(reestimate_rounds=5)
    alloc, costs, record = reestimate.reestimate_and_resolve(
        None, [], candidates, _Alloc({"a": 2}), {"a": {2: 0.5, 4: 0.5}}, solve, config, None
    )
    # round 1: the re-estimate itself (-> 4); round 2: the mean of both (-> 2, no swing back to a
    # re-estimate alone); round 3: mean of three, still 2 -> unchanged, stop
    assert solved == [{"a": {2: 1.0, 4: 0.0}}, {"a": {2: 0.5, 4: 1.5}}, {"a": {2: 1 / 3, 4: 2.0}}]
    assert alloc.bits == {"a": 2} and costs == solved[-1]
    assert record["rounds_run"] == 3 and record["converged_at_round"] == 3
    assert [r.get("changed_layers") for r in record["rounds"]] == [None, ["a"], ["a"], []]
