"""Packed CPU kernels against the fake-quant reference.

Tolerances (relative max-abs error, max|y - ref| / max|ref|):
- int8 dynamic (torch._int_mm): 1e-5 (exact integer products, fp32 rescale)
- int8 / int4 weight-only with fp32 activations: 1e-5
- int8 / int4 weight-only with bf16 activations: 1e-2 (input and output rounded to bf16, 8-bit mantissa)
"""

import logging

import pytest
import torch
from torch import nn

from daptq.quant import (
    ActivationSpec,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    QuantSpec,
    WeightSpec,
    quantize_,
    to_deployable_,
    w4a8,
    weight_only,
)


def toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))


def rel_err(y, ref):
    y, ref = y.detach().float(), ref.detach().float()
    return float((y - ref).abs().max() / ref.abs().max())


CASES = [
    (QuantSpec(WeightSpec(8), ActivationSpec(8)), Int8DynamicLinear, "bfloat16", 1e-5),
    (
        QuantSpec(WeightSpec(8, granularity="per_tensor"), ActivationSpec(8)),
        Int8DynamicLinear,
        "bfloat16",
        1e-5,
    ),
    (weight_only(8), Int8WeightOnlyLinear, "float32", 1e-5),
    (weight_only(8), Int8WeightOnlyLinear, "bfloat16", 1e-2),
    (weight_only(4, "per_group", 32), Int4WeightOnlyLinear, "float32", 1e-5),
    (QuantSpec(WeightSpec(4, False, "per_group", 64)), Int4WeightOnlyLinear, "float32", 1e-5),
    (weight_only(4, "per_group", 32), Int4WeightOnlyLinear, "bfloat16", 1e-2),
    (
        QuantSpec(WeightSpec(4, False, "per_group", 64, observer="mse")),
        Int4WeightOnlyLinear,
        "bfloat16",
        1e-2,
    ),
    # full-range symmetric grids use code -8: the int4 kernel stores it as unsigned 0, int8 as -128
    (QuantSpec(WeightSpec(4, granularity="per_group", group_size=32, symmetric_range="full")),) * 1
    + (Int4WeightOnlyLinear, "float32", 1e-5),
    (QuantSpec(WeightSpec(4, granularity="per_group", group_size=32, symmetric_range="full_exact")),) * 1
    + (Int4WeightOnlyLinear, "float32", 1e-5),
    (QuantSpec(WeightSpec(8, symmetric_range="full")),) * 1 + (Int8WeightOnlyLinear, "float32", 1e-5),
]


@pytest.mark.parametrize(("spec", "kind", "compute", "tol"), CASES)
def test_packed_matches_fake_quant(spec, kind, compute, tol):
    model = toy()
    quantize_(model, spec)
    x = torch.randn(3, 7, 128)  # 3-D input: batch x tokens x features
    ref = model(x)
    report = to_deployable_(model, strict=True, compute_dtype=compute)
    assert report.converted == ["0", "2"] and not report.kept
    assert isinstance(model[0], kind) and isinstance(model[2], kind)
    y = model(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert rel_err(y, ref) < tol


def test_int8_dynamic_single_token_batch():
    model = toy()
    quantize_(model, QuantSpec(WeightSpec(8), ActivationSpec(8)))
    x = torch.randn(1, 128)
    ref = model(x)
    to_deployable_(model, strict=True)
    assert rel_err(model(x), ref) < 1e-5


def test_int4_kernel_is_real_low_bit_storage():
    model = toy()
    quantize_(model, weight_only(4, "per_group", 32))
    to_deployable_(model)
    packed = model[0].packed_weight
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 128 // 2


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (weight_only(3, "per_group", 32), "3-bit weights: no packed kernel"),
        (QuantSpec(WeightSpec(8, symmetric=False), ActivationSpec(8)), "asymmetric int8"),
        (weight_only(4, "per_group", 16), "group size in"),
        (weight_only(4, "per_channel"), "group size in"),
        (w4a8(32), "no W4A8 kernel"),
        (QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor")), "static per-tensor"),
    ],
)
def test_unsupported_specs_are_kept_with_reason(spec, reason, caplog):
    model = toy()
    quantize_(model, spec, calibration=[torch.randn(4, 128)])
    x = torch.randn(4, 128)
    ref = model(x)
    with caplog.at_level(logging.WARNING, logger="daptq.quant.kernels"):
        report = to_deployable_(model)
    assert report.kept == ["0", "2"] and not report.converted
    assert all(reason in r.reason for r in report.rows)
    assert reason in caplog.text
    assert torch.equal(model(x), ref)  # kept layers are untouched fake-quant
    with pytest.raises(ValueError, match="layers without a packed kernel"):
        to_deployable_(model, strict=True)


