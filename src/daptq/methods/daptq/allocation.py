"""Bit allocation: the paper's two-level map (Eq. 20) and daptq's exact allocator under a memory budget.

- :func:`paper_bit_map` (Eq. 20): every layer of the last ``float_blocks`` DiT blocks stays float; of the
  remaining ranked (action-head and interface) layers the top ``keep_float_fraction`` by ``phi`` stay float
  (bf16), the rest get ``low_bits`` (4). The count kept float is ``round_half_up(k * n)``. The float blocks
  are taken out *before* ranking, so ``k`` adds float layers beyond them (the ranking would otherwise mostly
  re-select layers that are float anyway).
- :func:`allocate_bits`: a multiple-choice knapsack, one candidate per layer from a candidate set (bit widths
  {2, 3, 4, 8, 16} on one grid, or :class:`WeightFormat` choices such as 2-bit codes in groups of 32 or 128,
  8-bit per channel, bf16), minimizing ``sum cost(l, b) + latency_weight * latency(l, b)`` subject to
  ``sum bytes(l, b) <= budget``, solved exactly as a MILP with ``scipy.optimize.milp`` (HiGHS). Bytes are
  :func:`daptq.quant.ideal_weight_bytes` (codes + scales + zero points; float = 2 bytes per weight), so an
  average-bit budget counts the scales and zero points too. An impossible budget raises an error naming
  the smallest feasible one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import LinearConstraint, milp

from daptq.quant import WeightSpec, ideal_weight_bytes

FLOAT_BITS = 16


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def float_block_layers(names: Sequence[str], block_of: Mapping[str, int], float_blocks: int) -> set[str]:
    """Layers among ``names`` inside the last ``float_blocks`` blocks of a stack; ``block_of`` maps a layer
    of that stack to its block index (the adapter's ``QuantizableModule.block``)."""
    if float_blocks < 0:
        raise ValueError(f"float_blocks must be >= 0, got {float_blocks}")
    indices = {n: block_of[n] for n in names if n in block_of}
    if float_blocks == 0:
        return set()
    if not indices:
        raise ValueError(f"float_blocks={float_blocks} but no ranked layer lies in a block of the stack")
    blocks = sorted(set(indices.values()))
    if float_blocks > len(blocks):
        raise ValueError(f"float_blocks={float_blocks} but the stack has {len(blocks)} blocks")
    kept = set(blocks[-float_blocks:])
    return {n for n, i in indices.items() if i in kept}


@dataclass(frozen=True)
class PaperBitMap:
    bits: dict[str, int]  # layer -> 16 (float) or low_bits
    ranked: list[str]  # ranked layers, most sensitive first
    float_by_rank: list[str]
    float_by_block: list[str]


def paper_bit_map(
    phi: Mapping[str, float],
    keep_float_fraction: float = 0.3,
    low_bits: int = 4,
    block_of: Mapping[str, int] | None = None,
    float_blocks: int = 2,
) -> PaperBitMap:
    """Eq. 20 over the layers in ``phi`` (the action head and interface, as the paper's scope); the last
    ``float_blocks`` blocks of the stack ``block_of`` indexes (layer -> block) stay float."""
    if not 0.0 <= keep_float_fraction <= 1.0:
        raise ValueError(f"keep_float_fraction must be in [0, 1], got {keep_float_fraction}")
    if not phi:
        raise ValueError("paper_bit_map: no layers to rank")
    by_block = float_block_layers(list(phi), block_of or {}, float_blocks)
    ranked = sorted((n for n in phi if n not in by_block), key=lambda n: (-phi[n], n))
    by_rank = ranked[: round_half_up(keep_float_fraction * len(ranked))]
    floats = set(by_rank) | by_block
    bits = {n: FLOAT_BITS if n in floats else low_bits for n in phi}
    return PaperBitMap(bits, ranked, by_rank, sorted(by_block))


@dataclass(frozen=True, order=True)
class WeightFormat:
    """One allocator choice: a bit width and a group size (None: one scale per output channel; 16: bf16),
    or a sub-2-bit codebook (``daptq.quant.WeightSpec.codebook``: ternary or binary codes with a scale per
    group).

    Written ``"2g32"`` (2-bit codes, groups of 32), ``"8pc"`` (8-bit per channel), ``"16"`` (float),
    ``"terng64"`` (ternary, groups of 64: 1.6 + 16/64 bits per weight) or ``"bing128"`` (binary, groups of
    128: 1 + 16/128). The other grid properties (symmetry, observer, scale dtype) come from the base spec;
    a codebook format is symmetric with the min-max observer whatever the base spec says."""

    bits: int
    group_size: int | None = None
    codebook: str = "uniform"

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8, FLOAT_BITS):
            raise ValueError(f"WeightFormat: bits must be one of (2, 3, 4, 8, 16), got {self.bits!r}")
        if self.bits == FLOAT_BITS and self.group_size is not None:
            raise ValueError("WeightFormat: a float (16-bit) format has no group size")
        if self.group_size is not None and (type(self.group_size) is not int or self.group_size < 2):
            raise ValueError(f"WeightFormat: group_size must be an integer >= 2, got {self.group_size!r}")
        if self.codebook not in _CODEBOOK_PREFIX:
            raise ValueError(f"WeightFormat: codebook must be one of {tuple(_CODEBOOK_PREFIX)}")
        if self.codebook != "uniform" and self.bits != 2:
            raise ValueError(f"WeightFormat: a {self.codebook} format has bits=2 (its signed code grid)")

    @property
    def label(self) -> str:
        if self.bits == FLOAT_BITS:
            return "16"
        head = _CODEBOOK_PREFIX[self.codebook] or str(self.bits)
        return f"{head}pc" if self.group_size is None else f"{head}g{self.group_size}"

    @property
    def code_bits(self) -> float:
        """Bits per code (ternary 1.6, binary 1), for ordering."""
        return {"uniform": float(self.bits), "ternary": 1.6, "binary": 1.0}[self.codebook]

    @classmethod
    def parse(cls, text: str) -> WeightFormat:
        t = str(text).strip()
        m = re.fullmatch(r"(\d+|tern|bin)(?:g(\d+)|pc)?", t)
        if m is None or (m.group(1) != "16" and not re.search(r"(g\d+|pc)$", t)):
            raise ValueError(
                f"weight format {text!r}: expected '<bits>g<group>' (e.g. '2g32'), '<bits>pc' (per channel), "
                "'terng<group>' / 'bing<group>' (ternary / binary, e.g. 'terng64') or '16' (float)"
            )
        group = int(m.group(2)) if m.group(2) else None
        codebook = {v: k for k, v in _CODEBOOK_PREFIX.items() if v}.get(m.group(1), "uniform")
        bits = 2 if codebook != "uniform" else int(m.group(1))
        return cls(bits, group, codebook)

    def weight_spec(self, base: WeightSpec) -> WeightSpec:
        """``base`` with this format's bits and grouping (a float format keeps only bits=16)."""
        if self.bits == FLOAT_BITS:
            return dataclasses.replace(base, bits=FLOAT_BITS)
        granularity = "per_channel" if self.group_size is None else "per_group"
        spec = dataclasses.replace(base, bits=self.bits, granularity=granularity, group_size=self.group_size)
        if self.codebook != "uniform":
            spec = dataclasses.replace(
                spec, symmetric=True, observer="minmax", symmetric_range="restricted", codebook=self.codebook
            )
        return spec


