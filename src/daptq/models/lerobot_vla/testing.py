"""Tiny pi0 / pi0.5 / SmolVLA checkpoints in lerobot's layout, so tests build them offline in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from daptq.models.lerobot_vla.checkpoint import save_lerobot_checkpoint
from daptq.models.lerobot_vla.config import LeRobotVLAConfig
from daptq.models.lerobot_vla.modeling import FlowMatchingVLA, build_model


def tiny_statistics(config: LeRobotVLAConfig) -> dict[str, dict[str, list[float]]]:
    """LIBERO-like statistics for the state and the 7-D actions (every mode's keys present)."""
    a, s = config.action_dim, config.state_dim

    def stats(n: int, scale: float) -> dict[str, list[float]]:
        mean = [0.01 * (i + 1) for i in range(n)]
        std = [scale * (1 + 0.1 * i) for i in range(n)]
        return {
            "mean": mean,
            "std": std,
            "min": [m - 3 * d for m, d in zip(mean, std, strict=True)],
            "max": [m + 3 * d for m, d in zip(mean, std, strict=True)],
            "q01": [m - 2 * d for m, d in zip(mean, std, strict=True)],
            "q99": [m + 2 * d for m, d in zip(mean, std, strict=True)],
        }

    return {"observation.state": stats(s, 0.5), "action": stats(a, 0.3)}


def tiny_model(kind: str = "pi0", seed: int = 0, **overrides: Any) -> FlowMatchingVLA:
    """A tiny random member of the family whose output projection is re-drawn larger, so its velocity (and
    quantization errors) are visible in the chunk as in a trained model."""
    torch.manual_seed(seed)
    model = build_model(LeRobotVLAConfig.tiny(kind, **overrides)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.action_out_proj.weight, std=0.3)
    return model


def write_tiny_checkpoint(directory: str | Path, kind: str = "pi0", seed: int = 0, **kwargs: Any) -> Path:
    """A complete tiny lerobot checkpoint directory (config, weights, processor statistics, tokenizer)."""
    from daptq.models.cogact.testing import tiny_tokenizer

    model = tiny_model(kind, seed)
    d = save_lerobot_checkpoint(model, directory, tiny_statistics(model.config), **kwargs)
    tiny_tokenizer().save_pretrained(str(Path(d) / "tokenizer"))
    return d
