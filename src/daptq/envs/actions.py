"""What each action dimension means: one type for the whole of daptq. Suites declare their action space with
it, policies act in it and DA-PTQ's drift weights are derived from it (``daptq.models.adapter`` re-exports
it). A leaf of ``daptq.envs`` that imports only the standard library, so that the model layer and the suites
share the type without an import cycle (models -> data -> envs; tests/test_import_graph.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

DimKind = Literal["translation", "rotation", "gripper", "joint"]
DIM_KINDS: tuple[str, ...] = get_args(DimKind)


@dataclass(frozen=True)
class ActionSpace:
    """Names and kinds of the action dimensions (translation, rotation, gripper, joint), the control mode
    ("delta-eef": end-effector deltas; "joint") and the range every dimension is normalized to."""

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
        unknown = sorted(set(self.kinds) - set(DIM_KINDS))
        if unknown:
            raise ValueError(
                f"ActionSpace: unknown kinds {unknown}; use translation, rotation, gripper or joint"
            )

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