def test_conv_and_odd_out_features_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 36, 10))
    quantize_(model, weight_only(8))
    report = to_deployable_(model)
    assert report.kept == ["0"] and report.converted == ["2"]  # int8 weight-only has no N % 16 constraint
    model = nn.Sequential(nn.Linear(64, 10))
    quantize_(model, weight_only(4, "per_group", 32))
    assert "out_features % 16" in to_deployable_(model).rows[0].reason


def test_bad_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype"):
        to_deployable_(toy(), compute_dtype="float16")


def test_cost_model_keeps_float_where_the_packed_kernel_loses():
    """A synthetic cost table: layer 0's packed kernel pays, layer 2's does not (fp32 on its dequantized
    weight, the fake-quant numbers); each decision is reported with both times; an unmeasured shape is an
    error naming the layer."""
    from daptq.quant.kernels import FloatWeightLinear, LayerCost, cost_key, record_layer_rows

    model = toy()
    quantize_(model, weight_only(4, "per_group", 32))
    x = torch.randn(5, 128)
    rows = record_layer_rows(model, lambda: model(x))
    assert rows == {"0": 5, "2": 5}
    with torch.no_grad():
        ref = model(x)
    table = {
        cost_key("int4_weight_only", 5, model[0], "float32"): LayerCost(packed_s=1e-4, float_s=2e-4),
        cost_key("int4_weight_only", 5, model[2], "float32"): LayerCost(packed_s=3e-4, float_s=2e-4),
    }
    with pytest.raises(ValueError, match="^2: no measured cost"):
        to_deployable_(_copy(model), compute_dtype="float32", cost_model=table, rows={"0": 5})
    report = to_deployable_(model, compute_dtype="float32", cost_model=table, rows=rows)
    assert isinstance(model[0], Int4WeightOnlyLinear) and isinstance(model[2], FloatWeightLinear)
    assert report.packed == ["0"] and report.converted == ["0", "2"]
    why = {r.name: r.reason for r in report.rows}
    assert "packed 0.100 ms vs float 0.200 ms at 5 rows" in why["0"]
    assert "packed 0.300 ms" in why["2"] and "does not pay" in why["2"]
    assert {r.name: r.kernel for r in report.rows}["2"] == "float_dequantized"
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-5


def test_measured_cost_model_covers_every_weight_only_shape():
    from daptq.quant.kernels import measure_cost_model

    model = toy()
    quantize_(model, weight_only(4, "per_group", 32))
    table = measure_cost_model(model, {"0": 3, "2": 3}, "bfloat16", repeats=1)
    assert {k[:4] for k in table} == {("int4_weight_only", 3, 128, 64), ("int4_weight_only", 3, 64, 32)}
    assert all(c.packed_s > 0 and c.float_s > 0 for c in table.values())
    report = to_deployable_(model, cost_model=table, rows={"0": 3, "2": 3})
    assert all("cost model: packed" in r.reason for r in report.rows)


def _copy(model):
    import copy

    return copy.deepcopy(model)
