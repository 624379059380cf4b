import pytest
import torch
from torch import nn

from daptq.quant import (
    QuantLinear,
    QuantSpec,
    WeightSpec,
    dequantize_weight,
    fake_quantize_weight,
    quantize_weight,
    quantize_weight_with_qparams,
    sqnr_db,
)


def gaussian_linear(out_f=256, in_f=512, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    return layer


def test_sqnr_w8_per_channel_above_35db():
    layer = gaussian_linear()
    spec = QuantSpec(WeightSpec(8, granularity="per_channel"))
    q = QuantLinear.from_float(layer, spec)
    assert sqnr_db(layer.weight, q.dequantized_weight()) > 35
    x = torch.randn(32, 512)
    assert sqnr_db(layer(x), q(x)) > 35


def test_sqnr_w4_group128_above_15db():
    layer = gaussian_linear()
    spec = QuantSpec(WeightSpec(4, granularity="per_group", group_size=128))
    q = QuantLinear.from_float(layer, spec)
    assert sqnr_db(layer.weight, q.dequantized_weight()) > 15
    x = torch.randn(32, 512)
    assert sqnr_db(layer(x), q(x)) > 15


def test_sqnr_detects_broken_quantization():
    """The metric itself can fail: a wrong weight gives a low SQNR."""
    w = torch.randn(64, 64)
    assert sqnr_db(w, torch.zeros_like(w)) == pytest.approx(0.0)
    assert sqnr_db(w, w) == float("inf")


def test_per_channel_beats_per_tensor_with_outlier_channels():
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.02
    w[::8] *= 50.0  # a few output channels with a much larger range
    per_tensor = fake_quantize_weight(w, WeightSpec(4, granularity="per_tensor"))
    per_channel = fake_quantize_weight(w, WeightSpec(4, granularity="per_channel"))
    assert sqnr_db(w, per_channel) > sqnr_db(w, per_tensor)
    normal = torch.ones(64, dtype=torch.bool)
    normal[::8] = False  # per-tensor scales are set by the outliers, so the ordinary channels round to ~0
    assert sqnr_db(w[normal], per_channel[normal]) > sqnr_db(w[normal], per_tensor[normal]) + 10.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clipping_beats_minmax_at_3_bits(symmetric):
    torch.manual_seed(2)
    w = torch.randn(128, 256)  # Gaussian tails make min-max waste levels on rare outliers
    minmax = fake_quantize_weight(w, WeightSpec(3, symmetric, "per_channel", observer="minmax"))
    mse = fake_quantize_weight(w, WeightSpec(3, symmetric, "per_channel", observer="mse"))
    assert sqnr_db(w, mse) > sqnr_db(w, minmax) + 0.5


def test_percentile_clips_outliers():
    torch.manual_seed(3)
    w = torch.randn(1, 4096)
    w[0, 0] = 100.0
    pct = fake_quantize_weight(
        w, WeightSpec(4, granularity="per_tensor", observer="percentile", percentile=99.9)
    )
    assert pct[0, 0] < 10.0  # the outlier is clipped
    mm = fake_quantize_weight(w, WeightSpec(4, granularity="per_tensor"))
    assert sqnr_db(w[:, 1:], pct[:, 1:]) > sqnr_db(w[:, 1:], mm[:, 1:])


@pytest.mark.parametrize(
    "spec",
    [
        WeightSpec(8),
        WeightSpec(4, granularity="per_group", group_size=32),
        WeightSpec(3, symmetric=False, granularity="per_group", group_size=16),
        WeightSpec(2, granularity="per_tensor"),
    ],
)
def test_quantize_dequantize_is_idempotent(spec):
    """Re-rounding a dequantized weight on its own grid returns the same codes and values."""
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    codes, scale, zp = quantize_weight(w, spec)
    once = dequantize_weight(codes, scale, zp, spec)
    again = quantize_weight_with_qparams(once, scale, zp, spec)
    assert torch.equal(again, codes)
    assert torch.equal(dequantize_weight(again, scale, zp, spec), once)
    if spec.symmetric:  # symmetric min-max grids are also fixed points of re-observation
        assert torch.equal(fake_quantize_weight(once, spec), once)


def test_codes_stay_in_range_and_zero_is_exact():
    torch.manual_seed(5)
    w = torch.rand(16, 64) + 0.1  # all positive: asymmetric grid must still hold 0 exactly
    spec = WeightSpec(4, symmetric=False, granularity="per_group", group_size=16)
    codes, scale, zp = quantize_weight(w, spec)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert torch.equal(
        dequantize_weight(zp.reshape(-1, 1).expand(-1, 16).reshape(16, 64), scale, zp, spec),
        torch.zeros(16, 64),
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights_rejected(bad):
    w = torch.randn(8, 16)
    w[3, 4] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_weight(w, WeightSpec(8))


def test_group_size_must_divide_input_dim():
    with pytest.raises(ValueError, match="does not divide the input dimension 48"):
        quantize_weight(torch.randn(8, 48), WeightSpec(4, granularity="per_group", group_size=32))
