"""DA-PTQ `budget` on the tiny GR00T: the category-specific layers (a registered quantized type) are allocated
like every other layer, their bytes inside the budget and their sensitivity priced, instead of being rounded
after the allocation at the base spec (which left their bytes out of the budget)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from daptq.data.calibration import CalibrationSet
from daptq.methods import quantize_policy
from daptq.methods.daptq import DAPTQConfig
from daptq.quant.bytes import model_bytes
from daptq.quant.category import QuantCategorySpecificLinear

sys.path.insert(0, str(Path(__file__).parent))
from baseline_helpers import single_thread  # noqa: E402
from test_family_gr00t import CSL, _adapter, _chunks, _raw  # noqa: E402  (the tiny GR00T and its data)

pytestmark = pytest.mark.usefixtures(single_thread.__name__)  # one torch thread: the cores are shared


def test_budget_allocates_category_specific_layers_within_the_budget():
    adapter = _adapter()
    fp = _chunks(adapter)
    cfg = DAPTQConfig.budget(
        average_bits=4.0,
        sensitivity_batches=2,
        use_csrc=False,
        activation_choices=(8, 16),
        activation_mode="static_per_tensor",
        latency_weight=1e4,  # every layer's input at 8 bits
    )
    record = quantize_policy(adapter, cfg, CalibrationSet([_raw(100 + i) for i in range(2)], {"source": "t"}))
    csl = [f"action_head.{n}" for n in CSL]
    alloc, bit_map = record.decisions["allocation"], record.decisions["bit_map"]
    for n in csl:
        costs = alloc["costs"][n]  # priced: a Fisher cost per width, larger at fewer bits
        assert "16/a8" not in costs  # no float-weight candidate for a registered type
        assert costs["2/a8"] > costs["4/a8"] > costs["8/a8"] > 0
        assert alloc["activation_costs"][n]["a8"] > 0
        module = adapter.model.get_submodule(n)
        assert isinstance(module, QuantCategorySpecificLinear)
        assert module.spec.weight.bits == bit_map[n]
        assert module.spec.activation.bits == 8 and module.spec.activation.mode == "dynamic_per_token"
        assert "allocated by DA-PTQ budget" in record.decisions["registered_types"][n]
        assert record.modules[n].spec == module.spec
    # the budget counts every allocated layer's bytes, the category-specific ones included
    rows = {r.name: r for r in model_bytes(adapter.model).rows}
    assert alloc["total_bytes"] == sum(rows[n].ideal_bytes for n in bit_map if bit_map[n] != 16) + sum(
        rows[n].fp16_bytes for n in bit_map if bit_map[n] == 16
    )
    assert alloc["average_bits"] <= 4.0
    n_weights = sum(rows[n].n_weights for n in bit_map)
    assert alloc["average_bits"] == pytest.approx(8 * alloc["total_bytes"] / n_weights)
    assert any(rows[n].n_weights for n in csl)
    # a static activation scale where the type allows one, per-token on the category-specific layers
    others = [n for n in bit_map if n not in csl and bit_map[n] != 16]
    assert others and all(adapter.model.get_submodule(n).act_scale is not None for n in others)
    q = _chunks(adapter)
    assert torch.isfinite(q).all() and not torch.equal(q, fp)
