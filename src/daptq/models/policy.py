"""The closed-loop half of a chunked VLA: one base class owns the action queue and the seeded sampling noise,
so every policy that predicts action chunks (torch, ONNX Runtime, ...) replays them the same way.

A subclass implements ``chunk_for_observation`` (how one chunk is computed) and ``info``; ``reset`` /
``select_action`` and the generator live here. The quantization side is a separate object, ``policy.adapter``
(a ``VLAAdapter``), or None for a policy that cannot be quantized (an exported ONNX graph).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import ActionSpace, Observation, PolicyInfo, VLAAdapter


class ChunkedPolicy(ABC):
    """``Policy`` for a model that predicts K actions per forward pass and executes the first
    ``n_action_steps`` of them before re-planning.

    ``reset(seed)`` clears the queue and seeds the sampling generator (paired rollouts share noise);
    ``reset(None)`` reseeds it from the OS unless ``keep_generator_on_none_seed`` (then the stream continues).
    """

    action_space: ActionSpace
    adapter: VLAAdapter | None = None
    keep_generator_on_none_seed = False
    # What quantized it (its QuantRecord's summary): set by ``load_quantized_policy``; ``info`` reports it
    # through ``recorded_recipe`` so every family carries it into eval runs the same way.
    recipe: Mapping[str, Any] | None = None

    def __init__(self, action_space: ActionSpace, n_action_steps: int, seed: int | None = None) -> None:
        if n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
        self.action_space = action_space
        self.n_action_steps = int(n_action_steps)
        self._queue: deque[np.ndarray] = deque()
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(int(seed))

    @property
    def generator(self) -> torch.Generator:
        """The sampling generator ``select_action`` draws chunk noise from."""
        return self._generator

    def reset(self, seed: int | None = None) -> None:
        """Clear the action queue; ``seed`` fixes the sampling noise so paired rollouts can share it."""
        self._queue.clear()
        if seed is not None:
            self._generator.manual_seed(int(seed))
        elif not self.keep_generator_on_none_seed:
            self._generator.seed()

    def select_action(self, observation: Observation) -> np.ndarray:
        """One action (float32, ``(action_space.dim,)``); re-plans when the queue is empty."""
        if not self._queue:
            chunk = np.asarray(self.chunk_for_observation(observation, self._generator), dtype=np.float32)
            if chunk.ndim != 2 or chunk.shape[1] != self.action_space.dim or len(chunk) < 1:
                raise ValueError(
                    f"{type(self).__name__}.chunk_for_observation returned shape {chunk.shape}, expected "
                    f"(K, {self.action_space.dim})"
                )
            self._queue.extend(chunk[: self.n_action_steps])
        return self._queue.popleft()

    @abstractmethod
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        """The action chunk (K, action_dim) for one observation, noise drawn from ``generator``."""

    @abstractmethod
    def info(self) -> PolicyInfo:
        """What the evaluator needs to know about this policy (observation settings, digest, recipe)."""

    def recorded_recipe(self) -> Mapping[str, Any] | None:
        """The recipe ``info`` reports: ``self.recipe`` (set by the quantized-directory loader), else a
        ``meta["recipe"]`` mapping the policy was built with, else None."""
        if isinstance(self.recipe, Mapping):
            return self.recipe
        recipe = (getattr(self, "meta", None) or {}).get("recipe")
        return recipe if isinstance(recipe, Mapping) else None

    def invalidate_caches(self) -> None:  # noqa: B027 (optional hook, nothing cached by default)
        """Drop whatever the policy caches from its weights (called after quantization changed them)."""

    def predict_chunk(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Batched action chunks (B, K, action_dim) from model inputs, through the adapter."""
        if self.adapter is None:
            raise NotImplementedError(f"{type(self).__name__} has no adapter: predict_chunk needs one")
        return self.adapter.predict_chunk(batch, generator)


__all__ = ["ChunkedPolicy"]