_CODEBOOK_PREFIX = {"uniform": "", "ternary": "tern", "binary": "bin"}


# Candidates reaching below 2.5 bits per weight once scales and zero points are counted (asymmetric codes,
# bf16 scales: 2g128 = 2.14, 2g32 = 2.56, 3g128 = 3.16, 4g128 = 4.16, 8pc ~ 8, 16 = bf16).
GROUPED_FORMATS: tuple[str, ...] = ("2g32", "2g128", "3g32", "3g128", "4g32", "4g128", "8pc", "16")
# Below two bits (bf16 scales): bing128 = 1.125, bing64 = 1.25, terng128 = 1.725, terng64 = 1.85, then the
# grouped grid: an average of 1.5 bits is feasible.
SUB2_FORMATS: tuple[str, ...] = ("bing128", "bing64", "terng128", "terng64", *GROUPED_FORMATS)
FORMAT_SETS = {"grouped": GROUPED_FORMATS, "sub2": SUB2_FORMATS}


@dataclass(frozen=True)
class LayerShape:
    out_features: int
    fan_in: int

    @property
    def n_weights(self) -> int:
        return self.out_features * self.fan_in


@dataclass(frozen=True)
class Allocation:
    bits: dict[str, Hashable]  # layer -> the chosen candidate (a bit width or a WeightFormat)
    objective: float
    total_bytes: int
    budget_bytes: int
    n_weights: int

    @property
    def average_bits(self) -> float:
        """Bits per weight, counting scales and zero points."""
        return 8.0 * self.total_bytes / self.n_weights


BitSpecs = Mapping[Hashable, WeightSpec] | Mapping[str, Mapping[Hashable, WeightSpec]]


def layer_bytes(shape: LayerShape, bits: Hashable, specs: Mapping[Hashable, WeightSpec]) -> int:
    return ideal_weight_bytes(shape.out_features, shape.fan_in, specs[bits])


def _specs_of(specs: BitSpecs, name: str) -> Mapping[Hashable, WeightSpec]:
    """One shared ``{choice: spec}`` or per layer ``{layer: {choice: spec}}`` (group sizes fitted per layer).

    Choices are bit widths (int) or :class:`WeightFormat`; layer names are strings."""
    if not any(isinstance(k, str) for k in specs):
        return specs  # type: ignore[return-value]
    if name not in specs:
        raise ValueError(f"allocate_bits: no specs for layer {name!r}")
    return specs[name]  # type: ignore[index]


