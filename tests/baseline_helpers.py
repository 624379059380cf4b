"""Shared by the SmoothQuant / GPTQ / AWQ tests: a tiny reference VLA, calibration sets, hook checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daptq.data.calibration import CalibrationSet
from daptq.methods import quantize_policy
from daptq.methods.base import forward_batch
from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig
from daptq.models.toy import ToyPolicy
from daptq.quant.fake import QUANT_MODULE_TYPES

TINY = ReferenceVLAConfig(
    image_size=32, d_model=32, n_layer=1, n_head=2, dit_d_model=32, dit_n_layer=1, dit_n_head=2,
    num_inference_steps=4,
)  # fmt: skip
INSTRUCTIONS = ["push the puck to the goal", "open the door", "close the drawer", "reach the red goal"]
PROVENANCE = {"split": "calibration", "action_space": {"names": ["dx", "dy", "dz", "grip"]}}


@pytest.fixture
def single_thread():
    """The policy forwards are tiny: extra threads only contend on a shared machine (7x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_reference_policy(seed: int = 0, config: ReferenceVLAConfig = TINY) -> ReferencePolicy:
    torch.manual_seed(seed)
    model = ReferenceVLA(config)
    with torch.no_grad():  # adaLN-Zero starts the head at zero output: randomize so every layer matters
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    return ReferencePolicy(model)


def reference_calibration(n_batches: int = 2, batch_size: int = 4, seed: int = 0) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    batches = [
        {
            "image": rng.integers(0, 256, (batch_size, TINY.image_size, TINY.image_size, 3), dtype=np.uint8),
            "state": rng.normal(size=(batch_size, 4)).astype(np.float32),
            "instruction": [INSTRUCTIONS[(i + b) % 4] for b in range(batch_size)],
            "actions": rng.uniform(-1, 1, (batch_size, TINY.chunk_size, 4)).astype(np.float32),
        }
        for i in range(n_batches)
    ]
    return CalibrationSet(batches, PROVENANCE)


def daptq_calibration(config: ReferenceVLAConfig, n_batches: int, b: int) -> CalibrationSet:
    """The DA-PTQ tests' data: ``n_batches`` of ``b`` random 32 px frames (seed 0), actions in [-1, 1]."""
    rng = np.random.default_rng(0)
    instructions = [
        "push the puck to the red goal marker",
        "open the door",
        "close the drawer",
        "reach the goal",
    ]
    batches = [
        {
            "image": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
            "state": rng.normal(size=(b, 4)).astype(np.float32),
            "instruction": [instructions[i % 4] for i in range(b)],
            "actions": rng.uniform(-1, 1, (b, config.chunk_size, 4)).astype(np.float32),
        }
        for _ in range(n_batches)
    ]
    return CalibrationSet(batches, {"split": "test", "action_space": {"names": ["dx", "dy", "dz", "grip"]}})


def toy_calibration(n: int = 16) -> CalibrationSet:
    rng = np.random.default_rng(0)
    batch = {
        "state": rng.uniform(-0.2, 0.8, (n, 4)).astype(np.float32),
        "instruction": [INSTRUCTIONS[i % 4] for i in range(n)],
        "actions": rng.uniform(-1, 1, (n, 4, 4)).astype(np.float32),
    }
    return CalibrationSet([batch], PROVENANCE)


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def chunk_error(policy, reference, calibration: CalibrationSet) -> float:
    """Relative error of the quantized policy's action chunks against the float policy's (same noise)."""
    num = den = 0.0
    for batch in policy.adapter.calibration_batches(iter(calibration.batches)):
        a, b = forward_batch(policy, batch), forward_batch(reference, batch)
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return (num / den) ** 0.5


def assert_clean_after_failure(policy, config, calibration: CalibrationSet, fail_on_call: int) -> None:
    """Make the ``fail_on_call``-th policy forward raise inside the method: no hook may remain and the
    model must be exactly as before (quantize_policy is all or nothing)."""
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    calls = {"n": 0}
    adapter = policy.adapter  # methods drive the adapter's forward
    original = adapter.predict_chunk

    def failing(batch, generator=None):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise RuntimeError("forward failed")
        return original(batch, generator=generator)

    adapter.predict_chunk = failing
    try:
        with pytest.raises(RuntimeError, match="forward failed"):
            quantize_policy(policy, config, calibration)
    finally:
        del adapter.predict_chunk
    assert calls["n"] == fail_on_call
    assert n_hooks(policy.model) == 0
    assert not any(isinstance(m, QUANT_MODULE_TYPES) for m in policy.model.modules())
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


__all__ = [
    "TINY",
    "ToyPolicy",
    "assert_clean_after_failure",
    "chunk_error",
    "n_hooks",
    "reference_calibration",
    "single_thread",
    "daptq_calibration",
    "tiny_reference_policy",
    "toy_calibration",
]
