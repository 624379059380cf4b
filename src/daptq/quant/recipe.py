"""Recipes: which module gets which QuantSpec. A mixed-precision bit map is just a recipe of exact-name rules.

Targets are matched against fully-qualified module names (``model.named_modules()``) of nn.Linear / nn.Conv2d
layers. ``match`` is ``"exact"``, ``"glob"`` (fnmatch: ``*`` also crosses dots) or ``"regex"``
(``re.fullmatch``).

Precedence (the rule that decides a module's spec): an exact-name rule beats any pattern rule; among rules of
the same kind the later one in the list wins. ``spec: null`` means "keep this module in float".
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from daptq.strict_parse import load_yaml_strict, loads_json_strict

from ._util import atomic_write_text
from .spec import QuantSpec, WeightSpec

RECIPE_VERSION = 1
MATCH_KINDS = ("exact", "glob", "regex")
MatchKind = Literal["exact", "glob", "regex"]


@dataclass(frozen=True)
class Rule:
    target: str
    spec: QuantSpec | None
    match: MatchKind = "glob"

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise ValueError(f"Rule: target must be a non-empty string, got {self.target!r}")
        if self.match not in MATCH_KINDS:
            raise ValueError(f"Rule {self.target!r}: match must be one of {MATCH_KINDS}, got {self.match!r}")
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise ValueError(f"Rule {self.target!r}: spec must be a QuantSpec or None")
        if self.match == "regex":
            try:
                re.compile(self.target)
            except re.error as e:
                raise ValueError(f"Rule {self.target!r}: invalid regex: {e}") from None

    def matches(self, name: str) -> bool:
        if self.match == "exact":
            return name == self.target
        if self.match == "glob":
            return fnmatch.fnmatchcase(name, self.target)
        return re.fullmatch(self.target, name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "match": self.match,
            "spec": None if self.spec is None else self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rule:
        if not isinstance(d, Mapping) or "target" not in d:
            raise ValueError(f"Rule.from_dict: expected a mapping with 'target', got {d!r}")
        unknown = set(d) - {"target", "match", "spec"}
        if unknown:
            raise ValueError(f"Rule.from_dict: unknown field(s) {sorted(unknown)}")
        if "match" in d and not isinstance(d["match"], str):
            raise ValueError(f"Rule.from_dict: match must be one of {MATCH_KINDS}, got {d['match']!r}")
        spec = d.get("spec")
        return cls(d["target"], None if spec is None else QuantSpec.from_dict(spec), d.get("match", "glob"))


def opaque_linear_names(model: nn.Module) -> set[str]:
    """Linear layers whose parent reads ``.weight`` directly instead of calling them
    (``nn.MultiheadAttention.out_proj``): swapping them would silently change nothing; they are excluded."""
    return {
        f"{n}.out_proj" if n else "out_proj"
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def quantizable_names(model: nn.Module) -> list[str]:
    """Fully-qualified names of every nn.Linear / nn.Conv2d (including already fake-quantized ones)."""
    opaque = opaque_linear_names(model)
    return [
        n for n, m in model.named_modules() if n and isinstance(m, nn.Linear | nn.Conv2d) and n not in opaque
    ]


@dataclass(frozen=True)
class Recipe:
    """An ordered list of rules plus a format version; see the module docstring for precedence."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.rules, list | tuple):
            raise ValueError(f"Recipe: rules must be a list of Rule objects, got {self.rules!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        for r in self.rules:
            if not isinstance(r, Rule):
                raise ValueError(f"Recipe: rules must be Rule objects, got {type(r).__name__}")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise ValueError(f"Recipe: version must be an integer, got {self.version!r}")
        if self.version != RECIPE_VERSION:
            raise ValueError(
                f"Recipe: unsupported version {self.version} (this daptq reads {RECIPE_VERSION})"
            )

    # construction shortcuts -------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, spec: QuantSpec, exclude: Sequence[str] = ()) -> Recipe:
        """Every Linear/Conv2d gets ``spec`` except the glob patterns in ``exclude`` (kept float)."""
        if not isinstance(exclude, list | tuple) or not all(isinstance(p, str) for p in exclude):
            raise ValueError(f"Recipe.uniform: exclude must be a list of glob strings, got {exclude!r}")
        return cls((Rule("*", spec), *(Rule(p, None) for p in exclude)))

    @classmethod
    def from_bit_map(cls, bit_map: Mapping[str, int], base: QuantSpec) -> Recipe:
        """Exact-name rules ``name -> base with weight bits replaced`` (16 keeps the layer float)."""
        rules = []
        for name, bits in bit_map.items():
            w = base.weight
            if bits == 16:
                spec = None
            else:
                spec = QuantSpec(WeightSpec(**{**w.to_dict(), "bits": bits}), base.activation)
            rules.append(Rule(name, spec, "exact"))
        return cls(tuple(rules))

    def with_rules(self, *rules: Rule) -> Recipe:
        """A copy with ``rules`` appended (they override earlier rules of the same kind)."""
        return Recipe(self.rules + tuple(rules), self.version)

    # resolution ---------------------------------------------------------------------------------------------
    def resolve(self, model: nn.Module, strict: bool = True) -> dict[str, QuantSpec]:
        """Map each quantizable module name to its spec (modules resolved to ``None`` are left out).

        Raises ValueError when an exact target is not a module of the model or not a Linear/Conv2d, and (if
        ``strict``) when a pattern matches no quantizable module.
        """
        all_names = {n for n, _ in model.named_modules() if n}
        candidates = quantizable_names(model)
        opaque = opaque_linear_names(model)
        chosen: dict[str, tuple[tuple[int, int], QuantSpec | None]] = {}
        problems = []
        for idx, rule in enumerate(self.rules):
            if rule.match == "exact":
                if rule.target not in all_names:
                    problems.append(f"rule {idx} names module {rule.target!r}, which does not exist")
                    continue
                if rule.target in opaque:
                    problems.append(
                        f"rule {idx} names {rule.target!r}, the out_proj of an nn.MultiheadAttention, which "
                        "reads its weight directly; it cannot be fake-quantized by module swapping"
                    )
                    continue
                if rule.target not in candidates:
                    kind = type(model.get_submodule(rule.target)).__name__
                    problems.append(
                        f"rule {idx} names {rule.target!r}, a {kind}; only Linear/Conv2d are quantizable"
                    )
                    continue
            hits = [n for n in candidates if rule.matches(n)]
            if not hits and rule.match != "exact" and strict:
                problems.append(
                    f"rule {idx} pattern {rule.target!r} ({rule.match}) matches no Linear/Conv2d module"
                )
            priority = (1 if rule.match == "exact" else 0, idx)
            for n in hits:
                if n not in chosen or priority > chosen[n][0]:
                    chosen[n] = (priority, rule.spec)
        if problems:
            raise ValueError("recipe does not fit the model:\n  " + "\n  ".join(problems))
        return {n: spec for n in candidates if n in chosen and (spec := chosen[n][1]) is not None}

    # serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        if not isinstance(d, Mapping) or "rules" not in d:
            raise ValueError("Recipe.from_dict: expected a mapping with a 'rules' list")
        unknown = set(d) - {"version", "rules"}
        if unknown:
            raise ValueError(f"Recipe.from_dict: unknown field(s) {sorted(unknown)}; allowed: rules, version")
        if not isinstance(d["rules"], list):
            raise ValueError("Recipe.from_dict: 'rules' must be a list")
        return cls(tuple(Rule.from_dict(r) for r in d["rules"]), d.get("version", RECIPE_VERSION))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            data = load_yaml_strict(text)
        except yaml.YAMLError as e:
            raise ValueError(f"recipe YAML does not parse: {e}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = loads_json_strict(text)
        except ValueError as e:  # malformed JSON or a duplicate key
            raise ValueError(f"recipe JSON does not parse: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write YAML for ``.yaml``/``.yml``, JSON for ``.json`` (atomically)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            atomic_write_text(path, self.to_yaml())
        elif path.suffix == ".json":
            atomic_write_text(path, self.to_json())
        else:
            raise ValueError(f"recipe path must end in .yaml, .yml or .json, got {path.name!r}")

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a recipe, not UTF-8 text ({e})") from None
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"recipe path must end in .yaml, .yml or .json, got {path.name!r}")
        try:
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except ValueError as e:  # the file, not only the field
            raise ValueError(f"{path}: {e}") from None


def as_recipe(recipe: Recipe | QuantSpec | Mapping[str, QuantSpec | None]) -> Recipe:
    """Accept a Recipe, one QuantSpec for every layer, or a {exact name: spec} mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, QuantSpec):
        return Recipe.uniform(recipe)
    if isinstance(recipe, Mapping):
        return Recipe(tuple(Rule(n, s, "exact") for n, s in recipe.items()))
    raise ValueError(
        f"expected a Recipe, QuantSpec or mapping of names to specs, got {type(recipe).__name__}"
    )


def recipe_table(model: nn.Module, recipe: Recipe | QuantSpec | Mapping[str, QuantSpec | None]) -> str:
    """Markdown table, one row per Linear/Conv2d: name, shape, spec, FP16 bytes and ideal quantized bytes."""
    from .bytes import format_bytes, ideal_weight_bytes

    specs = as_recipe(recipe).resolve(model)
    lines = ["| module | shape | spec | fp16 bytes | quantized bytes (ideal) |", "|---|---|---|---:|---:|"]
    tot_fp = tot_q = 0
    for name in quantizable_names(model):
        w = model.get_submodule(name).weight
        spec = specs.get(name)
        fp = w.numel() * 2
        q = fp if spec is None else ideal_weight_bytes(w.shape[0], w[0].numel(), spec.weight)
        tot_fp, tot_q = tot_fp + fp, tot_q + q
        label = "float" if spec is None else spec.short()
        lines.append(f"| {name} | {tuple(w.shape)} | {label} | {format_bytes(fp)} | {format_bytes(q)} |")
    lines.append(f"| **total** | | | {format_bytes(tot_fp)} | {format_bytes(tot_q)} |")
    return "\n".join(lines)
