"""SmoothQuant: scales from activation and weight maxima, folded exactly, and lower W8A8 error on outliers."""

import pytest
import torch
from torch import nn

from daptq.methods.smoothquant import smoothquant_scales, weight_absmax_per_input
from daptq.quant import ActivationSpec, QuantLinear, QuantSpec, WeightSpec
from daptq.quant.capture import ChannelStats, capture
from daptq.quant.smoothing import SmoothingGroup, smooth_

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
