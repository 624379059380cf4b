import pytest
import torch
from torch import nn

from daptq.quant import (
    ActivationSpec,
    QuantLinear,
    QuantSpec,
    WeightSpec,
    calibrate,
    dequantize_,
    fold_affine_,
    quantize_,
    quantized_modules,
    temporarily_quantized,
    w4a8,
    weight_only,
)

STATIC_A8 = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))


def toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_quantize_swaps_layers_and_keeps_float_weights():
    model = toy()
    w0 = model[0].weight.detach().clone()
    specs = quantize_(model, weight_only(4, "per_group", 32))
    assert set(specs) == {"0", "2"}
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert torch.equal(model[0].weight, w0)  # float weight kept for inspection and undo
    assert not torch.equal(model[0].dequantized_weight(), w0)
    dequantize_(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, w0)


def test_static_activation_needs_calibration():
    with pytest.raises(ValueError, match="need calibration data"):
        quantize_(toy(), STATIC_A8)


def test_static_calibration_sets_scales_and_removes_hooks():
    model = toy()
    x = torch.randn(16, 32)
    quantize_(model, STATIC_A8, calibration=[x[:8], x[8:]])
    assert n_hooks(model) == 0
    expected = float(x.abs().max()) / 127
    assert float(model[0].act_scale) == pytest.approx(expected, rel=1e-6)
    assert not model[0].calibrating
    y = model(x)
    assert y.shape == (16, 16)


def test_hooks_removed_when_calibration_raises():
    model = toy()
    quantize_(model, weight_only(8))
    for m in quantized_modules(model).values():  # switch to a static spec without calibrating
        m.spec = STATIC_A8

    def batches():
        yield torch.randn(4, 32)
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader failed"):
        calibrate(model, batches())
    assert n_hooks(model) == 0
    assert all(not m.calibrating for m in quantized_modules(model).values())
    assert model[0].act_scale is None  # nothing half-written
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(torch.randn(2, 32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_calibration_activations_rejected(bad):
    model = toy()
    x = torch.randn(4, 32)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="calibration activation of 0 contains 1 NaN/Inf"):
        quantize_(model, STATIC_A8, calibration=[x])
    assert n_hooks(model) == 0
    assert not quantized_modules(model)  # quantize_ is all or nothing


def test_nan_weight_rejected_and_model_untouched():
    model = toy()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="2.weight contains 1 NaN/Inf"):
        quantize_(model, weight_only(8))
    assert not quantized_modules(model)


def test_group_size_not_dividing_is_reported_with_layer_name():
    with pytest.raises(ValueError, match="0.weight with shape \\(64, 32\\): group_size=64 does not divide"):
        quantize_(toy(), weight_only(4, "per_group", 64))


def test_dynamic_activation_quantization_changes_outputs_slightly():
    model, ref = toy(), toy()
    quantize_(model, QuantSpec(WeightSpec(16), ActivationSpec(8)))  # A8 only: isolates activation rounding
    x = torch.randn(8, 32)
    diff = (model(x) - ref(x)).abs().max()
    assert 0 < diff < 0.05


def test_temporarily_quantized_restores_even_on_error():
    model = toy()
    x = torch.randn(4, 32)
    ref = model(x)
    with temporarily_quantized(model, "0", weight_only(2)) as layer:
        assert model[0] is layer
        assert not torch.allclose(model(x), ref)
    assert type(model[0]) is nn.Linear and torch.equal(model(x), ref)
    with pytest.raises(KeyError):
        with temporarily_quantized(model, "2", weight_only(4)):
            raise KeyError("probe failed")
    assert type(model[2]) is nn.Linear and torch.equal(model(x), ref)


def test_fold_affine_matches_output_transform_and_requantizes():
    torch.manual_seed(1)
    lin = nn.Linear(32, 64)
    x = torch.randn(5, 32)
    M, d = torch.eye(64) + 0.1 * torch.randn(64, 64), torch.randn(64)
    expected = lin(x) @ M.T + d
    fold_affine_(lin, M, d)
    torch.testing.assert_close(lin(x), expected, rtol=1e-5, atol=1e-5)

    model = toy()
    quantize_(model, weight_only(8))
    layer = model[0]
    g = torch.rand(64) + 0.5
    float_out = nn.functional.linear(x, layer.weight, layer.bias) * g
    fold_affine_(layer, g)  # diagonal gains
    # the codes were recomputed from the folded float weight, so the fake-quant output tracks the folded layer
    assert layer.qweight is not None
    rel = (layer(x) - float_out).norm() / float_out.norm()
    assert rel < 1e-2


def test_fold_affine_rejects_bad_shapes():
    with pytest.raises(ValueError, match="M must be"):
        fold_affine_(nn.Linear(4, 8), torch.eye(4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        fold_affine_(nn.Linear(4, 8), torch.full((8,), float("nan")))


def test_set_quantized_weight_installs_external_codes_and_validates():
    model = toy()
    quantize_(model, weight_only(4, "per_group", 16))
    layer = model[0]
    codes = torch.randint(-8, 8, (64, 32), dtype=torch.int8)
    scale = torch.full((64, 2), 0.01, dtype=torch.bfloat16)
    layer.set_quantized_weight(codes, scale)
    torch.testing.assert_close(layer.dequantized_weight(), codes.float() * scale.float()[0, 0])
    with pytest.raises(ValueError, match="scale dtype"):
        layer.set_quantized_weight(codes, scale.float())
    with pytest.raises(ValueError, match="outside"):
        layer.set_quantized_weight(codes * 2, scale)
    with pytest.raises(ValueError, match="scale shape"):
        layer.set_quantized_weight(codes, torch.ones(64, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="zero_point must be given iff"):
        layer.set_quantized_weight(codes, scale, torch.zeros(64, 2))


def test_conv_quantization_and_double_quantize_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 8))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    quantize_(model, w4a8(9))  # conv fan_in = 27 -> groups of 9; linear fan_in = 576 -> 64 groups
    assert (model(x) - ref).norm() / ref.norm() < 0.2
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, weight_only(8))


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="method='rtn'"):
        quantize_(toy(), weight_only(8), method="gptq")


class _ScaledLinear(torch.nn.Linear):
    """A Linear subclass whose forward does more than F.linear: swapping it would drop the scaling."""

    def forward(self, x):
        return 3.0 * super().forward(x)


def test_linear_subclass_overriding_forward_is_refused_not_swapped():
    from daptq.quant import QuantSpec, WeightSpec, quantize_

    model = torch.nn.Sequential(_ScaledLinear(8, 8), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="0: .*_ScaledLinear subclasses Linear and overrides forward"):
        quantize_(model, QuantSpec(WeightSpec(8)))
    assert type(model[0]) is _ScaledLinear and type(model[1]) is torch.nn.Linear


def test_plain_subclass_without_forward_override_is_swapped_and_restored():
    from daptq.quant import QuantLinear, QuantSpec, WeightSpec, dequantize_, quantize_

    class Tagged(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(Tagged(8, 8))
    quantize_(model, QuantSpec(WeightSpec(8)))
    assert isinstance(model[0], QuantLinear)
    dequantize_(model)
    assert type(model[0]) is Tagged
