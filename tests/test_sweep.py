"""`daptq sweep`: groups from the adapter's declarations, unions, the scope audit, and one paired run."""

from __future__ import annotations

import json

import pytest

from daptq.methods import quantize_policy
from daptq.methods.daptq import DAPTQConfig
from daptq.methods.rtn import RTNConfig
from daptq.methods.scope import DEFAULT_ROLES
from daptq.models.registry import load_policy
from daptq.quant.spec import spec_from_bits
from daptq.sweep import add_additivity, audit_scope, group_config, module_groups, select_groups

REF = "ref:metaworld-mt10"


@pytest.fixture(scope="module")
def ref():
    return load_policy(REF)


def test_groups_partition_the_scope_at_every_granularity(ref):
    scoped = [m.name for m in ref.adapter.quantizable_modules() if m.role in DEFAULT_ROLES]
    for by in ("component", "block", "part", "type"):
        groups = module_groups(ref.adapter, by, DEFAULT_ROLES)
        flat = [n for layers in groups.values() for n in layers]
        assert sorted(flat) == sorted(scoped) and len(flat) == len(set(flat)), by
    assert set(module_groups(ref.adapter, "component", DEFAULT_ROLES)) == set(DEFAULT_ROLES)
    parts = module_groups(ref.adapter, "part", DEFAULT_ROLES)
    assert parts["backbone.0.attention"] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    assert parts["dit.2.modulation"] == ["head.blocks.2.adaLN"]
    assert "head.z_proj" in parts["interface.other"]
    types = module_groups(ref.adapter, "type", DEFAULT_ROLES)
    assert types["dit.modulation"] == [f"head.blocks.{i}.adaLN" for i in range(3)]
    assert len(types["backbone.mlp"]) == 12
    with pytest.raises(ValueError, match="--by must be one of"):
        module_groups(ref.adapter, "layer", DEFAULT_ROLES)


def test_unions_keep_model_order_and_unknown_groups_are_named(ref):
    groups = module_groups(ref.adapter, "component", DEFAULT_ROLES)
    chosen = select_groups(groups, ["action_head+interface"])
    assert list(chosen) == ["action_head+interface"]
    assert chosen["action_head+interface"] == groups["interface"] + groups["action_head"]
    with pytest.raises(ValueError, match=r"unknown group\(s\) \['vison'\].*known groups: backbone"):
        select_groups(groups, ["vison"])
    with pytest.raises(ValueError, match="a group repeated"):
        select_groups(groups, ["interface+interface"])
    assert select_groups(groups, None) == groups


def test_a_method_that_chooses_its_own_bits_is_refused():
    with pytest.raises(ValueError, match="chooses its own per-layer settings"):
        group_config(DAPTQConfig.budget(), ["head.z_proj"])


def test_the_audit_counts_what_was_quantized_per_role():
    policy = load_policy(REF)
    groups = module_groups(policy.adapter, "component", DEFAULT_ROLES)
    spec = spec_from_bits(4, None, 32, True, "minmax", "restricted")
    names = groups["interface"] + groups["action_head"]
    quantize_policy(policy, group_config(RTNConfig(spec=spec), names))
    audit = audit_scope(policy, names)
    assert audit == {"per_role": {"action_head": 20, "interface": 1}, "modules": 21}
    with pytest.raises(ValueError, match=r"planned but float: \['blocks.0.attn.qkv'\]"):
        audit_scope(policy, [*names, "blocks.0.attn.qkv"])
    with pytest.raises(ValueError, match=r"quantized outside the plan: \['head.z_proj'\]"):
        audit_scope(policy, groups["action_head"])


def test_union_rows_carry_the_sum_of_their_parts():
    def row(group, diff, drift, floor=0.01):
        return {"group": group, "success_diff": diff, "drift_mean_m": drift, "floor_drift_mean_m": floor}

    rows = [row("a", -0.1, 0.02), row("b", -0.2, 0.03), row("a+b", -0.9, 0.2), row("a+c", -0.5, 0.1)]
    add_additivity(rows)
    assert rows[2]["parts_success_diff_sum"] == pytest.approx(-0.3)
    assert rows[2]["parts_excess_drift_sum_m"] == pytest.approx(0.03)
    assert rows[2]["excess_drift_m"] == pytest.approx(0.19)
    assert "parts_success_diff_sum" not in rows[3]  # c was not swept alone


@pytest.mark.slow
def test_sweep_cli_quantizes_audits_and_evaluates_each_group(tmp_path, capsys):
    from daptq.cli import main

    out = tmp_path / "sweep"
    argv = ["sweep", REF, "--method", "rtn", "--w-bits", "2", "--group-size", "32", "--asymmetric"]
    argv += ["--groups", "interface", "action_head", "interface+action_head", "--tasks", "reach"]
    argv += ["--episodes", "1", "--max-steps", "20", "--workers", "1", "--envs-per-worker", "1"]
    argv += ["--no-reference-cache", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| interface+action_head | 21 | 1 |" in table
    payload = json.loads((out / "sweep.json").read_text())
    assert [r["group"] for r in payload["rows"]] == ["interface", "action_head", "interface+action_head"]
    assert [r["audit"]["modules"] for r in payload["rows"]] == [1, 20, 21]
    assert payload["split"] == "val" and (out / "sweep.png").stat().st_size > 0
    assert (out / "eval" / "action_head" / "summary.json").is_file()
    assert main([*argv[:-2], "--split", "eval", "--out", str(tmp_path / "x")]) == 2
