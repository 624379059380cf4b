"""DA-PTQ through quantize_policy on a small reference VLA: presets, recorded decisions, CSRC's effect."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from baseline_helpers import daptq_calibration, single_thread, tiny_reference_policy
from torch import nn

from daptq.data.calibration import CalibrationSet
from daptq.methods import config_from_dict, quantize_policy
from daptq.methods.daptq import DAPTQConfig
from daptq.methods.daptq.compensation import output_stats
from daptq.methods.daptq.drift import drift_scores
from daptq.models.reference import ReferencePolicy, ReferenceVLAConfig
from daptq.quant import QuantLinear

pytestmark = pytest.mark.usefixtures(single_thread.__name__)  # one torch thread: the cores are shared

SMALL = ReferenceVLAConfig(
    image_size=32,
    d_model=32,
    n_layer=1,
    n_head=2,
    dit_d_model=32,
    dit_n_layer=3,
    dit_n_head=2,
    num_inference_steps=3,
)


def _policy() -> ReferencePolicy:
    return tiny_reference_policy(config=SMALL)


def _calibration(n_batches: int = 3, b: int = 8) -> CalibrationSet:
    return daptq_calibration(SMALL, n_batches, b)


def _interface_gap(fp: ReferencePolicy, q: ReferencePolicy, calib: CalibrationSet) -> tuple[float, float]:
    """|mu_Q - mu_FP| and ||S_Q - S_FP|| of head.z_proj's output."""
    batches = list(fp.adapter.calibration_batches(iter(calib.batches)))

    def stats(policy):
        def run(_m):
            for i, batch in enumerate(batches):
                policy.predict_chunk(batch, generator=torch.Generator().manual_seed(i))

        return output_stats(policy.model, run, ["head.z_proj"])["head.z_proj"]

    a, b = stats(fp), stats(q)
    return float((a.mean - b.mean).abs().mean()), float(torch.linalg.matrix_norm(a.cov - b.cov))


def test_paper_preset_records_drift_weights_bit_map_and_compensation():
    policy, calib = _policy(), _calibration()
    record = quantize_policy(policy, DAPTQConfig.paper(), calib)
    d = record.decisions
    assert record.method == "daptq"
    scores = d["drift_scores"]
    assert list(scores) == ["dx", "dy", "dz", "grip"] and np.mean(list(scores.values())) == pytest.approx(1.0)
    actions = np.concatenate([b["actions"] for b in calib.batches])
    np.testing.assert_allclose(list(scores.values()), drift_scores(actions, policy.action_space), rtol=1e-12)
    head_layers = [n for n, _ in policy.model.named_modules() if n.startswith("head.") and n != "head.z_proj"]
    head_linear = [n for n in head_layers if isinstance(policy.model.get_submodule(n), nn.Linear)]
    assert set(d["phi"]) == set(head_linear)
    # Last two of the three DiT blocks float; of the other ranked layers, round(0.3 n) stay float.
    assert all(n.startswith(("head.blocks.1.", "head.blocks.2.")) for n in d["float_by_block"])
    ranked = [n for n in head_linear if n not in d["float_by_block"]]
    assert len(d["float_by_rank"]) == int(np.floor(0.3 * len(ranked) + 0.5))
    top = sorted(ranked, key=lambda n: -d["phi"][n])[: len(d["float_by_rank"])]
    assert d["float_by_rank"] == top
    for name, bits in d["bit_map"].items():
        module = policy.model.get_submodule(name)
        if bits == 16:
            assert type(module) is nn.Linear and name in record.decisions["kept_float"]
        else:
            assert isinstance(module, QuantLinear) and module.spec.weight.bits == 4 == bits
            assert module.spec.activation is not None and module.spec.activation.bits == 8
            assert record.modules[name].spec.weight.bits == 4
    assert d["bit_map"]["head.z_proj"] == 4  # the interface is quantized, with CSRC folded in
    assert d["compensation"]["head.z_proj"]["rank"] == 16
    assert any(n.startswith("blocks.") for n in record.modules)  # the paper quantizes the backbone too
    assert not any(n.startswith(("vision.", "language.")) for n in record.modules)  # encoders by flag only
    json.loads(record.to_json())  # everything recorded is JSON


def test_csrc_brings_the_interface_output_closer_to_float():
    calib = _calibration()
    fp = _policy()
    gaps, shapes = {}, {}
    for use_csrc in (False, True):
        q = _policy()
        quantize_policy(q, DAPTQConfig.paper(use_mpa=False, use_csrc=use_csrc, csrc_mode="diagonal"), calib)
        gaps[use_csrc] = _interface_gap(fp, q, calib)
        shapes[use_csrc] = (
            [(n, type(m)) for n, m in q.model.named_modules()],
            [(n, p.shape) for n, p in q.model.named_parameters()],
        )
    assert gaps[True][0] < 0.5 * gaps[False][0]  # the mean is matched (up to the re-rounding)
    assert shapes[True] == shapes[False]  # folded: no extra module or parameter


