"""Calibration data for quantization methods: a validated set of dataset-style batches plus its provenance.

A ``CalibrationSet`` holds batches as a dataset yields them (``image`` uint8 (B,H,W,3) when the policy sees
images, ``state`` (B,4), ``instruction`` list[str], ``actions`` (B,K,action_dim)); the policy's adapter turns
them into model inputs (``VLAAdapter.calibration_batches``). ``check`` refuses an empty set, NaN/Inf values
and a set recorded for another action space, before any method touches a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CalibrationSet:
    """Batches (dataset-style mappings) and where they came from (split, seeds, tasks, trajectories...)."""

    batches: tuple[Mapping[str, Any], ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.batches, Sequence) or isinstance(self.batches, str | bytes):
            raise ValueError(f"CalibrationSet.batches must be a list of batches, got {type(self.batches)}")
        object.__setattr__(self, "batches", tuple(self.batches))
        if not isinstance(self.provenance, Mapping):
            raise ValueError("CalibrationSet.provenance must be a mapping")

    @property
    def num_samples(self) -> int:
        return sum(len(np.asarray(b["state"])) for b in self.batches if "state" in b)

    def check(self, action_space: Any) -> None:
        """Refuse what would silently mis-calibrate: no batches, non-finite numbers, another action space."""
        if not self.batches:
            raise ValueError("calibration set is empty: it has no batches")
        recorded = self.provenance.get("action_space")
        if recorded is not None and action_space is not None:
            names = list(recorded.get("names", [])) if isinstance(recorded, Mapping) else recorded
            if list(names) != list(action_space.names):
                raise ValueError(
                    f"calibration set comes from action space {names}, the policy acts in "
                    f"{list(action_space.names)}"
                )
        for i, batch in enumerate(self.batches):
            if not isinstance(batch, Mapping):
                raise ValueError(f"calibration batch {i} is a {type(batch).__name__}, not a mapping")
            if "state" not in batch:
                raise ValueError(f"calibration batch {i} has no 'state' (has {sorted(batch)})")
            n = len(np.asarray(batch["state"]))
            if n == 0:
                raise ValueError(f"calibration batch {i} is empty (0 samples)")
            for key, value in batch.items():
                if key == "instruction":
                    if len(value) != n or not all(isinstance(s, str) and s for s in value):
                        raise ValueError(
                            f"calibration batch {i}: 'instruction' must be {n} non-empty strings"
                        )
                    continue
                arr = np.asarray(value)
                if len(arr) != n:
                    raise ValueError(f"calibration batch {i}: {key!r} has {len(arr)} rows, 'state' has {n}")
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    bad = int((~np.isfinite(arr)).sum())
                    raise ValueError(f"calibration batch {i}: {key!r} contains {bad} NaN/Inf value(s)")
            if "actions" in batch and action_space is not None:
                actions = np.asarray(batch["actions"])
                if actions.ndim != 3 or actions.shape[-1] != action_space.dim:
                    raise ValueError(
                        f"calibration batch {i}: 'actions' has shape {actions.shape}; the policy's action "
                        f"space {list(action_space.names)} needs (B, K, {action_space.dim})"
                    )
