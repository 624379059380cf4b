"""QuantRecord: the one record of everything a quantization run decided, written into the policy directory.

It replaces three partial schemas (the rules-only ``Recipe`` as a run's record, ``quantization_config
["recipe"]`` that was never read back, and the report's duck-typed ``policy.recipe["w_bits"]``): a method's
name and config, the per-module plan (role, shape, spec asked for and given), the method's decisions (bit
map, smoothing scales, compensation, clipping ... as JSON values), calibration provenance, the base model's
spec and digest, and timings. ``to_json`` / ``from_json`` round-trip it exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from daptq.quant.recipe import Recipe, Rule
from daptq.quant.spec import QuantSpec

RECORD_FORMAT = "daptq-quant-record"
RECORD_VERSION = 1


def jsonable(value: Any, where: str = "decisions") -> Any:
    """Tensors/arrays -> nested lists, tuples -> lists; refuses what JSON cannot hold (and NaN/Inf)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings, got {k!r}")
            out[k] = jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not finite")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"{where}: {type(value).__name__} is not JSON-serializable")


@dataclass(frozen=True)
class ModuleRecord:
    """What happened to one module."""

    role: str
    kind: str
    weight_shape: tuple[int, ...]
    spec: QuantSpec
    requested: QuantSpec | None = None  # set when the scope adjusted the spec (see ``note``)
    note: str = ""
    # where the module sits, from the adapter's QuantizableModule at quantize time (``daptq inspect`` shows
    # them); None outside a block stack / stream, and in records written before they were recorded
    block: int | None = None
    stack: str | None = None
    stream: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "role": self.role,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "spec": self.spec.to_dict(),
            "requested": None if self.requested is None else self.requested.to_dict(),
            "note": self.note,
        }
        # written only when set: a record without them reads as before (and older readers read it)
        d.update(
            {
                k: v
                for k, v in (("block", self.block), ("stack", self.stack), ("stream", self.stream))
                if v is not None
            }
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleRecord:
        _expect_keys(
            "ModuleRecord",
            d,
            {"role", "kind", "weight_shape", "spec"},
            {"requested", "note", "block", "stack", "stream"},
        )
        shape = d["weight_shape"]
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in shape
        ):
            raise ValueError(f"ModuleRecord.weight_shape must be a list of ints, got {shape!r}")
        req = d.get("requested")
        return cls(
            _str("ModuleRecord.role", d["role"]),
            _str("ModuleRecord.kind", d["kind"]),
            tuple(shape),
            QuantSpec.from_dict(d["spec"]),
            None if req is None else QuantSpec.from_dict(req),
            _str("ModuleRecord.note", d.get("note", "")),
            _optional_int("ModuleRecord.block", d.get("block")),
            None if d.get("stack") is None else _str("ModuleRecord.stack", d["stack"]),
            None if d.get("stream") is None else _str("ModuleRecord.stream", d["stream"]),
        )


@dataclass(frozen=True)
class QuantRecord:
    """Everything decided by one quantization run (see the module docstring)."""

    method: str
    config: dict[str, Any]
    modules: dict[str, ModuleRecord]
    decisions: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    base_model: dict[str, Any] = field(default_factory=dict)  # {"spec": str, "digest": sha256 hex}
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"QuantRecord.method must be a non-empty string, got {self.method!r}")
        for name in ("config", "modules", "decisions", "base_model", "timings", "versions"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"QuantRecord.{name} must be a mapping, got {getattr(self, name)!r}")
        for n, m in self.modules.items():
            if not isinstance(m, ModuleRecord):
                raise ValueError(f"QuantRecord.modules[{n!r}] must be a ModuleRecord")
        if self.calibration is not None and not isinstance(self.calibration, Mapping):
            raise ValueError("QuantRecord.calibration must be a mapping or None")
        object.__setattr__(self, "decisions", jsonable(dict(self.decisions)))
        object.__setattr__(self, "config", jsonable(dict(self.config), "config"))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", jsonable(dict(self.calibration), "calibration"))
        for k, v in self.timings.items():
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ValueError(f"QuantRecord.timings[{k!r}] must be a number of seconds, got {v!r}")

    # views --------------------------------------------------------------------------------------------------
    @property
    def specs(self) -> dict[str, QuantSpec]:
        return {n: m.spec for n, m in self.modules.items()}

    def recipe(self) -> Recipe:
        """The exact per-module recipe (exact-name rules) this run applied."""
        return Recipe(tuple(Rule(n, m.spec, "exact") for n, m in self.modules.items()))

    def bit_map(self) -> dict[str, int]:
        return {n: m.spec.weight.bits for n, m in self.modules.items()}

    def summary(self) -> dict[str, Any]:
        """Short label fields for tables: method, weight bits (or "mixed"), activation bits (16 = float)."""
        w = sorted({m.spec.weight.bits for m in self.modules.values()})
        a = sorted(
            {16 if m.spec.activation is None else m.spec.activation.bits for m in self.modules.values()}
        )
        return {
            "method": self.method,
            "w_bits": w[0] if len(w) == 1 else ("mixed" if w else 16),
            "a_bits": a[0] if len(a) == 1 else ("mixed" if a else 16),
            "modules": len(self.modules),
        }

    # serialization ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "format_version": RECORD_VERSION,
            "method": self.method,
            "config": self.config,
            "modules": {n: m.to_dict() for n, m in self.modules.items()},
            "decisions": self.decisions,
            "calibration": self.calibration,
            "base_model": dict(self.base_model),
            "timings": dict(self.timings),
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantRecord:
        _expect_keys(
            "QuantRecord",
            d,
            {"format", "format_version", "method", "config", "modules"},
            {"decisions", "calibration", "base_model", "timings", "versions"},
        )
        if d["format"] != RECORD_FORMAT:
            raise ValueError(f"QuantRecord: format {d['format']!r} is not {RECORD_FORMAT!r}")
        if d["format_version"] != RECORD_VERSION:
            raise ValueError(
                f"QuantRecord: format_version {d['format_version']!r} unsupported (reads {RECORD_VERSION})"
            )
        if not isinstance(d["modules"], Mapping):
            raise ValueError("QuantRecord.modules must be a mapping of module name -> record")
        return cls(
            d["method"],
            d["config"],
            {n: ModuleRecord.from_dict(m) for n, m in d["modules"].items()},
            d.get("decisions") or {},
            d.get("calibration"),
            d.get("base_model") or {},
            d.get("timings") or {},
            d.get("versions") or {},
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> QuantRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"QuantRecord JSON does not parse: {e}") from None
        if not isinstance(data, Mapping):
            raise ValueError("QuantRecord JSON must be an object")
        return cls.from_dict(data)


def _expect_keys(owner: str, d: Any, required: set[str], optional: set[str]) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{owner}: expected a mapping, got {type(d).__name__}")
    missing = required - set(d)
    unknown = set(d) - required - optional
    if missing or unknown:
        raise ValueError(f"{owner}: missing field(s) {sorted(missing)}, unknown field(s) {sorted(unknown)}")


def _str(owner: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{owner} must be a string, got {value!r}")
    return value


def _optional_int(owner: str, value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{owner} must be a non-negative int or null, got {value!r}")
    return value
