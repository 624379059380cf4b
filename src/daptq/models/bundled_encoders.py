"""What the two reference VLAs share around the bundled frozen encoders (``daptq.models.encoders``): the
model-input convention (raw image / tokens, or precomputed features), the policies' per-instruction language
cache and the vision features that batched evaluation shares between a candidate and its shadow.

One place, so ``ref:`` (Meta-World) and ``ref:libero-smolvla`` keep the same cache rules and batch layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from daptq.models.adapter import AttentionLayout, Observation, state_digest


def encoder_inputs(
    batch: Mapping[str, torch.Tensor], vision: nn.Module, language: nn.Module, what: str = "batch"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vision tokens, language features, bool language mask): precomputed features where the batch has
    them, else the frozen encoders run on its ``"image"`` / ``"input_ids"`` + ``"attention_mask"``."""
    if "vision_features" in batch:
        tokens = batch["vision_features"]
    elif "image" in batch:
        tokens = vision(batch["image"])
    else:
        raise ValueError(f"{what} needs 'image' or 'vision_features' (has {sorted(batch)})")
    if "language_features" in batch:
        features, mask = batch["language_features"], batch["language_mask"]
    elif "input_ids" in batch:
        mask = batch["attention_mask"]
        features = language(batch["input_ids"], mask)
    else:
        raise ValueError(
            f"{what} needs 'input_ids'+'attention_mask' or 'language_features'+'language_mask' "
            f"(has {sorted(batch)})"
        )
    return tokens, features, mask.bool()


def minilm_layouts(bert: nn.Module, stream: str | None = None) -> list[AttentionLayout]:
    """The frozen MiniLM language encoder's self-attention layers (``language.bert.encoder.layer.<i>``)."""
    out = []
    for i in range(len(bert.encoder.layer)):
        p = f"language.bert.encoder.layer.{i}.attention"
        out.append(
            AttentionLayout(
                f"{p}.self",
                bert.config.num_attention_heads,
                "language",
                out=f"{p}.output.dense",
                q=f"{p}.self.query",
                k=f"{p}.self.key",
                v=f"{p}.self.value",
                block=i,
                stack="language",
                stream=stream,
            )
        )
    return out


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (1, L, ...) language features / mask with zeros (False) to (1, length, ...)."""
    if x.shape[1] == length:
        return x
    return torch.cat([x, torch.zeros((1, length - x.shape[1], *x.shape[2:]), dtype=x.dtype)], dim=1)


def use_vision_features(batch: dict[str, Any], vision_features: torch.Tensor | None) -> dict[str, Any]:
    """``batch`` with the shared ``vision_features`` in place of its images (unchanged when None)."""
    if vision_features is not None:
        n = len(batch["image"])
        if vision_features.shape[0] != n:
            raise ValueError(f"vision_features has {vision_features.shape[0]} rows, the batch {n}")
        batch["vision_features"] = vision_features
        del batch["image"]
    return batch


def checkpoint_state(model: nn.Module, weights: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The model's ``trainable_state_dict()`` with ``weights`` (training's EMA) in place of those tensors."""
    state = model.trainable_state_dict()
    unknown = set(weights or {}) - set(state)
    if unknown:
        raise ValueError(f"weights has names the model does not: {sorted(unknown)[:5]}")
    state.update(weights or {})
    return state


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class EncoderCachePolicy:
    """Mixin (before ``ChunkedPolicy`` in the bases) for a policy whose ``model`` has the frozen ``language``
    and ``vision`` encoders: the language cache and the shared vision features.

    Language cache: instructions are fixed strings, so their MiniLM features are cached per string. The cache
    is tagged with a fingerprint of the language encoder (identity and in-place version counter of every
    module, parameter and buffer), so swapping a module (quantization) or an in-place weight update
    invalidates it. Edits that bypass autograd's version counter (``param.data = ...``) are not seen: call
    ``clear_language_cache()`` after those.

    The class provides ``_image(observation)``: the observation's (1, H, W, 3) uint8 image, checked.
    """

    model: Any
    _language_cache: dict[str, tuple[torch.Tensor, torch.Tensor]]
    _language_fingerprint: tuple | None

    def _image(self, observation: Observation) -> torch.Tensor:
        raise NotImplementedError

    def clear_language_cache(self) -> None:
        self._language_cache.clear()
        self._language_fingerprint = None

    def invalidate_caches(self) -> None:
        self.clear_language_cache()

    def _fingerprint(self) -> tuple:
        enc = self.model.language
        items = [(id(m),) for m in enc.modules()]
        items += [(id(t), getattr(t, "_version", None)) for t in (*enc.parameters(), *enc.buffers())]
        return tuple(items)

    @torch.no_grad()
    def language_features(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L, 384) features and (1, L) bool mask for one instruction, from the cache when still valid."""
        if not isinstance(instruction, str) or not instruction:
            raise ValueError(f"instruction must be a non-empty string, got {instruction!r}")
        fingerprint = self._fingerprint()
        if fingerprint != self._language_fingerprint:
            self._language_cache.clear()
            self._language_fingerprint = fingerprint
        if instruction not in self._language_cache:
            tokens = self.model.language.tokenize([instruction])
            features = self.model.language(tokens["input_ids"], tokens["attention_mask"])
            self._language_cache[instruction] = (features, tokens["attention_mask"].bool())
        return self._language_cache[instruction]

    @torch.no_grad()
    def vision_features(self, observations: Sequence[Observation], slots: int | None = None) -> torch.Tensor:
        """The vision encoder's output for the batch ``predict_chunks`` would build from ``observations``
        (padded to ``slots`` the same way), to pass to it, or to a policy with the same ``vision_key``."""
        if slots is not None and slots < len(observations):
            raise ValueError(f"slots={slots} < {len(observations)} observations")
        images = [self._image(o) for o in observations]
        images += [images[0]] * ((slots or len(images)) - len(images))
        return self.model.vision(torch.cat(images))

    def vision_key(self) -> str:
        """Digest of the vision encoder as it is now (module types, parameters, buffers; recomputed on every
        call, so no edit goes unseen): two policies with equal keys compute identical vision features from
        identical images (same kernels, same weights)."""
        enc = self.model.vision
        types = [f"{type(m).__module__}.{type(m).__qualname__}" for m in enc.modules()]
        return state_digest(enc, {"modules": types})


__all__ = [
    "EncoderCachePolicy",
    "checkpoint_state",
    "count_parameters",
    "encoder_inputs",
    "minilm_layouts",
    "pad_tokens",
    "use_vision_features",
]
