"""Deployable modules: real low-bit CPU kernels built from fake-quant layers.

- ``Int8DynamicLinear``: int8 symmetric weights (per channel or tensor) x int8 dynamic per-token activations
  via ``torch._int_mm`` (exact int32 accumulation), then one float rescale. Matches the fake-quant
  W8A8-dynamic layer up to fp32 summation order.
- ``Int8WeightOnlyLinear``: int8 symmetric per-channel weights, activations in bf16 (default, fast) or fp32
  (``aten._weight_int8pack_mm``).
- ``Int4WeightOnlyLinear``: 4-bit per-group weights (group 32/64/128/256, out_features % 16 == 0) packed for
  ``aten._weight_int4pack_mm_for_cpu``; activations in bf16 (default, the fast path) or fp32.

``to_deployable_`` converts what a kernel can run exactly and keeps every other fake-quant layer, listing the
reason in the returned report (and the log); ``strict=True`` raises instead. Given a measured cost model
(``measure_cost_model``: each weight-only layer's packed kernel and its float twin timed at the rows it sees
per call, on this machine), a layer whose packed kernel does not beat float runs as ``FloatWeightLinear``
(the dequantized weight in fp32: the same numbers as the fake-quant layer) and the report says so with both
times: on a CPU without bf16 or VNNI instructions the packed int4 kernel loses at small widths (issue #30).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ._util import set_module
from .fake import QuantConv2d, QuantLinear, dynamic_token_qparams
from .spec import QuantSpec

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _copy_bias(src: QuantLinear) -> nn.Parameter | None:
    return None if src.bias is None else nn.Parameter(src.bias.detach().clone(), requires_grad=False)


class Int8DynamicLinear(nn.Module):
    """W8A8: int8 weight [out, in] x per-token int8 activation, int32 accumulate (``torch._int_mm``)."""

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, bias: nn.Parameter | None, spec: QuantSpec
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.spec = spec
        # [out, in] row-major, given to _int_mm as a column-major [in, out] view: measured ~1.7x faster
        # on this CPU at batch 1 than a contiguous [in, out] copy
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("weight_scale", scale.float().reshape(1, -1))  # [1, out] or [1, 1]
        self.bias = bias

    @classmethod
    def from_quant(cls, layer: QuantLinear) -> Int8DynamicLinear:
        return cls(layer.qweight, layer.weight_scale, _copy_bias(layer), layer.spec)

    def weight_storage_bytes(self) -> int:
        return self.qweight.nbytes + self.weight_scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        scale_x, _ = dynamic_token_qparams(x2, self.spec.activation, dim=-1)
        qx = torch.clamp(torch.round(x2 / scale_x), -128, 127).to(torch.int8)
        y = torch._int_mm(qx, self.qweight.t()).float() * (scale_x * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int8WeightOnlyLinear(nn.Module):
    """W8 weight-only: int8 per-channel weight, bf16 (fast) or fp32 activations (``_weight_int8pack_mm``)."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: nn.Parameter | None,
        spec: QuantSpec,
        compute_dtype: str = "bfloat16",
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.spec = spec
        dt = COMPUTE_DTYPES[compute_dtype]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("weight_scale", scale.to(dt).reshape(-1).expand(self.out_features).contiguous())
        self.bias = bias

    @classmethod
    def from_quant(cls, layer: QuantLinear, compute_dtype: str = "bfloat16") -> Int8WeightOnlyLinear:
        return cls(layer.qweight, layer.weight_scale, _copy_bias(layer), layer.spec, compute_dtype)

    def weight_storage_bytes(self) -> int:
        return self.qweight.nbytes + self.weight_scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.weight_scale.dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int4WeightOnlyLinear(nn.Module):
    """W4 per-group weight-only with the CPU tinygemm kernel: w = (u - 8) * scale + zero, u in [0, 15]."""

    def __init__(
        self,
        packed: torch.Tensor,
        scale_and_zero: torch.Tensor,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: nn.Parameter | None,
        spec: QuantSpec,
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.spec = spec
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.bias = bias

    @classmethod
    def from_quant(cls, layer: QuantLinear, compute_dtype: str = "bfloat16") -> Int4WeightOnlyLinear:
        ws = layer.spec.weight
        codes = layer.qweight.to(torch.int32)
        scale = layer.weight_scale.float()  # [out, groups]
        if ws.symmetric:
            unsigned, zero = codes + 8, torch.zeros_like(scale)
        else:  # (u - z) * s == (u - 8) * s + (8 - z) * s
            unsigned, zero = codes, (8 - layer.weight_zero_point.float()) * scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
        dt = COMPUTE_DTYPES[compute_dtype]
        scale_and_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(dt).contiguous()  # [groups, out, 2]
        return cls(
            packed,
            scale_and_zero,
            ws.group_size,
            layer.in_features,
            layer.out_features,
            _copy_bias(layer),
            layer.spec,
        )

    def weight_storage_bytes(self) -> int:
        return self.packed_weight.nbytes + self.scale_and_zero.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scale_and_zero.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed_weight, self.group_size, self.scale_and_zero
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class FloatWeightLinear(nn.Module):
    """A weight-only layer whose packed kernel does not pay here: fp32 linear on the dequantized weight
    (what the fake-quant layer computes, without dequantizing at every call)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.spec = layer.spec
        self.register_buffer("weight", layer.dequantized_weight().detach().float().contiguous())
        self.bias = _copy_bias(layer)

    def weight_storage_bytes(self) -> int:
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight, bias).to(x.dtype)


DEPLOYABLE_TYPES = (Int8DynamicLinear, Int8WeightOnlyLinear, Int4WeightOnlyLinear, FloatWeightLinear)
WEIGHT_ONLY_KINDS = ("int4_weight_only", "int8_weight_only")  # those a cost model may keep in float


def deployable_kind(layer: nn.Module) -> tuple[str | None, str]:
    """(kernel name or None, reason). The single place that decides which kernel runs which spec."""
    if isinstance(layer, QuantConv2d):
        return None, "no packed Conv2d kernel on CPU; kept as fake-quant"
    if not isinstance(layer, QuantLinear):
        return None, f"{type(layer).__name__} is not a fake-quant layer"
    w, a = layer.spec.weight, layer.spec.activation
    if w.is_float:
        return None, "bits=16: weight kept in float"
    if a is not None and a.mode == "static_per_tensor":
        return None, "static per-tensor activation quantization has no packed kernel here"
    if w.bits == 8:
        if not w.symmetric:
            return None, "asymmetric int8 weights: the int8 kernels need symmetric weights"
        if a is None:
            if w.granularity == "per_group":
                return None, "int8 weight-only kernel supports per-channel/per-tensor scales, not per-group"
            return "int8_weight_only", "aten._weight_int8pack_mm"
        if a.bits != 8 or not a.symmetric:
            return None, f"activation {a.short()}: the int8 kernel needs symmetric 8-bit activations"
        if w.granularity == "per_group":
            return None, "int8 dynamic kernel supports per-channel/per-tensor weight scales, not per-group"
        return "int8_dynamic", "torch._int_mm"
    if w.bits == 4:
        if a is not None:
            return None, f"W4 with activation quantization ({a.short()}): no W4A8 kernel on this CPU build"
        if w.granularity != "per_group" or w.group_size not in INT4_GROUP_SIZES:
            return None, f"int4 kernel needs per-group scales with group size in {INT4_GROUP_SIZES}"
        if layer.out_features % 16:
            return None, f"int4 kernel needs out_features % 16 == 0, got {layer.out_features}"
        return "int4_weight_only", "aten._weight_int4pack_mm_for_cpu"
    return None, f"{w.bits}-bit weights: no packed kernel (only 4- and 8-bit)"


@dataclass(frozen=True)
class DeployRow:
    name: str
    spec: str
    kernel: str | None  # None: kept as fake-quant
    reason: str


@dataclass(frozen=True)
class DeployReport:
    rows: tuple[DeployRow, ...]

    @property
    def converted(self) -> list[str]:
        return [r.name for r in self.rows if r.kernel is not None]

    @property
    def packed(self) -> list[str]:
        """Layers running a packed low-bit kernel (not the cost model's fp32 ``float_dequantized``)."""
        return [r.name for r in self.rows if r.kernel not in (None, "float_dequantized")]

    @property
    def kept(self) -> list[str]:
        return [r.name for r in self.rows if r.kernel is None]

    def to_markdown(self) -> str:
        lines = ["| module | spec | kernel | note |", "|---|---|---|---|"]
        lines += [
            f"| {r.name} | {r.spec} | {r.kernel or 'fake-quant (kept)'} | {r.reason} |" for r in self.rows
        ]
        return "\n".join(lines)


# ---- the measured cost model: does a packed kernel pay for this layer on this machine? ---------------------
@dataclass(frozen=True)
class LayerCost:
    """Seconds per forward of one layer shape: its packed kernel and the fp32 linear it would replace."""

    packed_s: float
    float_s: float


CostKey = tuple[str, int, int, int, int, str]  # (kernel, rows M, K, N, group size, compute dtype)


def cost_key(kind: str, rows: int, layer: QuantLinear, compute_dtype: str) -> CostKey:
    ws = layer.spec.weight
    group = ws.group_size if ws.granularity == "per_group" else 0
    return (kind, int(rows), layer.in_features, layer.out_features, int(group or 0), compute_dtype)


def decide_packed(name: str, key: CostKey, cost_model: Mapping[CostKey, LayerCost]) -> tuple[bool, str]:
    """(use the packed kernel?, the reason with both times). A layer missing from the table is an error."""
    if key not in cost_model:
        raise ValueError(
            f"{name}: no measured cost for {key} (kernel, rows, K, N, group, dtype) in the cost model; "
            "measure it with measure_cost_model(model, rows) on this machine"
        )
    c = cost_model[key]
    times = f"packed {c.packed_s * 1e3:.3f} ms vs float {c.float_s * 1e3:.3f} ms at {key[1]} rows"
    if c.packed_s < c.float_s:
        return True, f"cost model: {times}"
    return False, f"cost model: {times}; packed does not pay, fp32 on the dequantized weight"


def record_layer_rows(model: nn.Module, call: Callable[[], object]) -> dict[str, int]:
    """Rows (tokens x batch) each fake-quant linear sees per forward during ``call()``, by name (the most
    seen): what a layer's kernel is timed at."""
    rows: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):

            def hook(mod, args, name=name):
                x = args[0]
                rows[name] = max(rows.get(name, 0), x.numel() // max(x.shape[-1], 1))

            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return rows


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def measure_cost_model(
    model: nn.Module, rows: Mapping[str, int], compute_dtype: str = "bfloat16", repeats: int = 5
) -> dict[CostKey, LayerCost]:
    """Time each distinct weight-only layer shape's packed kernel and its fp32 twin on this machine (at the
    rows ``record_layer_rows`` saw; 1 where unseen), best of ``repeats``, on torch's current threads."""
    table: dict[CostKey, LayerCost] = {}
    for name, layer in model.named_modules():
        kind, _ = deployable_kind(layer)
        if kind not in WEIGHT_ONLY_KINDS:
            continue
        key = cost_key(kind, rows.get(name, 1), layer, compute_dtype)
        if key in table:
            continue
        packed_type = Int4WeightOnlyLinear if kind == "int4_weight_only" else Int8WeightOnlyLinear
        packed = packed_type.from_quant(layer, compute_dtype)
        dense = FloatWeightLinear(layer)
        x = torch.randn(key[1], layer.in_features)
        packed_s = _best_seconds(partial(packed, x), repeats)
        table[key] = LayerCost(packed_s, _best_seconds(partial(dense, x), repeats))
    return table


@torch.no_grad()
def to_deployable_(
    model: nn.Module,
    *,
    strict: bool = False,
    compute_dtype: str = "bfloat16",
    cost_model: Mapping[CostKey, LayerCost] | None = None,
    rows: Mapping[str, int] | None = None,
) -> DeployReport:
    """Replace fake-quant layers by packed kernel modules in place; report every layer and why it was kept.

    ``strict=True`` raises ValueError if any fake-quant layer cannot be converted. The converted model no
    longer holds the float weights: save the fake-quant model (``save_quantized``) before converting.
    ``cost_model`` (``measure_cost_model``) with ``rows`` (``record_layer_rows``): a weight-only layer whose
    packed kernel is not faster than fp32 at its rows becomes a ``FloatWeightLinear``, reported as such.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear | QuantConv2d)]
    plan = [(n, m, *deployable_kind(m)) for n, m in layers]
    if cost_model is not None:
        decided = []
        for n, m, kind, why in plan:
            if kind in WEIGHT_ONLY_KINDS:
                pays, why = decide_packed(
                    n, cost_key(kind, (rows or {}).get(n, 1), m, compute_dtype), cost_model
                )
                kind = kind if pays else "float_dequantized"
            decided.append((n, m, kind, why))
        plan = decided
    if strict:
        bad = [f"{n}: {why}" for n, _, kind, why in plan if kind is None]
        if bad:
            raise ValueError(
                "to_deployable_(strict=True): layers without a packed kernel:\n  " + "\n  ".join(bad)
            )
    rows = []
    for name, layer, kind, why in plan:
        if kind is None:
            log.warning("to_deployable_: %s (%s) kept as fake-quant: %s", name, layer.spec.short(), why)
        elif kind == "int8_dynamic":
            set_module(model, name, Int8DynamicLinear.from_quant(layer))
        elif kind == "int8_weight_only":
            set_module(model, name, Int8WeightOnlyLinear.from_quant(layer, compute_dtype))
        elif kind == "float_dequantized":
            set_module(model, name, FloatWeightLinear(layer))
        else:
            set_module(model, name, Int4WeightOnlyLinear.from_quant(layer, compute_dtype))
        rows.append(DeployRow(name, layer.spec.short(), kind, why))
    return DeployReport(tuple(rows))
