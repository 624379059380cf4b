"""Fixed-slot batching of observations for ``predict_chunks``, shared by every policy that batches episodes.

A batch is padded to ``slots`` rows (copies of row 0), so every call runs the same shapes and a row's result
does not depend on how many episodes needed a chunk; row i's noise comes from ``generators[i]``, padding rows
get zeros."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

FIELDS = ("image", "state")
TOKEN_FIELDS = ("language_features", "language_mask")


def slot_rows(
    observations: Sequence[Any], generators: Sequence[torch.Generator], slots: int | None, to_batch: Callable
) -> tuple[list[dict[str, Any]], int]:
    """(per-row batches padded to ``slots``, number of real rows), after checking the arguments agree."""
    if len(observations) != len(generators) or not observations:
        raise ValueError(f"{len(observations)} observations but {len(generators)} generators")
    n = len(observations)
    if slots is not None and slots < n:
        raise ValueError(f"slots={slots} < {n} observations")
    rows = [to_batch(o) for o in observations]
    return rows + [rows[0]] * ((slots or n) - n), n


def stack_rows(rows: Sequence[dict[str, Any]], cat: Callable, pad_tokens: Callable) -> dict[str, Any]:
    """One batch from per-row batches; language tokens right-padded to the longest instruction."""
    length = max(r["language_features"].shape[1] for r in rows)
    batch = {k: cat([r[k] for r in rows]) for k in FIELDS}
    batch.update({k: cat([pad_tokens(r[k], length) for r in rows]) for k in TOKEN_FIELDS})
    return batch


def slot_noise(
    generators: Sequence[torch.Generator], n_rows: int, chunk_size: int, action_dim: int
) -> torch.Tensor:
    """(n_rows, chunk_size, action_dim) initial noise: row i from ``generators[i]``, padding rows zero."""
    noise = [torch.randn((1, chunk_size, action_dim), generator=g) for g in generators]
    noise += [torch.zeros(1, chunk_size, action_dim)] * (n_rows - len(generators))
    return torch.cat(noise)


@runtime_checkable
class SharesVisionFeatures(Protocol):
    """A batching policy whose vision encoder output can stand in for another's: where two such policies
    have equal ``vision_key``s (a quantized candidate whose frozen encoder was left in float, and its FP
    shadow), the evaluator encodes each batch of images once and hands the features to both."""

    def vision_key(self) -> str:
        """Digest of the vision encoder (types and weights): equal keys give identical features."""

    def vision_features(self, observations: Sequence[Any], slots: int | None = None) -> torch.Tensor:
        """The encoder output for the batch ``predict_chunks`` builds from ``observations`` and ``slots``."""

    def predict_chunks(
        self,
        observations: Sequence[Any],
        generators: Sequence[torch.Generator],
        slots: int | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Action chunks for a batch; ``vision_features`` replaces running the vision encoder."""
