"""Which modules of a VLA a method quantizes, and with which spec: roles + name patterns -> per-module specs.

A ``Scope`` selects modules by the role the adapter tags them with (vision, language, backbone, interface,
action_head) and then applies name-pattern rules (``daptq.quant.Rule``: exact / glob / regex; ``spec: None``
keeps a module float). The default is what the DA-PTQ paper quantizes: backbone, interface and action head;
the frozen encoders join with ``include_encoders=True``.

Group sizes a layer's fan-in does not divide are resolved per layer by one documented rule
(``group_fallback``):

- ``"largest_divisor"`` (default): the largest divisor of the fan-in that is <= the requested group size; if
  that divisor is the whole fan-in the layer becomes per-channel (one group per row is per-channel).
  Example: fan-in 192 with group 128 -> group 96; fan-in 112 -> per-channel; fan-in 4 -> per-channel.
- ``"per_channel"``: such layers become per-channel.
- ``"error"``: refuse; the error lists every layer that cannot be served.

Every adjustment is recorded (``PlannedModule.note``) and travels into the ``QuantRecord``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from daptq.quant.category import registered_type
from daptq.quant.fake import swap_problem
from daptq.quant.recipe import Rule, opaque_linear_names
from daptq.quant.spec import QuantSpec, WeightSpec

ROLES = ("vision", "language", "backbone", "interface", "action_head", "other")
DEFAULT_ROLES = ("backbone", "interface", "action_head")
ENCODER_ROLES = ("vision", "language")
GROUP_FALLBACKS = ("largest_divisor", "per_channel", "error")
GroupFallback = Literal["largest_divisor", "per_channel", "error"]


@dataclass(frozen=True)
class Scope:
    """Roles to quantize, name-pattern overrides, and the rule for group sizes a fan-in does not divide.

    ``rules`` are applied after role selection, in order (a later rule wins, exact beats pattern): a rule with
    a spec quantizes the matched modules with it (even outside the selected roles), ``spec=None`` keeps them
    float. ``exclude`` is shorthand for glob rules with ``spec=None``.
    """

    roles: tuple[str, ...] = DEFAULT_ROLES
    include_encoders: bool = False
    rules: tuple[Rule, ...] = ()
    exclude: tuple[str, ...] = ()
    group_fallback: GroupFallback = "largest_divisor"

    def __post_init__(self) -> None:
        for name in ("roles", "rules", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple):
                raise ValueError(f"Scope.{name} must be a list, got {type(value).__name__}: {value!r}")
            object.__setattr__(self, name, tuple(value))
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise ValueError(f"Scope.roles: unknown role(s) {bad}; known: {ROLES}")
        if not isinstance(self.include_encoders, bool):
            raise ValueError(f"Scope.include_encoders must be a bool, got {self.include_encoders!r}")
        for r in self.rules:
            if not isinstance(r, Rule):
                raise ValueError(f"Scope.rules must hold Rule objects, got {type(r).__name__}")
        for p in self.exclude:
            if not isinstance(p, str) or not p:
                raise ValueError(f"Scope.exclude must hold non-empty glob strings, got {p!r}")
        if self.group_fallback not in GROUP_FALLBACKS:
            raise ValueError(
                f"Scope.group_fallback must be one of {GROUP_FALLBACKS}, got {self.group_fallback!r}"
            )

    @property
    def active_roles(self) -> tuple[str, ...]:
        extra = tuple(r for r in ENCODER_ROLES if r not in self.roles) if self.include_encoders else ()
        return self.roles + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "roles": list(self.roles),
            "include_encoders": self.include_encoders,
            "rules": [r.to_dict() for r in self.rules],
            "exclude": list(self.exclude),
            "group_fallback": self.group_fallback,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scope:
        if not isinstance(d, Mapping):
            raise ValueError(f"Scope.from_dict: expected a mapping, got {type(d).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"Scope: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        kwargs = dict(d)
        if "rules" in kwargs:
            if not isinstance(kwargs["rules"], list | tuple):
                raise ValueError(f"Scope.rules must be a list, got {kwargs['rules']!r}")
            kwargs["rules"] = tuple(Rule.from_dict(r) for r in kwargs["rules"])
        return cls(**kwargs)


@dataclass(frozen=True)
class PlannedModule:
    """One module a method will quantize: its role, weight shape, the spec asked for and the one it gets."""

    name: str
    role: str
    kind: str  # "Linear" or "Conv2d"
    weight_shape: tuple[int, ...]
    spec: QuantSpec
    requested: QuantSpec
    note: str = ""  # why ``spec`` differs from ``requested`` (group-size resolution), else empty
    # where it sits (the adapter's QuantizableModule): block index, stack, stream; None where not in one
    block: int | None = None
    stack: str | None = None
    stream: str | None = None

    @property
    def fan_in(self) -> int:
        n = 1
        for s in self.weight_shape[1:]:
            n *= s
        return n


@dataclass(frozen=True)
class ScopePlan:
    """The resolved scope: modules to quantize (in model order) and why every other one stays float."""

    modules: dict[str, PlannedModule] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)  # name -> reason

    @property
    def specs(self) -> dict[str, QuantSpec]:
        return {n: m.spec for n, m in self.modules.items()}

    def by_role(self, role: str) -> list[str]:
        return [n for n, m in self.modules.items() if m.role == role]


def largest_dividing_group(fan_in: int, group_size: int) -> int:
    """The largest divisor of ``fan_in`` that is <= ``group_size`` (>= 1)."""
    for g in range(min(group_size, fan_in), 0, -1):
        if fan_in % g == 0:
            return g
    return 1


def fit_group_size(spec: QuantSpec, fan_in: int, fallback: GroupFallback) -> tuple[QuantSpec | None, str]:
    """The spec this fan-in can take under ``fallback``: (spec, note); (None, reason) when it cannot."""
    w = spec.weight
    if w.is_float or w.granularity != "per_group" or fan_in % w.group_size == 0:
        return spec, ""
    if fallback == "error":
        return None, f"group_size={w.group_size} does not divide fan-in {fan_in}"
    g = largest_dividing_group(fan_in, w.group_size) if fallback == "largest_divisor" else fan_in
    if g == fan_in or g < 2:
        weight = dataclasses.replace(w, granularity="per_channel", group_size=None)
        note = f"group {w.group_size} does not divide fan-in {fan_in}: per-channel"
    else:
        weight = dataclasses.replace(w, group_size=g)
        note = f"group {w.group_size} does not divide fan-in {fan_in}: group {g}"
    return QuantSpec(weight, spec.activation, spec.version), note


def resolve_scope(
    model: nn.Module, modules: list[Any], scope: Scope, spec: QuantSpec, swap_check=swap_problem
) -> ScopePlan:
    """Resolve ``scope`` with base ``spec`` over an adapter's ``quantizable_modules()`` (objects with
    ``name``, ``module``, ``role``). Raises one ValueError listing every module that cannot be served."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"resolve_scope: spec must be a QuantSpec, got {type(spec).__name__}")
    roles = {m.name: m.role for m in modules}
    opaque = opaque_linear_names(model)
    chosen: dict[str, tuple[tuple[int, int], QuantSpec | None, str]] = {}
    for m in modules:
        if m.role in scope.active_roles:
            chosen[m.name] = ((-1, 0), spec, "")
        else:
            chosen[m.name] = ((-1, 0), None, f"role {m.role!r} not in scope {list(scope.active_roles)}")
    rules = list(scope.rules) + [Rule(p, None) for p in scope.exclude]
    problems = []
    for idx, rule in enumerate(rules):
        hits = [n for n in roles if rule.matches(n)]
        if not hits:
            problems.append(f"scope rule {idx} ({rule.match} {rule.target!r}) matches no quantizable module")
        priority = (1 if rule.match == "exact" else 0, idx)
        for n in hits:
            if priority > chosen[n][0]:
                reason = "" if rule.spec is not None else f"kept float by rule {rule.target!r}"
                chosen[n] = (priority, rule.spec, reason)
    planned: dict[str, PlannedModule] = {}
    kept: dict[str, str] = {}
    by_name = {m.name: m for m in modules}
    for name, (_, requested, reason) in chosen.items():
        if requested is None or requested.weight.is_float and requested.activation is None:
            kept[name] = reason or "spec keeps it float"
            continue
        module = by_name[name].module
        if name in opaque:
            problems.append(f"{name}: out_proj of an nn.MultiheadAttention reads its weight directly")
            continue
        if registered_type(module) is not None:  # a registered quantized type (daptq.quant.category)
            kind, fan_in = type(module).__name__, module.in_features
            shape = (module.out_features, fan_in)
            fitted, note = fit_group_size(requested, fan_in, scope.group_fallback)
            act = requested.activation
            if act is not None and act.mode != "dynamic_per_token":
                problems.append(f"{name}: a {kind} takes weight-only or dynamic_per_token activation specs")
            elif requested.weight.is_float:
                problems.append(f"{name}: a {kind} rounds its weight; keep it float with spec: null instead")
            elif fitted is None:
                problems.append(f"{name} (fan-in {fan_in}): {note}")
            else:
                planned[name] = PlannedModule(
                    name, roles[name], kind, shape, fitted, requested, note, *_place(by_name[name])
                )
            continue
        if not isinstance(module, nn.Linear | nn.Conv2d):
            problems.append(
                f"{name}: a {type(module).__name__}; only Linear/Conv2d and registered quantized types "
                "(daptq.quant.category.QUANTIZED_TYPES) are quantizable"
            )
            continue
        if (problem := swap_check(name, module)) is not None:
            problems.append(problem)
            continue
        fan_in = module.weight[0].numel()
        fitted, note = fit_group_size(requested, fan_in, scope.group_fallback)
        if fitted is None:
            problems.append(f"{name} (fan-in {fan_in}): {note}")
            continue
        planned[name] = PlannedModule(
            name,
            roles[name],
            "Conv2d" if isinstance(module, nn.Conv2d) else "Linear",
            tuple(module.weight.shape),
            fitted,
            requested,
            note,
            *_place(by_name[name]),
        )
    if problems:
        raise ValueError(
            f"the scope cannot be served ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return ScopePlan(planned, kept)


def _place(module: Any) -> tuple[int | None, str | None, str | None]:
    """(block, stack, stream) of an adapter's QuantizableModule (None for what does not declare them)."""
    return (getattr(module, "block", None), getattr(module, "stack", None), getattr(module, "stream", None))


def with_weight_bits(spec: QuantSpec, bits: int) -> QuantSpec:
    """``spec`` with its weight bit width replaced (16 keeps the weight float)."""
    return QuantSpec(WeightSpec(**{**spec.weight.to_dict(), "bits": bits}), spec.activation, spec.version)
