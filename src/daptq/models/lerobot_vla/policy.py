"""pi0 / pi0.5 / SmolVLA in closed loop, and the ``lerobot:PATH`` source.

``select_action`` preprocesses the observation as the original's processors do (image resized with padding to
the tower's size and mapped to [-1, 1], state normalized and zero-padded, the prompt tokenized), samples a
normalized chunk (``num_steps`` Euler steps) and un-normalizes it with the checkpoint's statistics; it
executes ``n_action_steps`` of each chunk (the checkpoint's, overridable).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import Observation
from daptq.models.family_common import (
    FamilyPolicyMixin,
    parse_model_spec,
    require_observation,
    spec_dtype,
    spec_number,
)
from daptq.models.lerobot_vla.adapter import LeRobotVLAAdapter
from daptq.models.lerobot_vla.checkpoint import Statistics, load_lerobot_checkpoint
from daptq.models.lerobot_vla.modeling import FlowMatchingVLA
from daptq.models.policy import ChunkedPolicy


class LeRobotVLAPolicy(FamilyPolicyMixin, ChunkedPolicy):
    """A pi0 / pi0.5 / SmolVLA network, its tokenizer and statistics as a closed-loop policy."""

    def __init__(
        self,
        model: FlowMatchingVLA,
        tokenizer: Any,
        statistics: Statistics,
        n_action_steps: int | None = None,
        meta: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        c = model.config
        steps = c.n_action_steps if n_action_steps is None else int(n_action_steps)
        if not 1 <= steps <= c.chunk_size:
            raise ValueError(f"n_action_steps must be in [1, {c.chunk_size}], got {steps}")
        adapter = LeRobotVLAAdapter(model.eval(), tokenizer, statistics)
        super().__init__(adapter.action_space, steps, seed)
        self.model = model
        self.config = c
        self.statistics = statistics
        self.adapter = adapter
        self.meta = dict(meta or {})

    def source_files(self) -> list[Path]:
        """The checkpoint files this policy was loaded from (a quantized directory pins them by sha256)."""
        return [Path(p) for p in self.meta.get("files", {})]

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def observation_batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        require_observation(observation, ("image", "instruction", "state"))
        return self.adapter.model_inputs(
            np.asarray(observation["image"])[None],
            [observation["instruction"]],
            np.asarray(observation["state"])[None],
        )

    def unnormalize(self, chunk: torch.Tensor) -> np.ndarray:
        """Normalized model actions (..., action_dim) -> robot units."""
        out = self.statistics.unnormalize(chunk.detach().float().cpu(), "action", "ACTION")
        return out.numpy()

    @torch.no_grad()
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        chunk = self.adapter.predict_chunk(self.observation_batch(observation), generator)
        return self.unnormalize(chunk[0])

    def info_config(self) -> dict[str, Any]:
        return {
            "model": self.config.to_dict(),
            "statistics": self.statistics.to_dict(),
            "action_space": self.action_space.to_dict(),
        }


SPEC_OPTIONS = ("tokenizer", "vlm_config", "n_action_steps", "dtype")


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from local files only (the originals: google/paligemma-3b-pt-224's for pi0 / pi0.5,
    SmolVLM2's for SmolVLA; neither is in the checkpoint directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_lerobot(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    vlm_config: str | Path | None = None,
    n_action_steps: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LeRobotVLAPolicy:
    """A policy from a lerobot pi0 / pi05 / smolvla checkpoint directory (the family from config.json's
    ``type``). The tokenizer comes from ``tokenizer`` or ``PATH/tokenizer/``; ``meta["files"]`` holds the
    sha256 of every file read."""
    ck = load_lerobot_checkpoint(path, vlm_config=vlm_config, dtype=dtype)
    tok_dir = Path(tokenizer) if tokenizer is not None else Path(path) / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(
            f"{path}: no tokenizer found ({tok_dir}); copy the {ck.config.type} tokenizer files there "
            "or pass "
            "tokenizer=DIR (lerobot:PATH?tokenizer=DIR)"
        )
    meta = {
        "source": {"kind": "lerobot", "type": ck.config.type, "path": str(Path(path))},
        "files": ck.files,
        "tied_weights": ck.tie,
        "key_notes": ck.key_notes,
    }
    return LeRobotVLAPolicy(ck.model, load_tokenizer(tok_dir), ck.statistics, n_action_steps, meta)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``lerobot:PATH[?key=value&...]`` -> (PATH, options); options are ``SPEC_OPTIONS``."""
    return parse_model_spec(spec, "lerobot:", SPEC_OPTIONS, "lerobot:PATH[?tokenizer=DIR&...]")


def load_lerobot_spec(spec: str) -> LeRobotVLAPolicy:
    """The policy a ``lerobot:PATH[?tokenizer=DIR&vlm_config=FILE&n_action_steps=N&dtype=float32|bfloat16|
    float16]`` spec names (pi0 / pi05 / smolvla detected from PATH/config.json's ``type``)."""
    path, o = parse_spec(spec)
    dtype = spec_dtype(spec, o)
    steps = spec_number(spec, o, "n_action_steps")
    return load_lerobot(
        path,
        tokenizer=o.get("tokenizer"),
        vlm_config=o.get("vlm_config"),
        n_action_steps=steps,
        dtype=dtype,
    )
