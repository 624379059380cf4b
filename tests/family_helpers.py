"""Shared pieces of the OpenVLA-OFT and GR00T family tests: the method matrix check on any adapter."""

from __future__ import annotations

from collections.abc import Callable

import torch

from daptq.data.calibration import CalibrationSet
from daptq.methods import quantize_policy
from daptq.methods.scope import DEFAULT_ROLES
from daptq.quant.fake import FLOAT_MODULE_TYPES


def method_configs() -> dict:
    from test_generic_adapter import small_configs

    return small_configs()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


def check_method(
    name: str,
    config,
    make_adapter: Callable[[], object],
    raw_batches: list[dict],
    chunks: Callable[[object], torch.Tensor],
    min_sqnr_db: float,
) -> dict:
    """Run one method on a fresh adapter; check it ran, respected its scope (every declared in-scope module
    quantized or kept float with a reason, per role) and kept the chunk within ``min_sqnr_db`` of FP."""
    adapter = make_adapter()
    declared = {m.name: m.role for m in adapter.quantizable_modules() if m.role in DEFAULT_ROLES}
    fp = chunks(adapter)
    record = quantize_policy(adapter, config, CalibrationSet(raw_batches, {"source": "test"}))
    q = chunks(adapter)
    assert record.modules, f"{name}: quantized nothing"
    kept = record.decisions.get("kept_float", {})
    overlap = set(record.modules) & set(kept)
    assert not overlap, f"{name}: modules both quantized and kept float: {sorted(overlap)[:5]}"
    for role in DEFAULT_ROLES:
        want = sorted(n for n, r in declared.items() if r == role)
        got = sorted(n for n in [*record.modules, *kept] if declared.get(n) == role)
        assert got == want, f"{name}: role {role}: {len(got)} quantized or kept float, {len(want)} declared"
    for n, m in record.modules.items():
        assert m.role == declared[n], f"{name}: {n} recorded as {m.role}, declared {declared[n]}"
        module = adapter.model.get_submodule(n)
        assert type(module) not in FLOAT_MODULE_TYPES, f"{name}: {n} is in the record but still float"
    assert not torch.equal(q, fp), f"{name}: the sampled chunk did not change"
    assert sqnr_db(fp, q) >= min_sqnr_db, f"{name}: SQNR {sqnr_db(fp, q):.1f} dB"
    return {"adapter": adapter, "record": record, "sqnr": sqnr_db(fp, q)}
