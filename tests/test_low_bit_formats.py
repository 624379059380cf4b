"""Below two bits: ternary and binary weight codebooks (daptq.quant.WeightSpec.codebook) against an
independent numpy reference, their bytes, a save/load round trip, and DA-PTQ `budget` at 1.5 bits."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from daptq.methods import quantize_policy
from daptq.methods.daptq import DAPTQConfig
from daptq.methods.daptq.allocation import SUB2_FORMATS, WeightFormat
from daptq.quant import QuantLinear, QuantSpec, WeightSpec, model_bytes, quantize_
from daptq.quant.bytes import checkpoint_weight_bytes, ideal_weight_bytes
from daptq.quant.fake import dequantize_weight, quantize_weight
from daptq.quant.io import load_quantized, pack_codes, save_quantized, unpack_codes

sys.path.insert(0, str(Path(__file__).parent))
from test_daptq_method import _calibration, _policy  # noqa: E402  (the small reference VLA and its data)


def _spec(codebook: str, group: int | None = 16) -> WeightSpec:
    gran = "per_channel" if group is None else "per_group"
    return WeightSpec(2, granularity=gran, group_size=group, codebook=codebook)


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def reference(w: np.ndarray, codebook: str, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, written out from the papers: TWN (threshold 0.7 mean|w|, scale = mean |w| above it) and
    sign codes with scale mean|w| (XNOR-Net). Returns (codes, dequantized weight)."""
    codes = np.zeros_like(w)
    deq = np.zeros_like(w)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0 : g0 + group].astype(np.float64)
            if codebook == "ternary":
                delta = 0.7 * np.abs(x).mean()
                kept = np.abs(x) > delta
                alpha = np.abs(x[kept]).mean() if kept.any() else 1.0
                c = np.sign(x) * kept
            else:
                alpha = np.abs(x).mean()
                c = np.where(x >= 0, 1.0, -1.0)
            alpha = float(_bf16(np.array([alpha]))[0])  # scales are stored in bf16
            codes[r, g0 : g0 + group] = c
            deq[r, g0 : g0 + group] = c * alpha
    return codes, deq


@pytest.mark.parametrize("codebook", ["ternary", "binary"])
def test_rounding_matches_an_independent_reference(codebook):
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, size=(12, 64)) * 0.05).astype(np.float32)
    w[3, :16] = 0.0  # an all-zero group
    spec = _spec(codebook)
    codes, scale, zp = quantize_weight(torch.from_numpy(w), spec)
    assert zp is None and scale.dtype == torch.bfloat16 and scale.shape == (12, 4)
    ref_codes, ref_deq = reference(w, codebook, 16)
    if codebook == "ternary":
        np.testing.assert_array_equal(codes.numpy(), ref_codes)
        assert set(np.unique(codes.numpy())) == {-1, 0, 1}
    else:
        nonzero = np.ones_like(w, dtype=bool)
        nonzero[3, :16] = False
        np.testing.assert_array_equal(codes.numpy()[nonzero], ref_codes[nonzero])
        assert set(np.unique(codes.numpy())) == {-1, 1}
    deq = dequantize_weight(codes, scale, zp, spec).numpy()
    ok = np.ones_like(w, dtype=bool)
    ok[3, :16] = False  # the zero group: any scale (ternary 1 with codes 0; binary the tiniest scale)
    np.testing.assert_allclose(deq[ok], ref_deq[ok], rtol=0, atol=1e-7)
    assert np.abs(deq[3, :16]).max() < 1e-30


def test_binary_layer_refuses_zero_codes_and_specs_are_validated():
    layer = QuantLinear.from_float(nn.Linear(32, 4), QuantSpec(_spec("binary")))
    codes = layer.qweight.clone()
    codes[0, 0] = 0
    with pytest.raises(ValueError, match="binary codes are -1 or \\+1"):
        layer.set_quantized_weight(codes, layer.weight_scale)
    with pytest.raises(ValueError, match="codebook='ternary' needs bits=2"):
        WeightSpec(4, codebook="ternary")
    with pytest.raises(ValueError, match="codebook must be one of"):
        WeightSpec(2, codebook="quaternary")
    # files written before the field existed stay byte-identical: "uniform" is not written
    assert "codebook" not in WeightSpec(4).to_dict()
    assert WeightSpec.from_dict(_spec("ternary").to_dict()) == _spec("ternary")
    assert _spec("ternary").short() == "Wtern-g16" and _spec("binary", None).short() == "Wbin-c"


