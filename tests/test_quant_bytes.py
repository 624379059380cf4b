import pytest
import torch
from torch import nn

from daptq.quant import (
    QuantSpec,
    WeightSpec,
    ideal_weight_bytes,
    model_bytes,
    quantize_,
    to_deployable_,
    weight_only,
)


def test_w4_group128_ideal_bytes_formula():
    spec = WeightSpec(4, granularity="per_group", group_size=128)  # bf16 scales
    n = 4096 * 4096
    assert ideal_weight_bytes(4096, 4096, spec) == n // 2 + (n // 128) * 2
    assert ideal_weight_bytes(4096, 4096, spec) / (n * 2) <= 0.27
    asym = WeightSpec(4, False, "per_group", 128)
    assert ideal_weight_bytes(4096, 4096, asym) == n // 2 + (n // 128) * 2 + (n // 128) // 2
    assert ideal_weight_bytes(64, 64, WeightSpec(16)) == 64 * 64 * 2
    assert (
        ideal_weight_bytes(64, 64, WeightSpec(3, granularity="per_tensor", scale_dtype="float32")) == 1536 + 4
    )


def test_model_bytes_rows_and_totals_float_fake_and_packed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    report = model_bytes(model)
    assert [r.kind for r in report.rows] == ["float", "float"]
    assert report.stored_bytes == (256 * 64 + 64 * 32) * 4  # fp32 weights as they are
    assert report.fp16_bytes == (256 * 64 + 64 * 32) * 2

    quantize_(model, weight_only(4, "per_group", 32))
    report = model_bytes(model)
    row = report.rows[0]
    assert row.kind == "fake-quant" and row.shape == (64, 256)
    assert row.ideal_bytes == 64 * 256 // 2 + 64 * 8 * 2
    assert row.stored_bytes == row.ideal_bytes  # nibble-packed codes + bf16 scales
    assert row.bias_bytes == 64 * 4
    assert report.ideal_bytes == sum(r.ideal_bytes for r in report.rows)

    to_deployable_(model)
    packed = model_bytes(model).rows[0]
    assert packed.kind == "Int4WeightOnlyLinear"
    assert packed.stored_bytes == 64 * 256 // 2 + 64 * 8 * 2 * 2  # tinygemm keeps a bf16 zero per group too
    assert packed.ideal_bytes == row.ideal_bytes


def test_report_serializes_and_prints():
    model = nn.Sequential(nn.Linear(32, 16))
    quantize_(model, QuantSpec(WeightSpec(8)))
    report = model_bytes(model)
    d = report.to_dict()
    assert d["total"]["ideal_bytes"] == 32 * 16 + 16 * 2
    md = report.to_markdown()
    assert "| 0 | fake-quant | (16, 32) | W8c-sym-minmax |" in md and "**total**" in md


@pytest.mark.parametrize("bits,container", [(2, 4), (3, 2), (8, 1)])
def test_stored_bytes_use_checkpoint_containers(bits, container):
    model = nn.Sequential(nn.Linear(64, 16))
    quantize_(model, weight_only(bits))
    row = model_bytes(model).rows[0]
    assert row.stored_bytes == 16 * 64 // container + 16 * 2
