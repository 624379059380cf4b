"""A small reference VLA with a randomized head and a calibration set for it, shared by the DA-PTQ tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daptq.data.calibration import CalibrationSet
from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig

INSTRUCTIONS = ["push the puck to the red goal marker", "open the door", "close the drawer", "reach the goal"]


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's cores are shared; torch's thread pool thrashes on them (40x slower here). Import it into
    a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_head_policy(config: ReferenceVLAConfig) -> ReferencePolicy:
    """Seed-0 weights; adaLN-Zero starts the head at zero, so it is randomized for every layer to matter."""
    torch.manual_seed(0)
    model = ReferenceVLA(config)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    return ReferencePolicy(model)


def calibration(config: ReferenceVLAConfig, n_batches: int, b: int) -> CalibrationSet:
    """``n_batches`` raw batches of ``b`` random 32 px frames (seed 0) with actions in [-1, 1]."""
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8),
            "state": rng.normal(size=(b, 4)).astype(np.float32),
            "instruction": [INSTRUCTIONS[i % 4] for i in range(b)],
            "actions": rng.uniform(-1, 1, (b, config.chunk_size, 4)).astype(np.float32),
        }
        for _ in range(n_batches)
    ]
    return CalibrationSet(batches, {"split": "test", "action_space": {"names": ["dx", "dy", "dz", "grip"]}})
