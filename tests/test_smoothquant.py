"""SmoothQuant: scales from activation and weight maxima, folded exactly, and lower W8A8 error on outliers."""

import pytest
import torch
from baseline_helpers import single_thread
from torch import nn

from daptq.methods.smoothquant import smoothquant_scales, weight_absmax_per_input
from daptq.quant import ActivationSpec, QuantLinear, QuantSpec, WeightSpec
from daptq.quant.capture import ChannelStats, capture
from daptq.quant.smoothing import SmoothingGroup, smooth_

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

OUTLIERS = [3, 17, 40]


def outlier_model(seed=0):
    """pre (Linear) produces a few channels 40x larger than the rest, as LLM/VLA activations do."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 48))
    with torch.no_grad():
        model[0].weight[OUTLIERS] *= 40
        model[0].bias[OUTLIERS] += 20
    return model


def test_scales_match_the_formula():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothquant_scales(a, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(smoothquant_scales(a[:2], w[:2], alpha=1.0), a[:2].double())
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(a, w, alpha=1.5)
    with pytest.raises(ValueError, match="equal-length"):
        smoothquant_scales(a, w[:3])


def smoothed_error(alpha, x):
    model = outlier_model()
    with torch.no_grad():
        ref = model(x)
    if alpha is not None:
        stats = ChannelStats()
        capture(model, lambda m: m(x), inputs={"1": stats})
        s = smoothquant_scales(stats.absmax, weight_absmax_per_input([model[1]]), alpha)
        smooth_(model, SmoothingGroup("0", ("1",), "linear"), s)
        with torch.no_grad():  # exact before rounding
            assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-3)
    spec = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="dynamic_per_token"))
    model[1] = QuantLinear.from_float(model[1], spec, "1")
    with torch.no_grad():
        return float((model(x) - ref).norm() / ref.norm())


def test_lowers_activation_quantization_error_on_outlier_channels():
    x = torch.randn(256, 32)
    plain, smoothed = smoothed_error(None, x), smoothed_error(0.5, x)
    assert smoothed < 0.5 * plain
    assert smoothed_error(0.0, x) > smoothed  # alpha matters: 0 migrates nothing of the activation range


# ---- the method -------------------------------------------------------------------------------------------
W8A4 = QuantSpec(WeightSpec(8), ActivationSpec(4))
W8A8_STATIC = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))


def test_method_on_the_reference_vla():
    from baseline_helpers import TINY, chunk_error, n_hooks, reference_calibration, tiny_reference_policy

    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.smoothquant import SmoothQuantConfig

    cal = reference_calibration(n_batches=1)
    fp, sq, rtn = (tiny_reference_policy() for _ in range(3))
    record = quantize_policy(sq, SmoothQuantConfig(spec=W8A4, alpha=0.5), cal)
    quantize_policy(rtn, RTNConfig(spec=W8A4), cal)
    assert n_hooks(sq.model) == 0 and record.method == "smoothquant"
    smoothed = record.decisions["smoothing"]
    assert (
        len(smoothed) == 3 * TINY.n_layer + 3 * TINY.dit_n_layer + 1
        and not record.decisions["skipped_groups"]
    )
    assert all(len(g["scales"]) == 32 and g["min"] > 0 for g in smoothed.values())
    assert all(isinstance(sq.model.get_submodule(n), QuantLinear) for n in record.modules)
    assert chunk_error(sq, fp, cal) < chunk_error(rtn, fp, cal)
    assert type(record).from_json(record.to_json()) == record


def test_static_activation_scales_are_observed_after_smoothing():
    from baseline_helpers import reference_calibration, tiny_reference_policy

    from daptq.methods import quantize_policy
    from daptq.methods.base import forward_batch
    from daptq.methods.smoothquant import SmoothQuantConfig

    cal = reference_calibration(n_batches=1)
    policy = tiny_reference_policy()
    record = quantize_policy(policy, SmoothQuantConfig(spec=W8A8_STATIC), cal)
    name = "blocks.0.attn.qkv"  # smoothed: its input is divided by the scales, so is its activation range
    smoothed_max = record.decisions["activation_scales"][name] * 127
    stats = ChannelStats()
    batches = list(policy.adapter.calibration_batches(iter(cal.batches)))
    capture(policy.model, lambda m: [forward_batch(policy, b) for b in batches], inputs={name: stats})
    assert abs(float(stats.absmax.max()) - smoothed_max) <= 0.05 * smoothed_max


def test_toy_without_groups_and_hooks_gone_after_failure():
    from baseline_helpers import (
        ToyPolicy,
        assert_clean_after_failure,
        reference_calibration,
        tiny_reference_policy,
        toy_calibration,
    )

    from daptq.methods import quantize_policy
    from daptq.methods.smoothquant import SmoothQuantConfig

    toy = ToyPolicy()
    record = quantize_policy(toy, SmoothQuantConfig(spec=W8A4), toy_calibration())
    assert (
        record.decisions["smoothing"] == {}
        and "smoothing_groups() is empty" in record.decisions["skipped_groups"]["*"]
    )
    assert isinstance(toy.net[0], QuantLinear)
    cal = reference_calibration(n_batches=1)
    for fail_on_call in (1, 2):  # during calibrate; during apply's static-activation pass
        assert_clean_after_failure(
            tiny_reference_policy(), SmoothQuantConfig(spec=W8A8_STATIC), cal, fail_on_call
        )
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=2.0)
