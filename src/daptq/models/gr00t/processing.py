"""GR00T's observation and action conventions for one embodiment.

- Statistics and modalities come from the checkpoint's ``experiment_cfg/metadata.json``:
  ``{tag: {"statistics": {"state"|"action": {key: {"min", "max", "mean", "std", "q01", "q99"}}},
  "modalities": {"state"|"action": {key: {"shape": [d], ...}}}, "embodiment_tag": tag}}``.
- State and action keys are concatenated in the metadata's order and normalized with ``min_max``
  (``2 (x - min) / (max - min) - 1``, what GR00T's data configs use for arm and hand joints); the state is
  zero-padded to ``max_state_dim``, the action chunk to ``action_dim`` (only the embodiment's dimensions enter
  the loss and the sampled chunk). Un-normalization clips to [-1, 1] first.
- The embodiment tag selects the category (projector) index of every ``CategorySpecificLinear``.
- Images: SigLIP's resize to the tower's square size and 0.5 / 0.5 normalization; the prompt is
  ``<img>`` + the image-context tokens + ``</img>`` per view, then the instruction. (The original builds its
  Eagle chat template with the Eagle processor shipped in the gr00t package, which is not in a checkpoint
  directory: give its tokenizer with ``tokenizer=DIR``.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import ActionSpace
from daptq.models.family_common import choose_entry
from daptq.models.gr00t.config import EMBODIMENT_TAGS, Gr00tConfig


@dataclass(frozen=True)
class Modality:
    """The concatenated keys of one modality with their min/max bounds."""

    keys: tuple[str, ...]
    dims: tuple[int, ...]
    low: np.ndarray
    high: np.ndarray

    @property
    def dim(self) -> int:
        return int(sum(self.dims))

    def names(self) -> tuple[str, ...]:
        return tuple(f"{k}.{i}" for k, d in zip(self.keys, self.dims, strict=True) for i in range(d))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        span = np.where(self.high - self.low > 0, self.high - self.low, 1.0)
        return np.clip(2.0 * (np.asarray(x, np.float64) - self.low) / span - 1.0, -1.0, 1.0).astype(
            np.float32
        )

    def unnormalize(self, a: np.ndarray) -> np.ndarray:
        a = np.clip(np.asarray(a, np.float64), -1.0, 1.0)
        return ((a + 1.0) / 2.0 * (self.high - self.low) + self.low).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "dims": list(self.dims),
            "low": self.low.tolist(),
            "high": self.high.tolist(),
        }


@dataclass(frozen=True)
class Embodiment:
    """One embodiment of a GR00T checkpoint: its tag, category index and state/action modalities."""

    tag: str
    index: int
    state: Modality
    action: Modality

    def action_space(self) -> ActionSpace:
        kinds = tuple("gripper" if "gripper" in n else "joint" for n in self.action.names())
        return ActionSpace(self.action.names(), kinds, control="joint")  # type: ignore[arg-type]

    def check(self, c: Gr00tConfig) -> None:
        if not 0 <= self.index < c.max_num_embodiments:
            raise ValueError(
                f"embodiment {self.tag!r}: index {self.index} outside the model's {c.max_num_embodiments}"
            )
        if self.action.dim > c.action_dim or self.state.dim > c.max_state_dim:
            raise ValueError(
                f"embodiment {self.tag!r}: {self.action.dim}-D actions / {self.state.dim}-D state exceed the "
                f"model's {c.action_dim} / {c.max_state_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "index": self.index,
            "state": self.state.to_dict(),
            "action": self.action.to_dict(),
        }


def _modality(meta: Mapping[str, Any], what: str, source: str) -> Modality:
    try:
        mods = meta["modalities"][what]
        stats = meta["statistics"][what]
        keys = tuple(mods)
        dims = tuple(int(mods[k]["shape"][0]) for k in keys)
        low = np.concatenate([np.asarray(stats[k]["min"], np.float64).reshape(-1) for k in keys])
        high = np.concatenate([np.asarray(stats[k]["max"], np.float64).reshape(-1) for k in keys])
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"{source}: {what} modalities/statistics are incomplete ({e!r})") from e
    if not keys or low.shape != (sum(dims),) or high.shape != low.shape:
        raise ValueError(
            f"{source}: {what} statistics do not match the modality shapes "
            f"{dict(zip(keys, dims, strict=True))}"
        )
    return Modality(keys, dims, low, high)


def embodiment_from_metadata(
    metadata: Mapping[str, Any], tag: str | None, source: str = "metadata.json"
) -> Embodiment:
    tag = choose_entry(
        metadata,
        tag,
        source,
        expected="{embodiment_tag: {statistics, modalities}}",
        holds="{n} embodiments",
        name_one="name one (gr00t:DIR?embodiment=TAG)",
        noun="embodiment",
    )
    if tag not in EMBODIMENT_TAGS:
        raise ValueError(f"embodiment tag {tag!r} has no projector index; known: {sorted(EMBODIMENT_TAGS)}")
    meta = metadata[tag]
    return Embodiment(
        tag, EMBODIMENT_TAGS[tag], _modality(meta, "state", source), _modality(meta, "action", source)
    )


def image_tensors(images: Any, config: Gr00tConfig) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, S, S) float, SigLIP's normalization."""
    from PIL import Image

    arr = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    s = config.image_size
    resized = np.stack([np.asarray(Image.fromarray(a).resize((s, s), Image.BICUBIC)) for a in arr])
    return (torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def tokenize(
    tokenizer: Any, instructions: Sequence[str], c: Gr00tConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    image = [c.img_start_token_id, *[c.img_context_token_id] * c.tokens_per_image, c.img_end_token_id]
    rows = []
    for text in instructions:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instruction must be a non-empty string, got {text!r}")
        rows.append(image * c.num_views + list(tokenizer(text.lower())["input_ids"]))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), c.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask
