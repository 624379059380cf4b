"""Tiny GR00T models and checkpoint directories for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from daptq.models.gr00t.checkpoint import save_gr00t_checkpoint
from daptq.models.gr00t.config import Gr00tConfig
from daptq.models.gr00t.model import Gr00tN1
from daptq.quant.category import CategorySpecificLinear


def tiny_metadata(tag: str = "new_embodiment") -> dict[str, Any]:
    """``experiment_cfg/metadata.json`` for a 7-D arm + 1-D gripper embodiment (6-D arm state + gripper)."""

    def bounds(lo: list[float], hi: list[float]) -> dict[str, list[float]]:
        return {
            "min": lo,
            "max": hi,
            "mean": [(a + b) / 2 for a, b in zip(lo, hi, strict=True)],
            "std": [(b - a) / 4 for a, b in zip(lo, hi, strict=True)],
            "q01": lo,
            "q99": hi,
        }

    arm = bounds([-2.0, -1.5, -2.5, -2.0, -1.0, -1.5, -3.0], [2.0, 1.5, 2.5, 0.5, 1.0, 1.5, 3.0])
    return {
        tag: {
            "statistics": {
                "state": {
                    "arm": bounds([-2.0, -1.5, -2.5, -2.0, -1.0, -1.5], [2.0, 1.5, 2.5, 0.5, 1.0, 1.5]),
                    "gripper": bounds([0.0], [0.08]),
                },
                "action": {"arm": arm, "gripper": bounds([0.0], [1.0])},
            },
            "modalities": {
                "state": {
                    "arm": {"shape": [6], "absolute": True},
                    "gripper": {"shape": [1], "absolute": True},
                },
                "action": {
                    "arm": {"shape": [7], "absolute": True},
                    "gripper": {"shape": [1], "absolute": True},
                },
            },
            "embodiment_tag": tag,
        }
    }


def tiny_gr00t(seed: int = 0, **overrides: Any) -> Gr00tN1:
    """A tiny random GR00T; category-specific weights get a trained-like scale (GR00T's 0.02 init makes the
    decoder's output vanish) so quantization errors are visible in the actions."""
    torch.manual_seed(seed)
    model = Gr00tN1(Gr00tConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CategorySpecificLinear):
                m.W.normal_(0, m.W.shape[1] ** -0.5)
                m.b.normal_(0, 0.02)
    return model


def write_tiny_checkpoint(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    from daptq.models.cogact.testing import tiny_tokenizer

    return save_gr00t_checkpoint(tiny_gr00t(seed, **overrides), directory, tiny_metadata(), tiny_tokenizer())
