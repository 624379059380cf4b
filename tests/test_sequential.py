"""Sequential (block-by-block) calibration: the block loop's quantized model equals the whole-model path's
on the reference VLA (RTN bitwise; GPTQ within float tolerance), inputs kept in memory or spilled to disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from baseline_helpers import TINY, n_hooks, reference_calibration, tiny_reference_policy

from daptq.methods import quantize_policy
from daptq.methods.base import Method
from daptq.methods.gptq import GPTQConfig
from daptq.methods.rtn import RTNConfig
from daptq.methods.sequential import block_plan, quantize_policy_sequential
from daptq.models.reference import ReferencePolicy, ReferenceVLA
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

pytestmark = pytest.mark.usefixtures("single_thread")
from baseline_helpers import single_thread  # noqa: E402,F401 (fixture)

STATIC = QuantSpec(
    WeightSpec(4, granularity="per_group", group_size=16), ActivationSpec(8, mode="static_per_tensor")
)


def _both(config, **kwargs):
    cal = reference_calibration()
    whole, seq = tiny_reference_policy(), tiny_reference_policy()
    quantize_policy(whole, config, cal)
    record = quantize_policy_sequential(seq, config, cal, **kwargs)
    return whole.model.state_dict(), seq, record


def test_block_containers_are_derived_from_the_declared_modules():
    adapter = tiny_reference_policy().adapter
    blocks = adapter.block_modules()
    assert blocks[("backbone", 0)] == "blocks.0"
    assert blocks[("dit", 0)] == "head.blocks.0"
    assert blocks[("language", 2)] == "language.bert.encoder.layer.2"
    in_scope = [m.name for m in adapter.quantizable_modules()]
    plan, rest = block_plan(adapter, in_scope)
    assert {n for b in plan for n in b.members} | set(rest) == set(in_scope)
    assert "head.action_out" in rest and "blocks.0.attn.qkv" not in rest


@pytest.mark.parametrize("spec", [None, STATIC], ids=["weights", "static_activations"])
def test_rtn_sequential_equals_whole_model_bitwise(spec):
    config = RTNConfig() if spec is None else RTNConfig(spec=spec)
    whole, seq, record = _both(config)
    got = seq.model.state_dict()
    assert got.keys() == whole.keys()
    assert all(torch.equal(got[k], whole[k]) for k in whole), [
        k for k in whole if not torch.equal(got[k], whole[k])
    ]
    assert record.decisions["sequential"]["propagation"] == "float"
    assert n_hooks(seq.model) == 0
    for stage in ("prepare", "calibrate", "apply"):
        assert record.timings[f"{stage}_s"] >= 0 and record.timings[f"{stage}_peak_rss_mb"] > 0


@pytest.mark.parametrize("spill", [False, True], ids=["in_memory", "spilled"])
def test_gptq_sequential_equals_whole_model(spill):
    config = GPTQConfig(spec=STATIC, block_size=8)
    whole, seq, record = _both(config, max_in_memory_bytes=0 if spill else None)
    got = seq.model.state_dict()
    assert got.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(got[k].double(), whole[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    assert (record.decisions["sequential"]["spilled_input_bytes"] > 0) == spill
    assert set(record.decisions["layers"]) == set(record.modules) - set(record.decisions["kept_float"])


def _two_layer_policy():
    torch.manual_seed(0)
    model = ReferenceVLA(dataclasses.replace(TINY, n_layer=2, dit_n_layer=2))
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    return ReferencePolicy(model)


def test_gptq_true_sequential_propagates_quantized_outputs_in_one_pass_per_block(monkeypatch):
    events = []
    monkeypatch.setattr(Method, "on_block_end", lambda self, adapter, key: events.append(key))
    cal = reference_calibration()
    float_prop, quant_prop = _two_layer_policy(), _two_layer_policy()
    spec = QuantSpec(WeightSpec(3, granularity="per_group", group_size=16), None)
    quantize_policy_sequential(float_prop, GPTQConfig(spec=spec, block_size=8), cal)
    events.clear()
    record = quantize_policy_sequential(quant_prop, GPTQConfig(spec=spec, block_size=8, sequential=True), cal)
    assert record.decisions["sequential"]["propagation"] == "quantized"
    # one event per block with in-scope modules, in execution order (the encoders are out of scope)
    assert events == [("backbone", 0), ("backbone", 1), ("dit", 0), ("dit", 1)]
    a, b = float_prop.model.state_dict(), quant_prop.model.state_dict()
    # the first block of each stack sees float inputs either way; the next one sees quantized outputs
    for stack in ("blocks", "head.blocks"):
        first = [k for k in a if k.startswith(f"{stack}.0.") and k.endswith("qweight")]
        later = [k for k in a if k.startswith(f"{stack}.1.") and k.endswith("qweight")]
        assert first and all(torch.equal(a[k], b[k]) for k in first)
        assert later and any(not torch.equal(a[k], b[k]) for k in later)


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_smoothing_methods_sequential_equal_whole_model(method):
    """Scales from the same block inputs (bitwise equal weights); static activation ranges observed on the
    smoothed block's replay instead of the smoothed whole model (float tolerance)."""
    from daptq.methods.awq import AWQConfig
    from daptq.methods.smoothquant import SmoothQuantConfig

    config = SmoothQuantConfig(spec=STATIC) if method == "smoothquant" else AWQConfig(spec=STATIC, n_grid=5)
    cal = reference_calibration()
    whole_policy, seq = tiny_reference_policy(), tiny_reference_policy()
    whole_record = quantize_policy(whole_policy, config, cal)
    record = quantize_policy_sequential(seq, config, cal, max_in_memory_bytes=0)
    whole, got = whole_policy.model.state_dict(), seq.model.state_dict()
    assert got.keys() == whole.keys()
    for k in whole:
        if k.endswith(("qweight", "weight_scale")):
            assert torch.equal(got[k], whole[k]), k
        torch.testing.assert_close(got[k].double(), whole[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    key = "smoothing" if method == "smoothquant" else "scaling"
    assert record.decisions[key].keys() == whole_record.decisions[key].keys() and record.decisions[key]
    assert record.decisions["activation_scales"].keys() == whole_record.decisions["activation_scales"].keys()
    assert n_hooks(seq.model) == 0


def test_a_method_without_per_block_calibration_is_refused(monkeypatch):
    from daptq.methods.quantvla import QuantVLA, QuantVLAConfig

    monkeypatch.setattr(QuantVLA, "supports_sequential", lambda self: False)
    policy = tiny_reference_policy()
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    with pytest.raises(ValueError, match="no per-block calibration"):
        quantize_policy_sequential(policy, QuantVLAConfig(), reference_calibration())
    after = policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and n_hooks(policy.model) == 0


def test_a_block_without_a_container_named_by_its_index_is_refused(monkeypatch):
    adapter = tiny_reference_policy().adapter
    modules = adapter.quantizable_modules()
    lone = next(m for m in modules if m.name == "head.action_out")
    lone.block, lone.stack = 7, "dit"
    monkeypatch.setattr(type(adapter), "quantizable_modules", lambda self: modules)
    with pytest.raises(ValueError, match=r"block \('dit', 7\).*override block_modules"):
        adapter.block_modules()