def budget_from_average_bits(shapes: Mapping[str, LayerShape], average_bits: float) -> int:
    """Bytes allowed by an average-bit budget: ``floor(average_bits * n_weights / 8)``."""
    if not average_bits > 0:
        raise ValueError(f"average bits must be > 0, got {average_bits}")
    return int(math.floor(average_bits * sum(s.n_weights for s in shapes.values()) / 8 + 1e-9))


def allocate_bits(
    costs: Mapping[str, Mapping[Hashable, float]],
    shapes: Mapping[str, LayerShape],
    specs: BitSpecs,
    budget_bytes: int,
    latency: Mapping[str, Mapping[Hashable, float]] | None = None,
    latency_weight: float = 0.0,
) -> Allocation:
    """Exact multiple-choice knapsack: one of ``costs[layer]``'s choices per layer under ``budget_bytes``.

    A choice is a bit width or a :class:`WeightFormat` (bits and group size). ``costs[layer][choice]`` is the
    estimated damage (e.g. :func:`bit_sensitivities`), ``specs[choice]`` (or ``specs[layer][choice]``) the
    spec whose bytes are counted, ``latency[layer][bits]`` an optional latency
    model weighted by ``latency_weight``. Raises ValueError naming the smallest feasible budget if none fits.
    """
    names = list(costs)
    if not names:
        raise ValueError("allocate_bits: no layers")
    if set(names) - set(shapes):
        raise ValueError(f"allocate_bits: no shape for {sorted(set(names) - set(shapes))[:5]}")
    if latency_weight and latency is None:
        raise ValueError("allocate_bits: latency_weight given without a latency model")
    var_layer, var_bits, c, size = [], [], [], []
    for li, name in enumerate(names):
        if not costs[name]:
            raise ValueError(f"allocate_bits: layer {name!r} has no candidate bit widths")
        layer_specs = _specs_of(specs, name)
        for bits, cost in sorted(costs[name].items(), key=lambda kv: _order(kv[0])):
            if bits not in layer_specs:
                raise ValueError(f"allocate_bits: no spec for {bits} bits (layer {name!r})")
            if not math.isfinite(cost):
                raise ValueError(f"allocate_bits: cost of {name!r} at {bits} bits is not finite")
            extra = latency_weight * latency[name][bits] if latency_weight else 0.0  # type: ignore[index]
            var_layer.append(li)
            var_bits.append(bits)
            c.append(cost + extra)
            size.append(layer_bytes(shapes[name], bits, layer_specs))
    n_weights = sum(shapes[n].n_weights for n in names)
    smallest = sum(
        min(s for s, li in zip(size, var_layer, strict=True) if li == k) for k in range(len(names))
    )
    if budget_bytes < smallest:
        raise ValueError(
            f"budget of {budget_bytes} bytes ({8 * budget_bytes / n_weights:.3f} bits per weight) is "
            f"infeasible: the smallest feasible budget for these {len(names)} layers is {smallest} bytes "
            f"({8 * smallest / n_weights:.3f} bits per weight, scales and zero points counted)"
        )
    nv = len(c)
    one_hot = np.zeros((len(names), nv))
    one_hot[var_layer, np.arange(nv)] = 1.0
    constraints = [
        LinearConstraint(one_hot, 1, 1),
        LinearConstraint(np.asarray(size, dtype=float)[None], -np.inf, budget_bytes),
    ]
    res = milp(np.asarray(c), constraints=constraints, integrality=np.ones(nv), bounds=(0, 1))
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"allocate_bits: HiGHS did not find an optimum: {res.message}")
    chosen = np.round(res.x).astype(int)
    bits = {names[var_layer[i]]: var_bits[i] for i in range(nv) if chosen[i]}
    total = int(sum(size[i] for i in range(nv) if chosen[i]))
    if len(bits) != len(names) or total > budget_bytes:  # guard against tolerance-level violations
        raise RuntimeError(f"allocate_bits: solver returned an invalid selection ({total} > {budget_bytes})")
    objective = float(sum(c[i] for i in range(nv) if chosen[i]))
    return Allocation(bits, objective, total, budget_bytes, n_weights)


def _order(choice: Hashable) -> tuple:
    """Sort key of a choice: by code bits, then group size (per channel last); a (weight, activation bits)
    pair by its weight choice, then its activation bits."""
    if isinstance(choice, tuple):
        return (*_order(choice[0]), int(choice[1]))
    if isinstance(choice, WeightFormat):
        return choice.code_bits, choice.group_size or 1 << 30
    return float(choice), 0  # type: ignore[arg-type]
