"""Per-denoising-step static activation scales (daptq.methods.step_scales) on the reference VLA's head."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import reference_calibration, single_thread, tiny_reference_policy  # noqa: F401

from daptq.methods import quantize_policy
from daptq.methods.base import forward_batch
from daptq.methods.gptq import GPTQConfig
from daptq.methods.rtn import RTNConfig
from daptq.methods.step_scales import install_step_scales, installed_step_scales
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

# 8-bit weights, 4-bit static per-tensor activations: the activation grid is what is measured
W8A4_STATIC = QuantSpec(WeightSpec(8, granularity="per_channel"), ActivationSpec(4, mode="static_per_tensor"))


def _chunks(policy, calibration):
    batches = policy.adapter.calibration_batches(iter(calibration.batches))
    return torch.cat([forward_batch(policy.adapter, b, seed=i) for i, b in enumerate(batches)])


def test_the_reference_adapter_says_which_step_runs(single_thread):  # noqa: F811
    policy = tiny_reference_policy()
    adapter = policy.adapter
    seen: list = []
    handle = adapter.denoising_step_hook(seen.append)
    batch = next(adapter.calibration_batches(iter(reference_calibration(n_batches=1).batches)))
    forward_batch(adapter, batch)
    n = adapter.denoising_steps()
    assert seen == [x for i in range(n) for x in (i, None)]  # step i before the head, None after it
    seen.clear()
    adapter.objective(batch, generator=torch.Generator().manual_seed(0))  # random noise levels
    assert seen == [None, None]
    handle.remove()
    forward_batch(adapter, batch)
    assert seen == [None, None]


def test_per_step_scales_differ_and_reduce_chunk_error(single_thread):  # noqa: F811
    calibration, held_out = reference_calibration(4, 4, seed=0), reference_calibration(2, 4, seed=1)
    fp = _chunks(tiny_reference_policy(), held_out)
    errors, records = {}, {}
    for step_scales in (False, True):
        policy = tiny_reference_policy()
        records[step_scales] = quantize_policy(
            policy, RTNConfig(spec=W8A4_STATIC, step_scales=step_scales), calibration
        )
        errors[step_scales] = float((_chunks(policy, held_out) - fp).norm() / fp.norm())
    recorded = records[True].decisions["step_scales"]
    shared = records[True].decisions["activation_scales"]
    assert set(recorded) <= {n for n in shared if n.startswith("head.")}  # the head's layers only
    moving = [n for n, e in recorded.items() if len(set(e["scales"])) > 1]
    assert "head.action_in" in moving and len(moving) >= 5
    for name in moving:  # the shared scale is the widest step's
        assert max(recorded[name]["scales"]) == pytest.approx(shared[name])
    # measured at this seed: 0.756 with one shared scale, 0.620 with per-step scales
    assert errors[True] < 0.9 * errors[False]


def test_per_step_scales_save_load_and_rest_at_the_shared_scale(tmp_path, single_thread):  # noqa: F811
    from daptq.models.quantized import load_quantized_policy, model_digest, save_quantized_policy

    calibration = reference_calibration(n_batches=2)
    policy = tiny_reference_policy()
    base = {"spec": "tiny-ref", "digest": model_digest(policy.model)}
    record = quantize_policy(
        policy, RTNConfig(spec=W8A4_STATIC, step_scales=True), calibration, base_model=base
    )
    layer = policy.model.head.action_in
    assert float(layer.act_scale) == record.decisions["activation_scales"]["head.action_in"]  # at rest
    out = save_quantized_policy(
        policy, record, tmp_path / "q", "tiny-ref", self_contained=True, base_factory=tiny_reference_policy
    )
    loaded = load_quantized_policy(out, base_factory=tiny_reference_policy)
    assert set(installed_step_scales(loaded.model)) == set(record.decisions["step_scales"])
    assert torch.equal(_chunks(loaded, calibration), _chunks(policy, calibration))
    # without the per-step scales the loaded model would differ: they are what it runs with
    from daptq.methods.step_scales import remove_step_scales

    remove_step_scales(loaded.model)
    assert not torch.equal(_chunks(loaded, calibration), _chunks(policy, calibration))


def test_gptq_has_the_option_too(single_thread):  # noqa: F811
    calibration = reference_calibration(n_batches=2)
    policy = tiny_reference_policy()
    record = quantize_policy(policy, GPTQConfig(spec=W8A4_STATIC, step_scales=True), calibration)
    assert "head.action_in" in record.decisions["step_scales"]
    assert set(installed_step_scales(policy.model)) == set(record.decisions["step_scales"])
    with pytest.raises(ValueError, match="not available with sequential"):
        GPTQConfig(spec=W8A4_STATIC, step_scales=True, sequential=True)


def test_clear_errors():
    from daptq.models.registry import load_policy

    calibration = reference_calibration(n_batches=1)
    dynamic = QuantSpec(WeightSpec(8), ActivationSpec(4))
    with pytest.raises(ValueError, match="step_scales=True needs static activation scales"):
        quantize_policy(tiny_reference_policy(), RTNConfig(spec=dynamic, step_scales=True), calibration)
    toy = load_policy("toy")
    from baseline_helpers import toy_calibration

    with pytest.raises(ValueError, match="'denoising_steps' capability"):
        quantize_policy(toy, RTNConfig(spec=W8A4_STATIC, step_scales=True), toy_calibration())
    policy = tiny_reference_policy()
    quantize_policy(policy, RTNConfig(spec=W8A4_STATIC), calibration)
    with pytest.raises(ValueError, match="the adapter runs 4 steps"):
        install_step_scales(policy.adapter, {"head.action_in": (torch.ones(3), None)})
    with pytest.raises(ValueError, match="not a layer with static activation scales"):
        install_step_scales(policy.adapter, {"head.final_norm": (torch.ones(4), None)})


def test_daptq_budget_takes_per_step_scales_on_its_allocation(tmp_path, single_thread):  # noqa: F811
    """DA-PTQ observes per-step ranges after allocating, rounding and compensating; they reload with it."""
    import dataclasses

    from daptq.methods.daptq.config import DAPTQConfig, budget_spec
    from daptq.models.quantized import load_quantized_policy, model_digest, save_quantized_policy

    calibration = reference_calibration(n_batches=2)
    spec = budget_spec(activation_bits=4)
    static = dataclasses.replace(
        spec, activation=ActivationSpec(4, symmetric=False, mode="static_per_tensor")
    )
    records = {}
    for step_scales in (False, True):
        policy = tiny_reference_policy()
        base = {"spec": "tiny-ref", "digest": model_digest(policy.model)}
        config = DAPTQConfig.budget(
            average_bits=4.0, spec=static, sensitivity_batches=2, step_scales=step_scales
        )
        records[step_scales] = quantize_policy(policy, config, calibration, base_model=base)
    record = records[True]
    recorded = record.decisions["step_scales"]
    assert "step_scales" not in records[False].decisions
    assert recorded and all(n.startswith("head.") for n in recorded)
    assert any(len(set(e["scales"])) > 1 for e in recorded.values())  # ranges move with the noise level
    assert record.decisions["bit_map"] == records[False].decisions["bit_map"]  # the allocation is unchanged
    out = save_quantized_policy(
        policy, record, tmp_path / "q", "tiny-ref", self_contained=True, base_factory=tiny_reference_policy
    )
    loaded = load_quantized_policy(out, base_factory=tiny_reference_policy)
    assert set(installed_step_scales(loaded.model)) == set(recorded)
    assert torch.equal(_chunks(loaded, calibration), _chunks(policy, calibration))
    with pytest.raises(ValueError, match="step_scales=True needs static activation scales"):
        quantize_policy(
            tiny_reference_policy(),
            DAPTQConfig.budget(average_bits=4.0, spec=spec, sensitivity_batches=2, step_scales=True),
            calibration,
        )
