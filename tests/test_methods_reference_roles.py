"""Every role of the reference VLA quantizes and runs (the EfficientNet same-padding convs included)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from daptq.methods import Scope, quantize_policy
from daptq.methods.base import forward_batch
from daptq.methods.rtn import RTNConfig
from daptq.models.reference import load_reference_policy
from daptq.quant import QuantConv2d, QuantLinear, QuantSpec, WeightSpec, dequantize_, quantize_, w4a8
from daptq.quant.fake import static_same_padding


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return load_reference_policy("metaworld-mt10")


@pytest.fixture(scope="module")
def batch(reference):
    rng = np.random.default_rng(0)
    raw = {
        "image": rng.integers(0, 255, (2, 96, 96, 3), dtype=np.uint8),
        "state": np.array([[0.0, 0.6, 0.2, 1.0], [0.1, 0.7, 0.1, 0.5]], np.float32),
        "instruction": ["reach the goal", "push the puck to the goal"],
    }
    return next(reference.adapter.calibration_batches(iter([raw])))


@pytest.mark.parametrize("role", ["vision", "language", "backbone", "interface", "action_head"])
def test_each_role_quantizes_and_runs(reference, batch, role):
    policy = copy.deepcopy(reference)
    fp = forward_batch(policy, batch)
    record = quantize_policy(policy, RTNConfig(spec=QuantSpec(WeightSpec(8)), scope=Scope(roles=(role,))))
    assert record.modules and all(m.role == role for m in record.modules.values())
    swapped = [n for n, m in policy.model.named_modules() if isinstance(m, QuantLinear | QuantConv2d)]
    assert sorted(swapped) == sorted(record.modules)
    out = forward_batch(policy, batch)
    assert out.shape == fp.shape and torch.isfinite(out).all()
    assert (out - fp).abs().max() < 0.2  # W8 per-channel: close to full precision, whatever the role


def test_paper_default_w4a8_serves_every_layer_with_recorded_groups(reference, batch):
    policy = copy.deepcopy(reference)
    record = quantize_policy(policy, RTNConfig(spec=w4a8(128), scope=Scope(include_encoders=True)))
    notes = {n: m.note for n, m in record.modules.items() if m.note}
    assert notes["vision_proj"].endswith("per-channel") and notes["head.action_in"].endswith("per-channel")
    assert any(n.startswith("head.") and "group 96" in v for n, v in notes.items())  # DiT fan-in 192
    assert torch.isfinite(forward_batch(policy, batch)).all()


def test_same_padding_conv_keeps_its_padding_and_restores(reference):
    name, conv = next(
        (n, m)
        for n, m in reference.model.named_modules()
        if static_same_padding(m) is not None and isinstance(m.static_padding, nn.ZeroPad2d)
    )
    model = nn.Sequential(copy.deepcopy(conv))
    x = torch.randn(1, conv.in_channels, 48, 48)
    ref = model(x)
    quantize_(model, QuantSpec(WeightSpec(8, granularity="per_tensor", scale_dtype="float32")))
    assert isinstance(model[0], QuantConv2d)
    out = model(x)
    assert out.shape == ref.shape  # without the padding: "tensor a (20) must match (22)"-style mismatches
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    dequantize_(model)
    assert type(model[0]) is type(conv) and torch.equal(model(x), ref), name
