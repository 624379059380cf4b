"""The closed-loop benchmark's settings and named variants resolve to the configs their docs promise."""

from __future__ import annotations

import dataclasses

import pytest
from benchmark_helpers import load_benchmark

from daptq.methods.daptq.config import DAPTQConfig
from daptq.methods.record import QuantRecord


@pytest.fixture(scope="module")
def mcl():
    return load_benchmark("methods_closed_loop")


def _diff(a, b) -> dict:
    names = [f.name for f in dataclasses.fields(a)]
    return {n: getattr(b, n) for n in names if getattr(a, n) != getattr(b, n)}


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("daptq-csrc-only", {"use_mpa": False}),
        ("daptq-mpa-only", {"use_csrc": False}),
        ("daptq-neither", {"use_mpa": False, "use_csrc": False}),
    ],
)
def test_ablation_variants_differ_from_paper_only_in_their_components(mcl, variant, expected):
    paper = mcl.method_config("daptq", "w4a8")
    assert paper == DAPTQConfig.paper()
    assert _diff(paper, mcl.method_config(variant, "w4a8")) == expected


def test_variant_outside_its_settings_is_refused(mcl):
    with pytest.raises(SystemExit, match="defined for the settings"):
        mcl.method_config("daptq-csrc-only", "avg3")


def test_whole_model_settings_include_the_encoders(mcl):
    daptq = mcl.method_config("daptq", "wm-avg4")
    assert daptq.preset == "budget" and daptq.average_bits == 4.0 and daptq.scope.include_encoders
    rtn = mcl.method_config("rtn", "wm-avg4")
    w = rtn.spec.weight
    assert rtn.scope.include_encoders and w.bits == 4 and not w.symmetric and w.granularity == "per_channel"
    assert rtn.spec.activation is None
    w8 = mcl.method_config("rtn", "wm-w8a8")
    assert w8.scope.include_encoders and w8.spec.weight.bits == 8 and w8.spec.activation.bits == 8


def test_counted_roles_follow_the_method_scope(mcl):
    def record(config):
        return QuantRecord(method="rtn", config=config.to_dict(), modules={})

    default = mcl.counted_roles(record(mcl.method_config("rtn", "w4a8")))
    assert default == ("backbone", "interface", "action_head")
    wm = mcl.counted_roles(record(mcl.method_config("rtn", "wm-avg4")))
    assert set(wm) == {"backbone", "interface", "action_head", "vision", "language"}


def test_calib_tasks_are_checked(mcl):
    with pytest.raises(SystemExit, match="unknown or repeated"):
        mcl.calibration_builder(["reach", "not-a-task"])
    with pytest.raises(SystemExit, match="unknown or repeated"):
        mcl.calibration_builder(["reach", "reach"])


def test_issue_29_rows_resolve_to_their_recipes(mcl):
    """The per-step, whole-model 3-bit, 1.5-bit and equal-bytes W4A8 rows (docs/RESULTS.md)."""
    from daptq.methods.daptq.allocation import GROUPED_FORMATS, SUB2_FORMATS

    for method, setting in [("rtn-step", "w4a4"), ("gptq-step", "w4a4"), ("daptq-step", "avg4a4")]:
        config = mcl.method_config(method, setting)
        plain = mcl.method_config(method.split("-")[0], setting)
        act = config.spec.activation
        assert config.step_scales and act.mode == "static_per_tensor" and not act.symmetric
        assert act.bits == plain.spec.activation.bits == 4 and config.spec.weight == plain.spec.weight
    wm3 = mcl.method_config("daptq", "wm-avg3")
    assert wm3.preset == "budget" and wm3.average_bits == 3.0 and wm3.scope.include_encoders
    assert mcl.method_config("gptq", "wm-avg3").scope.include_encoders
    sub2 = mcl.method_config("daptq", "avg1.5")
    assert sub2.average_bits == 1.5 and sub2.formats == SUB2_FORMATS and sub2.rounding == "gptq"
    eq = mcl.method_config("daptq-eqbytes", "w4a8")
    assert eq.preset == "budget" and eq.formats == GROUPED_FORMATS and eq.spec.activation.bits == 8
    assert eq.budget_bytes == mcl.uniform_in_scope_bytes("w4a8")
    with pytest.raises(SystemExit, match="defined for the settings"):
        mcl.method_config("daptq-eqbytes", "w4a4")
