"""The two contracts every policy in daptq honours, so methods and evaluation never special-case a model.

``Policy`` is what closed-loop evaluation drives (lerobot-style). ``VLAAdapter`` is what a quantization
method needs to know about a VLA: where the conditioning latent z is produced, where it enters the action
decoder, the decoder's training loss, which modules may be quantized (tagged with a role) and what the action
dimensions mean.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from daptq.quant.smoothing import SmoothingGroup

Role = Literal["vision", "language", "backbone", "interface", "action_head", "other"]
DimKind = Literal["translation", "rotation", "gripper", "joint"]

# An observation as produced by daptq.envs and consumed by policies.
#   "image":       uint8 array (H, W, 3), upright RGB
#   "state":       float32 array (4,): end-effector xyz (m) and gripper opening
#   "instruction": str, natural-language task instruction
Observation = Mapping[str, Any]


@dataclass(frozen=True)
class ActionSpace:
    """What each action dimension means; DA-PTQ's drift weights are derived from it."""

    names: tuple[str, ...]
    kinds: tuple[DimKind, ...]
    control: Literal["delta-eef", "joint"] = "delta-eef"
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if len(self.names) != len(self.kinds):
            raise ValueError(f"ActionSpace: {len(self.names)} names but {len(self.kinds)} kinds")
        if not self.names:
            raise ValueError("ActionSpace: at least one action dimension is required")

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "kinds": list(self.kinds),
            "control": self.control,
            "low": self.low,
            "high": self.high,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActionSpace:
        return cls(tuple(d["names"]), tuple(d["kinds"]), d.get("control", "delta-eef"), d["low"], d["high"])


# Meta-World: end-effector position deltas plus a gripper command, all in [-1, 1].
METAWORLD_ACTION_SPACE = ActionSpace(
    names=("dx", "dy", "dz", "grip"), kinds=("translation", "translation", "translation", "gripper")
)


@dataclass(frozen=True)
class PolicyInfo:
    """What a policy tells the evaluator: what to render for it, what it was trained on, and what it is.

    ``digest`` identifies the policy's weights and configuration (``state_digest``): a run records it for
    every model and a resume refuses a model whose digest changed, even when its spec string did not.
    ``None`` fields are not declared (the evaluator then uses its defaults and checks nothing).
    """

    digest: str
    image_size: int | None = None
    camera: str | None = None
    scene_version: int | None = None
    demo_version: int | None = None
    recipe: Mapping[str, Any] | None = None  # the quantization recipe / method summary; None for FP

    def __post_init__(self) -> None:
        if not isinstance(self.digest, str) or not self.digest:
            raise ValueError(f"PolicyInfo.digest must be a non-empty string, got {self.digest!r}")
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0
        ):
            raise ValueError(f"PolicyInfo.image_size must be a positive integer, got {self.image_size!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recipe"] = dict(self.recipe) if self.recipe is not None else None
        return out


def state_digest(module: nn.Module, config: Any) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes) and a JSON-able config."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=repr).encode("utf-8"))
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class QuantizableModule:
    """One module a method may quantize, with its fully-qualified name and its role in the VLA."""

    name: str
    module: nn.Module
    role: Role
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    """Closed-loop control: ``reset`` at episode start, then one ``select_action`` per environment step."""

    action_space: ActionSpace

    def reset(self, seed: int | None = None) -> None:
        """Clear the action queue; ``seed`` fixes the sampling noise so paired rollouts can share it."""

    def select_action(self, observation: Observation) -> np.ndarray:
        """Return one action (float32, shape ``(action_space.dim,)``) for the current observation."""

    def info(self) -> PolicyInfo:
        """What the evaluator needs to know about this policy (observation settings, digest, recipe)."""

    def predict_chunk(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None):
        """Batched action chunks ``(B, K, action_dim)`` from a batch of model inputs (calibration, tests)."""


@runtime_checkable
class VLAAdapter(Protocol):
    """What a quantization method needs to know about a VLA: pi(a | V, p) = Psi(f(V, p))."""

    model: nn.Module
    action_space: ActionSpace

    def condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The backbone forward f: model inputs -> conditioning latent z ``(B, d_z)``."""

    def denoising_loss(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The action decoder's training loss (epsilon MSE), optionally re-weighted per action dimension."""

    def interface_modules(self) -> list[QuantizableModule]:
        """Modules through which z enters the action decoder (CSRC compensates their outputs)."""

    def quantizable_modules(self) -> list[QuantizableModule]:
        """Every module a method may quantize, each tagged with its role."""

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """Layers sharing an input whose channels a preceding module rescales exactly (SmoothQuant, AWQ)."""

    def calibration_batches(
        self, batches: Iterator[Mapping[str, Any]]
    ) -> Iterator[Mapping[str, torch.Tensor]]:
        """Turn dataset batches into model-input batches (moves, normalizes, encodes as the model expects)."""
