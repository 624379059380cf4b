"""The method interface: strict configs, the registry, scopes, hooks and all-or-nothing quantize_policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from daptq.data.calibration import CalibrationSet
from daptq.methods import (
    Method,
    MethodConfig,
    QuantRecord,
    Scope,
    available_methods,
    config_from_dict,
    get_method,
    quantize_policy,
    register_method,
    resolve_scope,
)
from daptq.methods.base import forward_batch
from daptq.methods.rtn import RTNConfig
from daptq.methods.scope import fit_group_size, largest_dividing_group
from daptq.models.adapter import QuantizableModule
from daptq.models.toy import ToyPolicy
from daptq.quant import ActivationSpec, QuantLinear, QuantSpec, Rule, WeightSpec, quantize_, w4a8


def _calibration(n: int = 8, action_dim: int = 4) -> CalibrationSet:
    rng = np.random.default_rng(0)
    return CalibrationSet(
        [
            {
                "state": rng.uniform(-0.2, 0.8, (n, 4)).astype(np.float32),
                "instruction": ["reach the goal"] * n,
                "actions": rng.uniform(-1, 1, (n, 4, action_dim)).astype(np.float32),
            }
        ],
        {"split": "calibration", "action_space": {"names": ["dx", "dy", "dz", "grip"]}},
    )


# ---- configs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _StrictConfig(MethodConfig):
    VERSION = 3
    alpha: float = 0.5
    steps: int = 4
    act_order: bool = True
    mode: str = "a"
    names: tuple[str, ...] = ()
    maybe: int | None = None
    extra_specs: tuple[QuantSpec, ...] = ()


@register_method(_StrictConfig, name="_strict_test")
class _StrictMethod(Method):
    def requires_calibration(self) -> bool:
        return False

    def apply(self, adapter):
        quantize_(adapter.model, self.plan.specs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("act_order", "false"),  # a string is truthy; it must not pass as a bool
        ("act_order", 1),
        ("steps", 4.0),
        ("steps", True),
        ("alpha", "0.5"),
        ("mode", 3),
        ("names", None),
        ("names", [1]),
        ("maybe", "x"),
        (
            "spec",
            {"weight": {"bits": 4}},
        ),  # a dict is not a QuantSpec (from_dict converts; the ctor does not)
    ],
)
def test_config_rejects_wrong_types(field, value):
    with pytest.raises(ValueError, match=field):
        _StrictConfig(**{field: value})


def test_config_coerces_only_safe_types_and_round_trips():
    cfg = _StrictConfig(alpha=1, names=["x", "y"], maybe=None, extra_specs=(QuantSpec(WeightSpec(3)),))
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float) and cfg.names == ("x", "y")
    d = cfg.to_dict()
    assert d["method"] == "_strict_test" and d["version"] == 3
    assert _StrictConfig.from_dict(d) == cfg
    assert _StrictConfig.from_yaml(cfg.to_yaml()) == cfg
    assert config_from_dict(d) == cfg


def test_config_from_dict_errors_are_clear():
    d = _StrictConfig().to_dict()
    with pytest.raises(ValueError, match="unknown field"):
        _StrictConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="version"):
        _StrictConfig.from_dict({**d, "version": 2})
    with pytest.raises(ValueError, match="for method 'rtn'"):
        _StrictConfig.from_dict({**d, "method": "rtn"})
    with pytest.raises(ValueError, match="act_order"):
        _StrictConfig.from_yaml("method: _strict_test\nact_order: 'false'\n")
    with pytest.raises(ValueError, match="symmetric"):
        RTNConfig.from_dict({"spec": {"weight": {"bits": 4, "symmetric": "false"}}})


def test_registry_lookups_and_unknown_method():
    assert "rtn" in available_methods() and available_methods()["rtn"] is RTNConfig
    assert get_method("rtn").name == "rtn"
    assert type(get_method(RTNConfig())).__name__ == "RTN"
    with pytest.raises(ValueError, match="unknown method 'nope'.*available"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown method"):
        config_from_dict({"method": "nope"})
    with pytest.raises(ValueError, match="already registered"):
        register_method(RTNConfig, name="rtn_again")(_StrictMethod)


# ---- scope ------------------------------------------------------------------------------------------------
class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _FakeAdapter:
    """Layers with the fan-ins the reference VLA has trouble with (112, 4, 192) and every role."""

    def __init__(self, extra: dict[str, nn.Module] | None = None):
        self.model = nn.ModuleDict(
            {
                "vision_conv": nn.Conv2d(3, 8, 3),
                "vision_proj": nn.Linear(112, 16),
                "state_proj": nn.Linear(4, 16),
                "block": nn.Linear(192, 16),
                "z_proj": nn.Linear(256, 16),
                "head": nn.Linear(128, 16),
                **(extra or {}),
            }
        )
        roles = {"vision_conv": "vision", "z_proj": "interface", "head": "action_head"}
        self.modules = [QuantizableModule(n, m, roles.get(n, "backbone")) for n, m in self.model.items()]

    def quantizable_modules(self):
        return self.modules


def test_largest_dividing_group_against_brute_force():
    for fan_in in range(1, 300):
        for g in (8, 32, 128):
            expected = max(d for d in range(1, g + 1) if fan_in % d == 0)
            assert largest_dividing_group(fan_in, g) == expected


def test_scope_default_roles_and_group_resolution_recorded():
    a = _FakeAdapter()
    plan = resolve_scope(a.model, a.quantizable_modules(), Scope(), w4a8(128))
    assert set(plan.modules) == {"vision_proj", "state_proj", "block", "z_proj", "head"}
    assert "vision_conv" in plan.kept_float and "role 'vision'" in plan.kept_float["vision_conv"]
    got = {n: (m.spec.weight.granularity, m.spec.weight.group_size) for n, m in plan.modules.items()}
    assert got == {
        "vision_proj": ("per_channel", None),  # 112: largest divisor <= 128 is 112 itself
        "state_proj": ("per_channel", None),
        "block": ("per_group", 96),
        "z_proj": ("per_group", 128),
        "head": ("per_group", 128),
    }
    assert "group 96" in plan.modules["block"].note and plan.modules["head"].note == ""
    assert plan.modules["block"].requested == w4a8(128)


def test_scope_error_lists_every_layer_it_cannot_serve():
    a = _FakeAdapter()
    with pytest.raises(ValueError, match="3 problem") as e:
        resolve_scope(a.model, a.quantizable_modules(), Scope(group_fallback="error"), w4a8(128))
    for name in ("vision_proj", "state_proj", "block"):
        assert name in str(e.value)


def test_scope_encoders_flag_rules_and_exclude():
    a = _FakeAdapter()
    plan = resolve_scope(a.model, a.quantizable_modules(), Scope(include_encoders=True), w4a8(32))
    assert plan.modules["vision_conv"].role == "vision"  # 27 inputs -> per-channel by the rule
    assert plan.modules["vision_conv"].spec.weight.granularity == "per_channel"
    w8 = QuantSpec(WeightSpec(8))
    scope = Scope(rules=(Rule("head", w8, "exact"), Rule("vision_*", w8)), exclude=("block",))
    plan = resolve_scope(a.model, a.quantizable_modules(), scope, w4a8(32))
    assert plan.modules["head"].spec == w8 and plan.modules["vision_conv"].spec == w8
    assert "block" not in plan.modules and "block" in plan.kept_float
    with pytest.raises(ValueError, match="matches no quantizable module"):
        resolve_scope(a.model, a.quantizable_modules(), Scope(exclude=("nothing*",)), w4a8(32))
    assert fit_group_size(w4a8(32), 27, "per_channel")[0].weight.granularity == "per_channel"


def test_scope_refuses_subclass_that_overrides_forward():
    a = _FakeAdapter({"scaled": _ScaledLinear(16, 16)})
    with pytest.raises(ValueError, match="scaled.*overrides forward"):
        resolve_scope(a.model, a.quantizable_modules(), Scope(), w4a8(16))


def test_scope_types_are_strict():
    with pytest.raises(ValueError, match="include_encoders"):
        Scope(include_encoders="false")
    with pytest.raises(ValueError, match="unknown role"):
        Scope(roles=("vision", "bogus"))
    with pytest.raises(ValueError, match="must be a list"):
        Scope.from_dict({"roles": None})
    assert Scope.from_dict(Scope(rules=(Rule("x", None),)).to_dict()) == Scope(rules=(Rule("x", None),))


# ---- lifecycle --------------------------------------------------------------------------------------------
def test_rtn_method_matches_the_core_and_records():
    p, q = ToyPolicy(), ToyPolicy()
    spec = QuantSpec(WeightSpec(4, granularity="per_group", group_size=8))
    record = quantize_policy(p, RTNConfig(spec=spec), base_model={"spec": "toy", "digest": "x"})
    plan_specs = {n: m.spec for n, m in record.modules.items()}
    quantize_(q.model, plan_specs)
    batch = next(q.adapter.calibration_batches(iter(_calibration().batches)))
    assert torch.equal(forward_batch(p, batch), forward_batch(q, batch))
    assert isinstance(p.net[0], QuantLinear) and record.method == "rtn"
    assert record.modules["net.0"].spec.weight.group_size == 6  # fan-in 12 is not divisible by 8
    assert record.base_model == {"spec": "toy", "digest": "x"} and "apply_s" in record.timings
    assert QuantRecord.from_json(record.to_json()) == record
    assert record.recipe().resolve(ToyPolicy().model) == plan_specs


def test_rtn_static_activations_need_and_use_calibration():
    spec = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_policy(ToyPolicy(), RTNConfig(spec=spec))
    p = ToyPolicy()
    record = quantize_policy(p, RTNConfig(spec=spec), _calibration())
    assert all(p.model.get_submodule(n).act_scale is not None for n in record.modules)
    assert set(record.decisions["activation_scales"]) == set(record.modules)
    assert record.calibration["split"] == "calibration" and record.calibration["samples"] == 8


class _Boom(RuntimeError):
    pass


@dataclass(frozen=True)
class _FailingConfig(MethodConfig):
    fail_in: str = "calibrate"


@register_method(_FailingConfig, name="_failing_test")
class _FailingMethod(Method):
    def calibrate(self, adapter, batches):
        for name in self.plan.modules:
            self.register_forward_pre_hook(adapter.model.get_submodule(name), lambda *_: None)
        if self.config.fail_in == "calibrate":
            raise _Boom("calibration failed")

    def apply(self, adapter):
        quantize_(adapter.model, self.plan.specs)
        with torch.no_grad():
            adapter.model.net[0].bias.add_(1.0)
        if self.config.fail_in == "apply":
            raise _Boom("apply failed")


@pytest.mark.parametrize("fail_in", ["calibrate", "apply"])
def test_failure_leaves_no_hooks_and_the_model_untouched(fail_in):
    p = ToyPolicy()
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    modules_before = dict(p.model.named_modules())
    with pytest.raises(_Boom):
        quantize_policy(p, _FailingConfig(fail_in=fail_in), _calibration())
    assert dict(p.model.named_modules()) == modules_before
    assert all(torch.equal(before[k], v) for k, v in p.model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in p.model.modules())


def test_hooks_gone_after_success():
    p = ToyPolicy()
    quantize_policy(p, _FailingConfig(fail_in="never"), _calibration())
    assert isinstance(p.net[0], QuantLinear)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in p.model.modules())


@pytest.mark.parametrize(
    ("batches", "provenance", "match"),
    [
        ([], {}, "empty"),
        ([{"state": np.full((2, 4), np.nan, np.float32), "instruction": ["a", "b"]}], {}, "NaN"),
        (
            [{"state": np.zeros((2, 4), np.float32), "instruction": ["a", "b"]}],
            {"action_space": ["j1"]},
            "j1",
        ),
        (
            [
                {
                    "state": np.zeros((2, 4), np.float32),
                    "instruction": ["a", "b"],
                    "actions": np.zeros((2, 4, 7), np.float32),
                }
            ],
            {},
            "action space",
        ),
    ],
)
def test_bad_calibration_sets_are_refused_before_the_model_changes(batches, provenance, match):
    p = ToyPolicy()
    spec = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))
    with pytest.raises(ValueError, match=match):
        quantize_policy(p, RTNConfig(spec=spec), CalibrationSet(batches, provenance))
    assert not any(isinstance(m, QuantLinear) for m in p.model.modules())


def test_toy_policy_is_a_vla_adapter():
    from daptq.models.adapter import VLAAdapter

    policy = ToyPolicy()
    p = policy.adapter
    assert isinstance(p, VLAAdapter) and p.model is policy.model and p.chunk_size == 4
    batch = next(p.calibration_batches(iter(_calibration().batches)))
    assert p.condition(batch).shape == (8, policy.config.hidden)
    loss = p.objective(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and policy.net[4].weight.grad is not None  # gradients reach the action head
    zero = p.objective(batch, dim_weights=torch.zeros(4), generator=torch.Generator().manual_seed(0))
    assert float(zero.detach()) == 0.0
    assert [m.role for m in p.quantizable_modules()] == ["backbone", "interface", "action_head"]
    assert [m.name for m in p.interface_modules()] == ["net.2"]
