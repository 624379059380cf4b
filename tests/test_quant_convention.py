"""Symmetric grid conventions (restricted / full / full_exact) against a float64 textbook computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daptq.quant import QuantLinear, QuantSpec, WeightSpec, fake_quantize_weight, quantize_weight
from daptq.quant.io import pack_codes, unpack_codes


def textbook(w: np.ndarray, bits: int, group: int, convention: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-group symmetric fake quantization in float64, written from the definitions, and a mask of the
    elements on a rounding tie ("full" puts the extremes exactly n - 0.5 steps out), where float32
    arithmetic may legitimately round to either neighbour."""
    n = 2 ** (bits - 1)
    out = np.empty_like(w, dtype=np.float64)
    ties = np.zeros(w.shape, dtype=bool)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0 : g0 + group].astype(np.float64)
            lo, hi = x.min(), x.max()
            amax = max(abs(lo), abs(hi))
            if convention == "restricted":
                s = amax / (n - 1)
            elif convention == "full":
                s = amax / (n - 0.5)
            else:
                s = max(max(-lo, 0.0) / n, max(hi, 0.0) / (n - 1))
            s = s if s > 0 else 1.0
            t = x / s
            q = np.clip(np.round(t), -n, n - 1)
            out[r, g0 : g0 + group] = q * s
            ties[r, g0 : g0 + group] = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4
    return out, ties


@pytest.mark.parametrize("convention", ["restricted", "full", "full_exact"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_textbook(convention, bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    spec = WeightSpec(
        bits, granularity="per_group", group_size=32, scale_dtype="float32", symmetric_range=convention
    )
    ours = fake_quantize_weight(w, spec).double().numpy()
    ref, ties = textbook(w.numpy(), bits, 32, convention)
    np.testing.assert_allclose(ours[~ties], ref[~ties], rtol=1e-5, atol=1e-6)
    step = np.abs(ours - ref)[ties]
    assert ties.sum() <= 2 * 16 * 2  # at most the two extremes of each group
    assert np.all((step < 1e-6) | (np.abs(step - np.abs(w.numpy()[ties]) / (2**bits / 2 - 0.5)) < 1e-3))


def test_full_range_uses_code_minus_n_and_restricted_does_not():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        n = 2 ** (bits - 1)
        restricted, _, _ = quantize_weight(w, WeightSpec(bits, granularity="per_group", group_size=32))
        full, _, _ = quantize_weight(
            w, WeightSpec(bits, granularity="per_group", group_size=32, symmetric_range="full")
        )
        assert int(restricted.min()) == -(n - 1) and int(full.min()) == -n
        assert len(torch.unique(full)) == 2**bits  # W2 full range is 4 levels, not ternary


def test_code_minus_n_survives_packing_and_layers():
    spec = WeightSpec(4, granularity="per_group", group_size=16, symmetric_range="full")
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    codes, scale, zp = quantize_weight(w, spec)
    assert int(codes.min()) == -8
    assert torch.equal(unpack_codes(pack_codes(codes, spec), spec, tuple(codes.shape)), codes)
    layer = QuantLinear.from_float(torch.nn.Linear(32, 8), QuantSpec(spec))
    layer.set_quantized_weight(codes, scale, zp)  # -8 is a valid code


def test_full_range_lowers_gaussian_error_at_low_bits():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))

    def mse(bits, convention):
        spec = WeightSpec(bits, granularity="per_group", group_size=32, symmetric_range=convention)
        return float((fake_quantize_weight(w, spec) - w).pow(2).mean())

    assert mse(2, "full") < 0.7 * mse(2, "restricted")
    assert mse(4, "full") < mse(4, "restricted")


def test_convention_validation_and_round_trip():
    with pytest.raises(ValueError, match="symmetric_range must be one of"):
        WeightSpec(4, symmetric_range="wide")
    with pytest.raises(ValueError, match="symmetric grids only"):
        WeightSpec(4, symmetric=False, symmetric_range="full")
    spec = QuantSpec(WeightSpec(4, symmetric_range="full_exact"))
    assert QuantSpec.from_dict(spec.to_dict()) == spec and "symfullx" in spec.short()
    assert QuantSpec.from_dict({"weight": {"bits": 4}}).weight.symmetric_range == "restricted"  # old files


def test_full_matches_torchao_symmetric_on_the_same_layer():
    """An independent implementation: torchao's MappingType.SYMMETRIC int4 (quant range -8..7), stored once
    by tests/data/make_torchao_grid.py (torchao is not installed: importing it prints warnings)."""
    from pathlib import Path

    from safetensors.torch import load_file

    ref = load_file(str(Path(__file__).parent / "data" / "torchao_int4_grid.safetensors"))
    w, scale, codes_ref = ref["weight"], ref["scale"], ref["codes"]
    spec = WeightSpec(
        4, granularity="per_group", group_size=32, scale_dtype="float32", symmetric_range="full"
    )
    codes, ours, _ = quantize_weight(w, spec)
    assert torch.allclose(ours, scale.reshape(ours.shape), rtol=1e-6)
    differ = codes.int() != codes_ref.int()
    steps = (w / ours.repeat_interleave(32, dim=1)).abs()
    assert differ.float().mean() < 0.01
    assert ((steps[differ] - 7.5).abs() < 1e-4).all()  # only the group extremes, which sit on a tie
