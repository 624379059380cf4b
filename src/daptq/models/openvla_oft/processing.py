"""OpenVLA-OFT's observation and action conventions.

- Images: Prismatic's per-tower transforms (CogACT's ``image_tensors``: bicubic resize, each tower's
  normalization), one pair per camera (LIBERO: third-person then wrist).
- Prompt: ``"In: What action should the robot take to {instruction.lower()}?\\nOut:"`` with ``<s>``, Llama's
  empty token appended when missing (the original's ``predict_action``), then K*A action placeholder tokens
  (their embeddings are zeroed) and ``</s>``; right-padded.
- Actions and proprio: BOUNDS_Q99 with ``dataset_statistics.json``'s q01/q99 (and mask); un-normalization is
  ``0.5 (a + 1)(q99 - q01 + 1e-8) + q01`` on masked dimensions, without clipping (the original's
  ``_unnormalize_actions``; LIBERO's gripper flip and binarization belong to the evaluation script).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import ActionSpace
from daptq.models.cogact.processing import ActionStatistics, image_tensors  # noqa: F401 (re-exported)
from daptq.models.family_common import choose_entry
from daptq.models.openvla_oft.config import OFTConfig

# LIBERO's 7-D delta end-effector control (position, axis-angle rotation, gripper).
OFT_ACTION_SPACE = ActionSpace(
    names=("x", "y", "z", "roll", "pitch", "yaw", "gripper"),
    kinds=("translation", "translation", "translation", "rotation", "rotation", "rotation", "gripper"),
    control="delta-eef",
)


def tokenize_prompts(
    tokenizer: Any, instructions: Sequence[str], config: OFTConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = []
    for instruction in instructions:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
        ids = list(tokenizer(config.prompt_template.format(instruction=instruction.lower()))["input_ids"])
        if ids[-1] != config.empty_token_id:
            ids.append(config.empty_token_id)
        rows.append(ids + [config.action_token_id] * config.num_action_tokens + [config.stop_token_id])
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return input_ids, mask


def _bounds(entry: Any, what: str, key: str, source: str) -> ActionStatistics:
    if not isinstance(entry, Mapping) or "q01" not in entry or "q99" not in entry:
        raise ValueError(f"{source}: {key}.{what} must have 'q01' and 'q99'")
    q01 = np.asarray(entry["q01"], dtype=np.float64)
    q99 = np.asarray(entry["q99"], dtype=np.float64)
    mask = np.asarray(entry.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return ActionStatistics(key, q01, q99, mask)


@dataclass(frozen=True)
class OFTStatistics:
    """One dataset's action and proprio bounds from ``dataset_statistics.json``."""

    key: str
    action: ActionStatistics
    proprio: ActionStatistics | None

    def check(self, config: OFTConfig) -> None:
        if self.action.dim != config.action_dim:
            raise ValueError(
                f"dataset statistics {self.key!r} have {self.action.dim} action dimensions, the model "
                f"{config.action_dim}"
            )
        if config.use_proprio and (self.proprio is None or self.proprio.dim != config.proprio_dim):
            got = None if self.proprio is None else self.proprio.dim
            raise ValueError(
                f"dataset statistics {self.key!r}: proprio has {got} dimensions, "
                f"the model {config.proprio_dim}"
            )

    def normalize_proprio(self, state: np.ndarray) -> np.ndarray:
        return state if self.proprio is None else self.proprio.normalize(state)

    def unnormalize(self, normalized: np.ndarray | torch.Tensor) -> np.ndarray:
        a = np.asarray(normalized, dtype=np.float64)
        s = self.action
        out = np.where(s.mask, 0.5 * (a + 1.0) * (s.q99 - s.q01 + 1e-8) + s.q01, a)
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "action": self.action.to_dict(),
            "proprio": None if self.proprio is None else self.proprio.to_dict(),
        }


def oft_statistics(
    norm_stats: Mapping[str, Any], unnorm_key: str | None, source: str = "dataset_statistics.json"
) -> OFTStatistics:
    unnorm_key = choose_entry(
        norm_stats,
        unnorm_key,
        source,
        expected="a mapping of dataset name -> statistics",
        holds="statistics of {n} datasets",
        name_one="name one (openvla-oft:DIR?unnorm_key=NAME)",
        noun="dataset",
    )
    entry = norm_stats[unnorm_key]
    if not isinstance(entry, Mapping):
        raise ValueError(f"{source}: {unnorm_key} must be a mapping")
    proprio = _bounds(entry["proprio"], "proprio", unnorm_key, source) if "proprio" in entry else None
    return OFTStatistics(unnorm_key, _bounds(entry.get("action"), "action", unnorm_key, source), proprio)
