"""Tiny OpenVLA-OFT models and checkpoint directories for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from daptq.models.openvla_oft.checkpoint import save_oft_checkpoint
from daptq.models.openvla_oft.config import OFTConfig
from daptq.models.openvla_oft.model import OpenVLAOFT


def tiny_statistics(key: str = "libero_spatial_no_noops") -> dict[str, Any]:
    """``dataset_statistics.json`` content (LIBERO-like bounds; the gripper not normalized)."""
    return {
        key: {
            "action": {
                "q01": [-0.7, -0.7, -0.9, -0.1, -0.15, -0.2, -1.0],
                "q99": [0.9, 0.8, 0.9, 0.1, 0.2, 0.2, 1.0],
                "mask": [True, True, True, True, True, True, False],
            },
            "proprio": {
                "q01": [-0.3, -0.3, 0.0, 2.5, -1.0, -0.5, 0.0, -0.04],
                "q99": [0.2, 0.3, 1.2, 3.3, 0.6, 0.5, 0.04, 0.0],
            },
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    }


def tiny_oft(seed: int = 0, **overrides: Any) -> OpenVLAOFT:
    """A tiny random OpenVLA-OFT; the head's output layer is re-drawn larger so actions vary visibly."""
    torch.manual_seed(seed)
    model = OpenVLAOFT(OFTConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.action_head.model.fc2.weight, std=0.3)
    return model


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    from daptq.models.cogact.testing import tiny_tokenizer

    return save_oft_checkpoint(tiny_oft(seed, **overrides), directory, tiny_statistics(), tiny_tokenizer())