def test_budget_preset_allocates_under_the_average_bit_budget():
    policy, calib = _policy(), _calibration()
    cfg = DAPTQConfig.budget(average_bits=3.5)
    record = quantize_policy(policy, cfg, calib)
    alloc = record.decisions["allocation"]
    assert alloc["average_bits"] <= 3.5 and alloc["total_bytes"] <= alloc["budget_bytes"]
    bits = record.decisions["bit_map"]
    assert any(n.startswith("blocks.") for n in bits)  # whole model: backbone included
    assert len(set(bits.values())) > 1  # mixed precision
    for name, b in bits.items():
        module = policy.model.get_submodule(name)
        assert (type(module) is nn.Linear) if b == 16 else (module.spec.weight.bits == b)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_budget_with_gptq_rounding_and_impossible_budget():
    policy, calib = _policy(), _calibration(n_batches=2)
    record = quantize_policy(policy, DAPTQConfig.budget(average_bits=4.5, rounding="gptq"), calib)
    assert record.decisions["rounding"] == "gptq"
    layers = {n: m for n, m in policy.model.named_modules() if isinstance(m, QuantLinear)}
    assert "head.z_proj" in layers  # 4.5 bits: the interface is quantized, compensated, then GPTQ-rounded

    def rtn_codes(layer):
        ref = QuantLinear.from_float(nn.Linear(layer.in_features, layer.out_features), layer.spec)
        with torch.no_grad():
            ref.weight.copy_(layer.weight)  # the (folded) float weight
        ref.requantize()
        return ref.qweight

    differs = {n for n, m in layers.items() if not torch.equal(m.qweight, rtn_codes(m))}
    assert "head.z_proj" in differs and len(differs) >= len(layers) // 2  # GPTQ, not RTN, rounded them
    before = {k: v.clone() for k, v in _policy().model.state_dict().items()}
    fresh = _policy()
    with pytest.raises(ValueError, match="smallest feasible budget"):
        quantize_policy(fresh, DAPTQConfig.budget(average_bits=1.0), calib)
    for k, v in fresh.model.state_dict().items():  # all or nothing
        torch.testing.assert_close(v, before[k])


def test_unknown_interface_layer_is_named():
    with pytest.raises(ValueError, match=r"interface_layers \['head.nope'\] are not modules"):
        quantize_policy(_policy(), DAPTQConfig.paper(interface_layers=("head.nope",)), _calibration(1, 2))


def test_config_validation_names_the_problem():
    assert DAPTQConfig.budget(average_bits=2.5, group_size=64).spec.weight.group_size == 64
    with pytest.raises(ValueError, match="keep_float_fraction"):
        DAPTQConfig.paper(keep_float_fraction=1.5)
    with pytest.raises(ValueError, match="exactly one of average_bits, budget_bytes"):
        DAPTQConfig(preset="budget")
    with pytest.raises(ValueError, match="bits must be distinct"):
        DAPTQConfig.budget(bits=(1, 4))
    with pytest.raises(ValueError, match="g_min"):
        DAPTQConfig.paper(g_min=2.0)


def test_avg_bits_option_selects_the_budget_preset():
    from daptq.methods.workflow import config_from_options

    config = config_from_options("daptq", avg_bits=2.5)
    assert config.preset == "budget" and config.average_bits == 2.5
    assert config == DAPTQConfig.budget(average_bits=2.5)
    with pytest.raises(ValueError, match="budget preset"):
        config_from_options("daptq", w_bits=4, avg_bits=3.0)
    with pytest.raises(ValueError, match="no bit budget"):
        config_from_options("rtn", avg_bits=3.0)


def test_budget_over_grouped_formats_quantizes_each_layer_with_its_chosen_group():
    from daptq.methods.daptq.allocation import GROUPED_FORMATS, WeightFormat

    policy, calib = _policy(), _calibration(n_batches=2)
    cfg = DAPTQConfig.budget(average_bits=2.8, formats=GROUPED_FORMATS, use_csrc=False)
    record = quantize_policy(policy, cfg, calib)
    alloc, formats = record.decisions["allocation"], record.decisions["format_map"]
    assert alloc["average_bits"] <= 2.8 and alloc["total_bytes"] <= alloc["budget_bytes"]
    assert set(formats.values()) <= set(GROUPED_FORMATS) and len(set(formats.values())) > 1
    for name, label in formats.items():
        f, module = WeightFormat.parse(label), policy.model.get_submodule(name)
        if f.bits == 16:
            assert type(module) is nn.Linear
            continue
        w = module.spec.weight
        assert w.bits == f.bits and not w.symmetric
        fan_in = module.weight[0].numel()
        if f.group_size is None or f.group_size > fan_in:  # groups wider than the row: per-channel
            assert w.granularity == "per_channel"
        else:  # the largest divisor of the fan-in up to the format's group (the scope's default rule)
            assert w.group_size == max(g for g in range(2, f.group_size + 1) if fan_in % g == 0)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bits or formats, not both"):
        DAPTQConfig.budget(bits=(2, 4, 16), formats=("2g32", "16"))
    with pytest.raises(ValueError, match="weight format"):
        DAPTQConfig.budget(formats=("2",))