@pytest.mark.parametrize(("codebook", "per_byte"), [("ternary", 5), ("binary", 8)])
def test_bytes_count_codes_and_scales(codebook, per_byte):
    spec = _spec(codebook, 64)
    out, fan_in = 24, 192
    expected = math.ceil(out * fan_in / per_byte) + out * (fan_in // 64) * 2  # codes + bf16 scales
    assert ideal_weight_bytes(out, fan_in, spec) == expected == checkpoint_weight_bytes(out, fan_in, spec)
    bits = 8 * expected / (out * fan_in)
    assert bits == pytest.approx({"ternary": 1.6, "binary": 1.0}[codebook] + 16 / 64, abs=0.01)
    model = nn.Sequential(nn.Linear(fan_in, out))
    quantize_(model, QuantSpec(spec))
    report = model_bytes(model)
    assert report.ideal_bytes == report.stored_bytes == expected
    codes = model[0].qweight
    assert pack_codes(codes, spec).numel() == math.ceil(out * fan_in / per_byte)


@pytest.mark.parametrize("codebook", ["ternary", "binary"])
def test_save_load_round_trip(tmp_path, codebook):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 7))  # 40*48 codes: padding in the pack
    specs = {"0": QuantSpec(_spec(codebook, 8)), "2": QuantSpec(_spec(codebook, None))}
    quantize_(model, specs)
    x = torch.randn(5, 40)
    expected = model(x)
    save_quantized(model, tmp_path / "q")
    fresh = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 7))
    load_quantized(fresh, tmp_path / "q")
    assert fresh[0].spec.weight.codebook == codebook
    assert torch.equal(fresh[0].qweight, model[0].qweight) and torch.equal(fresh(x), expected)
    odd = torch.randint(-1, 2, (3, 7), dtype=torch.int8)
    if codebook == "binary":
        odd[odd == 0] = 1
    packed = pack_codes(odd, _spec(codebook, None))
    assert torch.equal(unpack_codes(packed, _spec(codebook, None), (3, 7)), odd)
    with pytest.raises(ValueError, match=f"packed {codebook} codes"):
        unpack_codes(packed[:-1], _spec(codebook, None), (3, 7))


def test_formats_parse_and_order():
    assert WeightFormat.parse("terng64") == WeightFormat(2, 64, "ternary")
    assert WeightFormat.parse("bing128").label == "bing128"
    assert WeightFormat.parse("bing128").weight_spec(WeightSpec(4, symmetric=False)).codebook == "binary"
    with pytest.raises(ValueError, match="weight format"):
        WeightFormat.parse("tern")
    assert DAPTQConfig.budget(formats=("sub2",)).weight_formats() == tuple(
        map(WeightFormat.parse, SUB2_FORMATS)
    )


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_budget_reaches_1_5_bits_on_the_reference_vla(one_thread):
    calib = _calibration(n_batches=2)
    with pytest.raises(ValueError, match="smallest feasible budget"):  # the integer grid alone cannot
        quantize_policy(_policy(), DAPTQConfig.budget(average_bits=1.5, use_csrc=False), calib)
    policy = _policy()
    record = quantize_policy(policy, DAPTQConfig.budget(average_bits=1.5, formats=("sub2",)), calib)
    alloc, formats = record.decisions["allocation"], record.decisions["format_map"]
    assert alloc["average_bits"] <= 1.5 and alloc["total_bytes"] <= alloc["budget_bytes"]
    assert {"terng128", "bing64"} & set(formats.values())  # the sub-2-bit formats are used
    measured = model_bytes(policy.model)
    ideal = sum(r.ideal_bytes for r in measured.rows if r.name in formats)
    assert ideal == alloc["total_bytes"]  # the allocator's bytes are the quantized model's
    for name, label in formats.items():
        module = policy.model.get_submodule(name)
        f = WeightFormat.parse(label)
        assert f.bits == 16 or module.spec.weight.codebook == f.codebook
    batch = next(policy.adapter.calibration_batches(iter(calib.batches)))
    assert torch.isfinite(policy.adapter.predict_chunk(batch, torch.Generator().manual_seed(0))).all()
