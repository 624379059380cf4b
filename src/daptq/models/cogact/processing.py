"""CogACT's observation and action conventions: image transforms, the prompt, action (un)normalization.

- Images: Prismatic's ``resize-naive`` transform per tower: a bicubic PIL resize to the model's square size
  (torchvision's ``Resize`` on a PIL image is this call), scaling to [0, 1], then each tower's
  normalization (DINOv2: ImageNet mean/std; SigLIP: 0.5/0.5).
- Prompt: Prismatic's ``PurePromptBuilder`` turn ``"In: What action should the robot take to
  {instruction.lower()}?\\nOut: "``, tokenized with ``<s>``, then the ids the original appends: Llama's empty
  token (29871) and ``</s>`` (2), the cognition token. Batches are right-padded with ``<PAD>``.
- Actions: the model works in [-1, 1]; a run's ``dataset_statistics.json`` gives per-dimension q01/q99 and a
  mask (dimensions not normalized: the gripper). Un-normalizing clips to [-1, 1], binarizes the gripper at
  0.5, and maps masked dimensions to ``0.5 (a + 1)(q99 - q01) + q01`` (the original's ``predict_action``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import ActionSpace
from daptq.models.cogact.config import CogACTConfig
from daptq.models.family_common import choose_entry, read_json

# 7-D delta end-effector control of the Open X-Embodiment data CogACT is trained on (Bridge, Fractal).
COGACT_ACTION_SPACE = ActionSpace(
    names=("x", "y", "z", "roll", "pitch", "yaw", "gripper"),
    kinds=("translation", "translation", "translation", "rotation", "rotation", "rotation", "gripper"),
    control="delta-eef",
)


def image_tensors(images: Any, config: CogACTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, H, W, 3) or (H, W, 3) -> (DINOv2 pixels, SigLIP pixels), each (B, 3, S, S) float32."""
    from PIL import Image

    arr = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    size = config.image_size
    resized = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in arr])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0
    out = []
    for tower in (config.dino, config.siglip):
        mean = torch.tensor(tower.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(tower.std, dtype=torch.float32).view(1, 3, 1, 1)
        out.append((x - mean) / std)
    return out[0], out[1]


def prompt_text(instruction: str, config: CogACTConfig) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
    return config.prompt_template.format(instruction=instruction.lower())


def tokenize_prompts(
    tokenizer: Any, instructions: Sequence[str], config: CogACTConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` (B, L) and ``attention_mask`` (B, L) bool, right-padded, as the original's batch path."""
    rows = []
    for instruction in instructions:
        ids = tokenizer(prompt_text(instruction, config), truncation=True)["input_ids"]
        rows.append(list(ids) + list(config.suffix_token_ids))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return input_ids[:, : config.llm_max_length], mask[:, : config.llm_max_length]


def load_tokenizer(path: str | Path, config: CogACTConfig) -> Any:
    """A local tokenizer directory (the Llama-2 tokenizer for released models), as Prismatic sets it up:
    right padding, ``model_max_length``, and a ``<PAD>`` token added when it has none. Never downloads."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, model_max_length=config.llm_max_length, padding_side="right"
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    if tokenizer.pad_token_id != config.pad_token_id:
        raise ValueError(
            f"{path}: the tokenizer's pad token id is {tokenizer.pad_token_id}, the model expects "
            f"{config.pad_token_id} (Prismatic adds '<PAD>' after Llama-2's 32000 tokens)"
        )
    return tokenizer


@dataclass(frozen=True)
class ActionStatistics:
    """One dataset's action bounds (q01, q99) and which dimensions are normalized (mask)."""

    key: str
    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.q01)
        if self.q99.shape != (n,) or self.mask.shape != (n,):
            raise ValueError(f"action statistics {self.key!r}: q01, q99 and mask must have the same length")

    @property
    def dim(self) -> int:
        return len(self.q01)

    def unnormalize(self, normalized: np.ndarray | torch.Tensor, gripper_dims: Sequence[int]) -> np.ndarray:
        """Model actions (..., A) in [-1, 1] -> robot units (``predict_action``'s post-processing)."""
        a = np.clip(np.asarray(normalized, dtype=np.float64), -1.0, 1.0)
        for d in gripper_dims:
            a[..., d] = np.where(a[..., d] < 0.5, 0.0, 1.0)
        out = np.where(self.mask, 0.5 * (a + 1.0) * (self.q99 - self.q01) + self.q01, a)
        return out.astype(np.float32)

    def normalize(self, actions: np.ndarray | torch.Tensor) -> np.ndarray:
        """Robot-unit actions -> model space (OpenVLA's BOUNDS_Q99, which CogACT trains on): masked
        dimensions to ``clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)``, the others unchanged."""
        x = np.asarray(actions, dtype=np.float64)
        scaled = np.clip(2.0 * (x - self.q01) / (self.q99 - self.q01 + 1e-8) - 1.0, -1.0, 1.0)
        return np.where(self.mask, scaled, x).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "q01": self.q01.tolist(),
            "q99": self.q99.tolist(),
            "mask": self.mask.tolist(),
        }


def action_statistics(
    norm_stats: Mapping[str, Any], unnorm_key: str | None, source: str = "dataset_statistics.json"
) -> ActionStatistics:
    """The ``action`` statistics of one dataset of a run's ``dataset_statistics.json`` (``unnorm_key`` may be
    None only when the file holds one dataset, as the original's ``_check_unnorm_key``)."""
    unnorm_key = choose_entry(
        norm_stats,
        unnorm_key,
        source,
        expected="a mapping of dataset name -> statistics",
        holds="statistics of {n} datasets",
        name_one="name one as unnorm_key (cogact:PATH?unnorm_key=NAME)",
        noun="dataset",
    )
    entry = norm_stats[unnorm_key]
    action = entry.get("action") if isinstance(entry, Mapping) else None
    if not isinstance(action, Mapping) or "q01" not in action or "q99" not in action:
        raise ValueError(f"{source}: {unnorm_key}.action must have 'q01' and 'q99'")
    q01 = np.asarray(action["q01"], dtype=np.float64)
    q99 = np.asarray(action["q99"], dtype=np.float64)
    mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return ActionStatistics(unnorm_key, q01, q99, mask)


def read_statistics(path: Path) -> dict[str, Any]:
    return read_json(path)
