"""QVLA (ICLR 2026): action-centric channel-wise bit widths.

Every output channel (row) of a scoped Linear gets its own weight bit width in {16, 8, 4, 2, 0} (0 = pruned,
16 = kept as a float16 row); weights are rounded per output channel (symmetric min-max RTN), activations are
quantized uniformly (one spec for the whole layer).

- **Sensitivity** of channel c at b bits: the first-order proxy ``||J_c|| * ||(Q_b(W) - W)_c X||``, J_c the
  Jacobian of the action output w.r.t. channel c of the layer output (reverse-mode autograd with Gaussian
  probes v: ``E ||(J^T v)_c||^2 = ||J_c||_F^2``); the output error uses the calibration input Gram matrix
  ``H = E[X^T X]``: ``||dW_c X||^2 = dW_c H dW_c^T``. Both are per calibration sample (sums over tokens and
  over every call of the layer in a sample, e.g. every denoising step).
- **Exact check**: the ``exact_top_k`` largest proxies are re-measured by forward passes (only that channel
  quantized); those candidates use the measured deviation, the others the proxy rescaled by the median ratio
  exact/proxy of the checked set, so both are in the same units. The Spearman correlation of proxy and exact
  on the checked set is recorded.
- **Allocation**: global greedy demotion 16 -> 8 -> 4 -> 2 -> 0: the next step of every channel is ordered by
  sensitivity increase per bit saved (bits saved = level drop x fan-in); a step that would undershoot the
  budget retires its channel; if a gap remains, one exchange (undo a step, take another) closes it, else a
  small knapsack re-levels the cheapest candidate channels (layers of unrelated fan-ins, e.g. a DiT's 7-wide
  action embedder). The budget (average bits per weight over the scope) is met exactly or, when no
  allocation can meet it, it is a clear error.

Storage (``mixed_state`` / ``load_mixed_state``): per layer a uint8 ``row_bits`` map, then channel groups by
bit width in row order: 2-, 4- and 8-bit codes packed 4, 2 and 1 per byte, one bfloat16 scale per row,
float16 rows for 16 bits, nothing for pruned rows. Bytes are the stored tensors' ``nbytes``
(``mixed_bytes``; ``daptq.quant.bytes.mixed_weight_bytes`` from the widths alone). No single kernel takes
mixed widths; ``daptq export`` lowers such a layer to one MatMulNBits per width group (2-bit included) plus
a Concat and a row Gather (``daptq.deploy.lowering.MixedNBitsLinear``), exact against this fake-quant layer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from daptq.atomic import atomic_write_bytes
from daptq.methods import register_method
from daptq.methods.base import Method, MethodConfig, require_plan
from daptq.methods.record import QuantRecord
from daptq.models.adapter import VLAAdapter
from daptq.quant import ActivationSpec, QuantSpec, WeightSpec, quantize_weight
from daptq.quant.bytes import mixed_weight_bytes
from daptq.quant.category import registered_type
from daptq.quant.fake import dequantize_weight, fake_quantize_activation
from daptq.quant.io import pack_codes, unpack_codes

QVLA_BITS = (16, 8, 4, 2, 0)  # demotion order
INT_BITS = (8, 4, 2)
SCALE_DTYPE = "bfloat16"

# action_fn(batch, generator) -> action tensor (B, ...), differentiable w.r.t. the scoped layers' outputs.
ActionFn = Callable[[Any, torch.Generator], torch.Tensor]


def row_spec(bits: int) -> WeightSpec:
    return WeightSpec(bits, symmetric=True, granularity="per_channel", scale_dtype=SCALE_DTYPE)


def row_rtn(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in], scales [out, 1], dequantized [out, in]) of per-row symmetric RTN at ``bits``."""
    spec = row_spec(bits)
    codes, scale, _ = quantize_weight(weight, spec)
    return codes, scale, dequantize_weight(codes, scale, None, spec)


def candidate_weights(weight: torch.Tensor) -> dict[int, torch.Tensor]:
    """The float32 weight each row would have at each bit width (16 rounds to float16, 0 prunes)."""
    w = weight.detach().float()
    out = {16: w.half().float(), 0: torch.zeros_like(w)}
    for b in INT_BITS:
        out[b] = row_rtn(w, b)[2]
    return out


# ---- the fake-quant layer ---------------------------------------------------------------------------------
class MixedBitLinear(nn.Linear):
    """nn.Linear whose rows have their own bit widths; float weight, codes and scales kept side by side."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_state(None)

    def _init_state(self, activation: ActivationSpec | None) -> None:
        self.activation = activation
        self.register_buffer("row_bits", torch.full((self.out_features,), 16, dtype=torch.uint8))
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(self.out_features, dtype=torch.bfloat16))
        self.register_buffer("row_float", self.weight.detach().half().clone())
        self.register_buffer("_dequant_cache", None, persistent=False)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, row_bits: torch.Tensor, activation: ActivationSpec | None = None
    ) -> MixedBitLinear:
        """Wrap (sharing the float parameters) and round each row at its width."""
        if type(linear) is not nn.Linear:
            raise ValueError(
                f"MixedBitLinear.from_float expects a plain nn.Linear, got {type(linear).__name__}"
            )
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q._init_state(activation)
        q.set_row_bits(row_bits)
        return q

    def set_row_bits(self, row_bits: torch.Tensor) -> None:
        bits = torch.as_tensor(row_bits).reshape(-1).to(torch.int64)
        if bits.numel() != self.out_features:
            raise ValueError(f"row_bits has {bits.numel()} entries for {self.out_features} rows")
        bad = sorted(set(bits.tolist()) - set(QVLA_BITS))
        if bad:
            raise ValueError(f"row_bits: widths {bad} are not in {QVLA_BITS}")
        w = self.weight.detach().float()
        qweight = torch.zeros(w.shape, dtype=torch.int8)
        scale = torch.ones(self.out_features, dtype=torch.bfloat16)
        for b in INT_BITS:
            rows = bits == b
            if rows.any():
                codes, s, _ = row_rtn(w[rows], b)
                qweight[rows], scale[rows] = codes, s.reshape(-1)
        self.row_bits = bits.to(torch.uint8)
        self.qweight, self.weight_scale = qweight, scale
        self.row_float = w.half()
        self._dequant_cache = None

    def dequantized_weight(self) -> torch.Tensor:
        if self._dequant_cache is None:
            bits = self.row_bits.long()
            w = torch.zeros(self.weight.shape, dtype=torch.float32)
            for b in INT_BITS:
                rows = bits == b
                w[rows] = self.qweight[rows].float() * self.weight_scale[rows].float()[:, None]
            rows16 = bits == 16
            w[rows16] = self.row_float[rows16].float()
            self._dequant_cache = w.to(self.weight.dtype)
        return self._dequant_cache

    @property
    def average_bits(self) -> float:
        return float(self.row_bits.double().mean())

    def row_widths(self) -> list[int]:
        """Per-row widths: how ``daptq.quant.bytes.model_bytes`` recognizes and counts a mixed-width layer."""
        return self.row_bits.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            x = fake_quantize_activation(x, self.activation, None, None, -1)
        return F.linear(x, self.dequantized_weight(), self.bias)

    # storage in quantized policy directories (daptq.quant.io custom-module protocol)
    def checkpoint_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = mixed_state(self, prefix)
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias.detach()
        return out

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            "loader": "daptq.methods.qvla:load_mixed_linear",
            "bias": self.bias is not None,
            "activation": None if self.activation is None else self.activation.to_dict(),
            "average_bits": self.average_bits,
        }

    def extra_repr(self) -> str:
        counts = {b: int((self.row_bits == b).sum()) for b in QVLA_BITS}
        act = "" if self.activation is None else f", {self.activation.short()}"
        return f"{super().extra_repr()}, rows by bits={counts}{act}"


# ---- storage ----------------------------------------------------------------------------------------------
def mixed_state(layer: MixedBitLinear, prefix: str) -> dict[str, torch.Tensor]:
    """The stored form of one layer: the bit map, then one packed group per width (see module docstring)."""
    bits = layer.row_bits.long()
    out = {f"{prefix}.row_bits": layer.row_bits.clone()}
    for b in INT_BITS:
        rows = bits == b
        if rows.any():
            out[f"{prefix}.codes_{b}"] = pack_codes(layer.qweight[rows].contiguous(), row_spec(b))
            out[f"{prefix}.scale_{b}"] = layer.weight_scale[rows].contiguous()
    if (bits == 16).any():
        out[f"{prefix}.rows_16"] = layer.row_float[bits == 16].contiguous()
    return out


def load_mixed_state(layer: MixedBitLinear, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Install a stored layer; its dequantized weight (and so its outputs) equal the saved one bit for bit."""
    key = f"{prefix}.row_bits"
    if key not in tensors:
        raise ValueError(f"mixed-bit checkpoint has no {key}")
    row_bits = tensors[key].to(torch.uint8)
    if row_bits.shape != (layer.out_features,):
        raise ValueError(f"{key}: shape {tuple(row_bits.shape)} != ({layer.out_features},)")
    bits = row_bits.long()
    bad = sorted(set(bits.tolist()) - set(QVLA_BITS))
    if bad:
        raise ValueError(f"{key}: widths {bad} are not in {QVLA_BITS}")
    qweight = torch.zeros(layer.out_features, layer.in_features, dtype=torch.int8)
    scale = torch.ones(layer.out_features, dtype=torch.bfloat16)
    row_float = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float16)
    for b in INT_BITS:
        rows = bits == b
        n = int(rows.sum())
        if n:
            packed, s = tensors[f"{prefix}.codes_{b}"], tensors[f"{prefix}.scale_{b}"]
            qweight[rows] = unpack_codes(packed, row_spec(b), (n, layer.in_features))
            if s.shape != (n,) or s.dtype != torch.bfloat16:
                raise ValueError(
                    f"{prefix}.scale_{b}: expected ({n},) bfloat16, got {tuple(s.shape)} {s.dtype}"
                )
            scale[rows] = s
    n16 = int((bits == 16).sum())
    if n16:
        rows16 = tensors[f"{prefix}.rows_16"]
        if rows16.shape != (n16, layer.in_features) or rows16.dtype != torch.float16:
            raise ValueError(f"{prefix}.rows_16: expected ({n16}, {layer.in_features}) float16")
        row_float[bits == 16] = rows16
    layer.row_bits, layer.qweight, layer.weight_scale, layer.row_float = row_bits, qweight, scale, row_float
    layer._dequant_cache = None
    with torch.no_grad():
        layer.weight.copy_(layer.dequantized_weight())  # the float weight is not stored


def mixed_bytes(layer: MixedBitLinear) -> dict[str, int]:
    """Stored bytes of a layer's weight (codes + scales + float16 rows + bit map) and the ideal count
    (bits x weights / 8 + one scale per quantized row), bias excluded."""
    state = mixed_state(layer, "x")
    stored = sum(t.numel() * t.element_size() for t in state.values())
    ideal, _ = mixed_weight_bytes(layer.row_widths(), layer.in_features)
    return {"stored_bytes": stored, "ideal_bytes": ideal, "fp16_bytes": layer.weight.numel() * 2}


# ---- sensitivity ------------------------------------------------------------------------------------------
@dataclass
class LayerSensitivity:
    """Per-channel sensitivities of one layer; column j of ``proxy``/``used`` is bit width QVLA_BITS[j]."""

    name: str
    fan_in: int
    jacobian_norm: torch.Tensor  # [out]: sqrt(E ||J_c||^2) per sample
    output_error: torch.Tensor  # [out, 5]: sqrt(E ||dW_c X||^2) per sample
    proxy: torch.Tensor  # [out, 5]
    used: torch.Tensor  # [out, 5]: what allocation uses (exact where checked, rescaled proxy elsewhere)


def _accumulators(
    model: nn.Module, names: Sequence[str]
) -> tuple[dict[str, nn.Linear], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The scoped layers (each an ``nn.Linear``) and zeroed float64 sums: ||J_c||^2 per channel, X^T X."""
    layers = {n: model.get_submodule(n) for n in names}
    for n, m in layers.items():
        if not isinstance(m, nn.Linear):
            raise ValueError(f"QVLA quantizes nn.Linear layers; {n} is a {type(m).__name__}")
    jac = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in layers.items()}
    gram = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    return layers, jac, gram


def _gram_hook(gram: dict[str, torch.Tensor], outputs: dict[str, list[torch.Tensor]], name: str) -> Callable:
    """Forward hook: adds the layer input's X^T X to ``gram[name]``, keeps its output for the probes."""

    def fn(_m, args, out):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        gram[name].add_(x.T @ x)
        outputs[name].append(out)

    return fn


def _run_action(
    action_fn: ActionFn,
    batch: Any,
    seed: int,
    scoped: Sequence[str],
    outputs: dict[str, list[torch.Tensor]],
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The action (with autograd history) and every scoped layer's outputs of that forward, in order."""
    action = action_fn(batch, torch.Generator().manual_seed(seed))
    if not action.requires_grad:
        raise ValueError("action_fn returned a tensor without autograd history")
    missing = [n for n in scoped if not outputs[n]]
    if missing:
        raise ValueError(f"the action function never ran layers {missing[:5]}")
    return action, [(n, t) for n in scoped for t in outputs[n]]


def _add_jac(jac: dict[str, torch.Tensor], name: str, g: torch.Tensor) -> None:
    jac[name] += g.detach().double().reshape(-1, g.shape[-1]).square().sum(0)


def _means(
    jac: dict[str, torch.Tensor], gram: dict[str, torch.Tensor], n_samples: int, n_probes: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    if n_samples == 0:
        raise ValueError("QVLA: no calibration batch")
    return (
        {n: j / (n_samples * n_probes) for n, j in jac.items()},
        {n: g / n_samples for n, g in gram.items()},
        n_samples,
    )


def jacobian_and_gram(
    model: nn.Module,
    names: Sequence[str],
    action_fn: ActionFn,
    batches: Iterable[Any],
    n_probes: int = 4,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Per layer: E_sample ||J_c||_F^2 over output channels, the input Gram E_sample[X^T X], and the sample
    count. Hooks are removed in ``finally``; no parameter's ``.grad`` is touched (``torch.autograd.grad``)."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    layers, jac, gram = _accumulators(model, names)
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    flags = {n: m.weight.requires_grad for n, m in layers.items()}
    handles = []

    hook = functools.partial(_gram_hook, gram, outputs)

    n_samples = 0
    try:
        for n, m in layers.items():
            m.weight.requires_grad_(True)  # the graph must reach every scoped output
            handles.append(m.register_forward_hook(hook(n)))
        for i, batch in enumerate(batches):
            for v in outputs.values():
                v.clear()
            with torch.enable_grad():
                action, flat = _run_action(action_fn, batch, seed + i, names, outputs)
                n_samples += action.shape[0]
                probe_gen = torch.Generator().manual_seed(10_000 + seed + i)
                for p in range(n_probes):
                    v = torch.randn(action.shape, generator=probe_gen).to(action)
                    grads = torch.autograd.grad(
                        (action * v).sum(),
                        [t for _, t in flat],
                        retain_graph=p < n_probes - 1,
                        allow_unused=True,
                    )
                    for (n, _), g in zip(flat, grads, strict=True):
                        if g is not None:
                            _add_jac(jac, n, g)
    finally:
        for h in handles:
            h.remove()
        for n, m in layers.items():
            m.weight.requires_grad_(flags[n])
        for v in outputs.values():
            v.clear()
    return _means(jac, gram, n_samples, n_probes)


def blockwise_jacobian_and_gram(
    adapter: VLAAdapter,
    names: Sequence[str],
    action_fn: ActionFn,
    batches: Iterable[Any],
    n_probes: int = 4,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """``jacobian_and_gram`` without the whole backward graph, as activation checkpointing does: per batch
    one forward with every repeated block checkpointed (its inputs stored, its inside recomputed) and, per
    probe, one backward giving the gradient w.r.t. each block call's output (and w.r.t. the outputs of the
    layers outside blocks); then per block, each call's forward recomputed from its stored inputs and
    differentiated from those output gradients gives its layers' output gradients. The same numbers
    (summation order aside; measured in tests/test_sequential_methods.py)."""
    from daptq.methods.daptq.blockwise import _first_output, checkpointed_blocks, never_called
    from daptq.methods.sequential import block_plan

    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    model = adapter.model
    layers, jac, gram = _accumulators(model, names)
    blocks, outside = block_plan(adapter, list(names))
    containers = {b.name: model.get_submodule(b.name) for b in blocks}
    members = {b.name: b.members for b in blocks if b.members}
    records: dict[str, list[tuple[tuple, dict, list[torch.Tensor | None]]]] = {n: [] for n in members}
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []

    hook = functools.partial(_gram_hook, gram, outputs)

    n_samples = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for n in outside:
            layers[n].weight.requires_grad_(True)  # the graph must reach every scoped output
            handles.append(layers[n].register_forward_hook(hook(n)))
        with checkpointed_blocks(containers, members) as calls:
            for i, batch in enumerate(batches):
                for v in outputs.values():
                    v.clear()
                calls.clear()
                with torch.enable_grad():
                    action, flat = _run_action(action_fn, batch, seed + i, outside, outputs)
                    n_samples += action.shape[0]
                    targets = [t for _, t in flat] + [c[3] for c in calls]
                    gouts: list[list[torch.Tensor | None]] = [[] for _ in calls]
                    probe_gen = torch.Generator().manual_seed(10_000 + seed + i)
                    for p in range(n_probes):
                        v = torch.randn(action.shape, generator=probe_gen).to(action)
                        grads = torch.autograd.grad(
                            (action * v).sum(), targets, retain_graph=p < n_probes - 1, allow_unused=True
                        )
                        for (n, _), g in zip(flat, grads[: len(flat)], strict=True):
                            if g is not None:
                                _add_jac(jac, n, g)
                        for j, g in enumerate(grads[len(flat) :]):
                            gouts[j].append(None if g is None else g.detach())
                for (n, args, kwargs, _), gl in zip(calls, gouts, strict=True):
                    records[n].append((args, kwargs, gl))
                del action, targets, flat
                calls.clear()
        for h in handles:
            h.remove()
        handles.clear()
        for p in flags:
            p.requires_grad_(False)
        never_called(
            adapter, [n for n in members if not any(any(g is not None for g in r[2]) for r in records[n])]
        )
        for name, group in members.items():  # per block: recompute each call, differentiate its layers
            for n in group:
                layers[n].weight.requires_grad_(True)
                handles.append(layers[n].register_forward_hook(hook(n)))
            module = containers[name]
            for args, kwargs, gl in records.pop(name):
                for n in group:
                    outputs[n].clear()
                with torch.enable_grad():
                    out = _first_output(name, module(*args, **kwargs))
                    flat = [(n, t) for n in group for t in outputs[n]]
                    live = [(p, g) for p, g in enumerate(gl) if g is not None]
                    for k, (_, g) in enumerate(live):
                        grads = torch.autograd.grad(
                            out, [t for _, t in flat], grad_outputs=g, retain_graph=k < len(live) - 1,
                            allow_unused=True,
                        )  # fmt: skip
                        for (n, _), gn in zip(flat, grads, strict=True):
                            if gn is not None:
                                _add_jac(jac, n, gn)
            for h in handles:
                h.remove()
            handles.clear()
            for n in group:
                layers[n].weight.requires_grad_(False)
                outputs[n].clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for v in outputs.values():
            v.clear()
    return _means(jac, gram, n_samples, n_probes)


def proxy_sensitivity(
    weight: torch.Tensor, jac_sq: torch.Tensor, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||J_c|| [out], ||dW_c X|| [out, 5], proxy [out, 5]) for the widths QVLA_BITS."""
    w = weight.detach().double()
    cand = candidate_weights(weight)
    errs = []
    for b in QVLA_BITS:
        dw = cand[b].double() - w
        errs.append(((dw @ gram) * dw).sum(1).clamp(min=0).sqrt())
    err = torch.stack(errs, dim=1)
    jn = jac_sq.clamp(min=0).sqrt()
    return jn, err, jn[:, None] * err


@torch.no_grad()
def exact_deviation(
    model: nn.Module,
    name: str,
    channel: int,
    row: torch.Tensor,
    action_fn: ActionFn,
    batches: Sequence[Any],
    reference: Sequence[torch.Tensor],
    seed: int = 0,
) -> float:
    """sqrt(E_sample ||A(W with row ``channel`` replaced) - A(W)||^2) by forward passes (row restored)."""
    layer = model.get_submodule(name)
    original = layer.weight[channel].detach().clone()
    total, n = 0.0, 0
    try:
        layer.weight[channel] = row.to(layer.weight)
        for i, (batch, ref) in enumerate(zip(batches, reference, strict=True)):
            a = action_fn(batch, torch.Generator().manual_seed(seed + i))
            total += float((a.double() - ref.double()).square().sum())
            n += a.shape[0]
    finally:
        layer.weight[channel] = original
    return math.sqrt(total / n)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def layer_sensitivities(
    model: nn.Module,
    names: Sequence[str],
    action_fn: ActionFn,
    batches: Sequence[Any],
    n_probes: int = 4,
    exact_top_k: int = 32,
    seed: int = 0,
    jacobian: Callable[..., tuple[dict, dict, int]] | None = None,
) -> tuple[dict[str, LayerSensitivity], dict[str, Any]]:
    """Proxy sensitivities of every channel, with the ``exact_top_k`` largest checked by forward passes.
    ``jacobian``: ``(names, action_fn, batches, n_probes, seed) -> (jac, gram, n)`` in place of
    ``jacobian_and_gram`` on ``model`` (``blockwise_jacobian_and_gram``, block by block)."""
    batches = list(batches)
    if jacobian is None:
        jac, gram, _ = jacobian_and_gram(model, names, action_fn, batches, n_probes, seed)
    else:
        jac, gram, _ = jacobian(names, action_fn, batches, n_probes, seed)
    out: dict[str, LayerSensitivity] = {}
    for n in names:
        w = model.get_submodule(n).weight
        jn, err, proxy = proxy_sensitivity(w, jac[n], gram[n])
        out[n] = LayerSensitivity(n, w.shape[1], jn, err, proxy, proxy.clone())
    check: dict[str, Any] = {"checked": 0}
    if exact_top_k > 0:
        candidates = [
            (float(s.proxy[c, j]), n, c, j)
            for n, s in out.items()
            for c in range(s.proxy.shape[0])
            for j in range(1, len(QVLA_BITS))
        ]
        top = heapq.nlargest(exact_top_k, candidates)
        with torch.no_grad():
            reference = [action_fn(b, torch.Generator().manual_seed(seed + i)) for i, b in enumerate(batches)]
        cands = {n: candidate_weights(model.get_submodule(n).weight) for n in {t[1] for t in top}}
        exact = [
            exact_deviation(model, n, c, cands[n][QVLA_BITS[j]][c], action_fn, batches, reference, seed)
            for _, n, c, j in top
        ]
        proxies = [p for p, *_ in top]
        ratios = [e / p for e, p in zip(exact, proxies, strict=True) if p > 0]
        scale = float(torch.tensor(ratios).median()) if ratios else 1.0
        for s in out.values():
            s.used = s.proxy * scale
        for (_, n, c, j), e in zip(top, exact, strict=True):
            out[n].used[c, j] = e
        check = {
            "checked": len(top),
            "spearman_proxy_vs_exact": spearman(proxies, exact) if len(top) > 2 else None,
            "exact_over_proxy_median": scale,
            "top": [
                {"layer": n, "channel": c, "bits": QVLA_BITS[j], "proxy": p, "exact": e}
                for (p, n, c, j), e in zip(top, exact, strict=True)
            ],
        }
    return out, check


# ---- allocation -------------------------------------------------------------------------------------------
def allocate_bits(sensitivities: Mapping[str, LayerSensitivity], avg_bits: float) -> dict[str, torch.Tensor]:
    """Greedy demotion to an average of exactly ``avg_bits`` bits per weight; ``{layer: row bits}``."""
    if isinstance(avg_bits, bool) or not 0 <= float(avg_bits) <= 16:
        raise ValueError(f"avg_bits must be in [0, 16], got {avg_bits!r}")
    if not sensitivities:
        raise ValueError("allocate_bits: no layer to allocate")
    names = list(sensitivities)
    fan = {n: sensitivities[n].fan_in for n in names}
    level = {n: [0] * sensitivities[n].used.shape[0] for n in names}  # index into QVLA_BITS per channel
    n_weights = sum(fan[n] * len(level[n]) for n in names)
    target = avg_bits * n_weights
    if abs(target - round(target)) > 1e-6:
        raise ValueError(
            f"avg_bits={avg_bits} x {n_weights} weights = {target} is not a whole number of bits; "
            "no allocation can meet it exactly"
        )
    gap = 16 * n_weights - round(target)  # bits still to remove

    def step(n: str, c: int, j: int) -> tuple[float, int]:
        """(sensitivity increase, bits saved) of moving channel c of n from level j to j + 1."""
        s = sensitivities[n].used[c]
        saved = (QVLA_BITS[j] - QVLA_BITS[j + 1]) * fan[n]
        return float(s[j + 1] - s[j]), saved

    tie = itertools.count()
    heap = []
    for n in names:
        for c in range(len(level[n])):
            delta, saved = step(n, c, 0)
            heap.append((delta / saved, next(tie), n, c))
    heapq.heapify(heap)
    while heap and gap > 0:
        _, _, n, c = heapq.heappop(heap)
        j = level[n][c]
        _, saved = step(n, c, j)
        if saved > gap:
            continue  # its later steps save less but would be taken out of order; retire the channel
        level[n][c] = j + 1
        gap -= saved
        if j + 1 < len(QVLA_BITS) - 1:
            delta, saved = step(n, c, j + 1)
            heapq.heappush(heap, (delta / saved, next(tie), n, c))
    if gap > 0:
        gap = _close_gap(level, gap, step)
    if gap > 0:  # layers whose step sizes share no small multiple (a fan-in 7 beside fan-in 32 rows)
        gap = _repair_gap(level, gap, sensitivities, fan)
    if gap != 0:
        achieved = (round(target) + gap) / n_weights
        raise ValueError(
            f"avg_bits={avg_bits} cannot be met exactly with widths {QVLA_BITS} on these layers "
            f"(fan-ins {sorted(set(fan.values()))}); the closest reached is {achieved:.6f} bits per weight"
        )
    return {n: torch.tensor([QVLA_BITS[j] for j in level[n]], dtype=torch.uint8) for n in names}


def _close_gap(level: dict[str, list[int]], gap: int, step) -> int:
    """One exchange that removes exactly ``gap`` more bits: undo one channel's last step (giving back r
    bits) and take another channel's next step saving r + gap, the pair adding the least sensitivity."""
    undo: dict[int, tuple[float, str, int]] = {}
    for n, levels in level.items():
        for c, j in enumerate(levels):
            if j > 0:
                delta, saved = step(n, c, j - 1)
                if saved not in undo or -delta < undo[saved][0]:
                    undo[saved] = (-delta, n, c)
    best = None
    for n, levels in level.items():
        for c, j in enumerate(levels):
            if j + 1 >= len(QVLA_BITS):
                continue
            delta, saved = step(n, c, j)
            u = undo.get(saved - gap)
            if u is None or (u[1], u[2]) == (n, c):
                continue
            cost = delta + u[0]
            if best is None or cost < best[0]:
                best = (cost, n, c, u[1], u[2])
    if best is None:
        return gap
    _, n, c, un, uc = best
    level[n][c] += 1
    level[un][uc] -= 1
    return 0


def _repair_gap(
    level: dict[str, list[int]],
    gap: int,
    sensitivities: Mapping[str, LayerSensitivity],
    fan: Mapping[str, int],
    per_move: int = 8,
    max_states: int = 1 << 20,
) -> int:
    """Re-level a few channels so exactly ``gap`` more bits go, at the least added sensitivity; returns the
    gap left (0 on success, unchanged when no re-levelling of the candidates reaches it).

    Greedy steps and one exchange can miss when the layers' step sizes (bits saved = level drop x fan-in)
    have no small common combination. Candidates: for every (fan-in, current width, new width), the
    ``per_move`` channels for which that move adds the least sensitivity; a group knapsack over them (one
    new width per channel; a move may give bits back) over net bits saved in ``[-16 F, gap + 16 F]``
    (F the largest candidate fan-in), in units of the step sizes' common divisor."""
    cand: dict[tuple[int, int, int], list[tuple[float, str, int]]] = {}
    for n, levels in level.items():
        used = sensitivities[n].used.double()
        lv = torch.tensor(levels)
        for j in range(len(QVLA_BITS)):
            rows = torch.nonzero(lv == j).flatten()
            if rows.numel() == 0:
                continue
            for j2 in range(len(QVLA_BITS)):
                if j2 == j:
                    continue
                cost = used[rows, j2] - used[rows, j]
                k = min(per_move, rows.numel())
                top = torch.topk(cost, k, largest=False)
                moves = cand.setdefault((fan[n], j, j2), [])
                moves += [(float(v), n, int(rows[i])) for v, i in zip(top.values, top.indices, strict=True)]
    channels: dict[tuple[str, int], list[tuple[int, int, float]]] = {}  # -> [(new level, bits saved, cost)]
    for (f, j, j2), moves in cand.items():
        for cost, n, c in heapq.nsmallest(per_move, moves):
            channels.setdefault((n, c), []).append((j2, (QVLA_BITS[j] - QVLA_BITS[j2]) * f, cost))
    unit = math.gcd(gap, *(v for opts in channels.values() for _, v, _ in opts))
    if not channels or gap % unit:
        return gap
    span = 16 * max(fan[n] for n, _ in channels)
    size = (gap + 2 * span) // unit + 1
    if size > max_states:
        return gap
    origin = span // unit  # index of "0 bits saved"
    best = np.full(size, np.inf)
    best[origin] = 0.0
    picks = []
    for opts in channels.values():
        new, pick = best.copy(), np.zeros(size, dtype=np.int8)
        for k, (_, saved, cost) in enumerate(opts, 1):
            v = saved // unit
            moved = np.full(size, np.inf)
            if v > 0:
                moved[v:] = best[:-v] + cost
            else:
                moved[:v] = best[-v:] + cost
            better = moved < new
            new[better], pick[better] = moved[better], k
        best = new
        picks.append(pick)
    at = origin + gap // unit
    if not np.isfinite(best[at]):
        return gap
    for (n, c), opts, pick in reversed(list(zip(channels, channels.values(), picks, strict=True))):
        if pick[at]:
            j2, saved, _ = opts[pick[at] - 1]
            level[n][c] = j2
            at -= saved // unit
    return 0


def average_bits(bits: Mapping[str, torch.Tensor], fan_in: Mapping[str, int]) -> float:
    total = sum(int(b.long().sum()) * fan_in[n] for n, b in bits.items())
    return total / sum(b.numel() * fan_in[n] for n, b in bits.items())


# ---- the method -------------------------------------------------------------------------------------------
def _default_qvla_spec() -> QuantSpec:
    return QuantSpec(row_spec(4), ActivationSpec(8))


@dataclass(frozen=True)
class QVLAConfig(MethodConfig):
    """QVLA on daptq's scope. ``avg_bits`` is the budget in bits per weight over the in-scope layers; only
    ``spec.activation`` is used (uniform over the layers), weights get per-channel widths in QVLA_BITS.

    ``spec.weight`` must say per-channel symmetric min-max (what QVLA rounds with); its bit width is ignored.
    """

    VERSION = 1
    spec: QuantSpec = field(default_factory=_default_qvla_spec)
    avg_bits: float = 4.0
    n_probes: int = 4
    exact_top_k: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        w = self.spec.weight
        grid = getattr(w, "symmetric_range", "restricted")
        if (w.granularity, w.symmetric, w.observer, grid) != ("per_channel", True, "minmax", "restricted"):
            raise ValueError(
                "QVLAConfig: QVLA rounds each output channel with symmetric min-max RTN; spec.weight must be "
                f"per_channel, symmetric, minmax, restricted grid (got {w.short()})"
            )
        if self.spec.activation is not None and self.spec.activation.mode != "dynamic_per_token":
            raise ValueError("QVLAConfig: activations must be dynamic per-token (or None)")
        if not 0 <= self.avg_bits <= 16:
            raise ValueError(f"QVLAConfig: avg_bits must be in [0, 16], got {self.avg_bits}")
        if self.n_probes < 1 or self.exact_top_k < 0:
            raise ValueError(f"QVLAConfig: need n_probes >= 1 and exact_top_k >= 0, got {self}")


def differentiable_action(adapter: VLAAdapter) -> ActionFn:
    """The adapter's action chunk with autograd kept (``VLAAdapter.sample(batch, generator)``)."""
    return lambda batch, generator: adapter.sample(batch, generator=generator)


@register_method(QVLAConfig, name="qvla")
class QVLA(Method):
    """Per-channel sensitivities on the float model, greedy demotion to the budget, MixedBitLinear layers."""

    def __init__(self, config: QVLAConfig) -> None:
        super().__init__(config)
        self._sens: dict[str, LayerSensitivity] = {}
        self._bits: dict[str, torch.Tensor] = {}

    def prepare(self, adapter: VLAAdapter) -> None:
        super().prepare(adapter)
        plan = require_plan(self)
        # registered module types (daptq.quant.category) are rounded by the driver, not by QVLA
        bad = [
            n
            for n, m in plan.modules.items()
            if m.kind != "Linear" and registered_type(adapter.module(n)) is None
        ]
        if bad:
            raise ValueError(f"QVLA quantizes Linear layers only; exclude {bad[:5]} from the scope")

    def calibrate(self, adapter: VLAAdapter, batches: Sequence[Any], blockwise: bool = False) -> None:
        """``blockwise``: the Jacobians block by block (``blockwise_jacobian_and_gram``), no whole graph."""
        plan = require_plan(self)
        if not batches:
            raise ValueError("QVLA: sensitivities need calibration batches")
        c = self.config
        self._sens, check = layer_sensitivities(
            adapter.model,
            list(plan.modules),
            differentiable_action(adapter),
            list(batches),
            n_probes=c.n_probes,
            exact_top_k=c.exact_top_k,
            seed=c.seed,
            jacobian=(lambda *a: blockwise_jacobian_and_gram(adapter, *a)) if blockwise else None,
        )
        rho = check.get("spearman_proxy_vs_exact")
        if rho is not None and not math.isfinite(rho):
            check["spearman_proxy_vs_exact"] = None
        self.decisions["exact_check"] = check

    def apply(self, adapter: VLAAdapter) -> None:
        require_plan(self)
        if not self._sens:
            raise RuntimeError("QVLA.apply: calibrate() has not run")
        bits = allocate_bits(self._sens, self.config.avg_bits)
        self._swap(adapter, bits)
        self._decide(adapter, bits)

    def _swap(self, adapter: VLAAdapter, bits: Mapping[str, torch.Tensor]) -> None:
        from daptq.quant._util import set_module

        model = adapter.model
        for name, row_bits in bits.items():
            set_module(
                model,
                name,
                MixedBitLinear.from_float(model.get_submodule(name), row_bits, self.config.spec.activation),
            )

    def _decide(self, adapter: VLAAdapter, bits: Mapping[str, torch.Tensor]) -> None:
        fan = {n: s.fan_in for n, s in self._sens.items()}
        self.decisions["average_bits"] = average_bits(bits, fan)
        self.decisions["rows_by_bits"] = {
            n: {str(w): int((b == w).sum()) for w in QVLA_BITS} for n, b in bits.items()
        }
        self.decisions["row_bits"] = {n: b.tolist() for n, b in bits.items()}
        self.decisions["weight_bytes"] = mixed_model_bytes(adapter.model)
        self.decisions["deployable"] = (
            "daptq export lowers each layer to one ONNX Runtime MatMulNBits per width group (8/4/2 bits), "
            "an fp32 MatMul on the float16 rows, Concat and Gather (daptq.deploy.lowering.MixedNBitsLinear); "
            "up to four GEMMs per layer, latency not measured"
        )

    # ---- block by block (daptq.methods.sequential) --------------------------------------------------------
    # QVLA's sensitivity is the Jacobian of the sampled action chunk (every denoising step) w.r.t. each
    # layer's output, and its allocation is one global greedy demotion over every layer: both run before
    # the block loop (sequential_begin), the Jacobians block by block (blockwise_jacobian_and_gram: no
    # whole backward graph), the exact check's forward passes on the whole float model as in ``calibrate``;
    # the loop only swaps each block's layers for their MixedBitLinear.
    def sequential_needs_whole_model(self) -> bool:
        return True

    def sequential_begin(self, adapter: VLAAdapter, batches: Sequence[Any]) -> None:
        self.calibrate(adapter, batches, blockwise=True)
        self._bits = allocate_bits(self._sens, self.config.avg_bits)

    def calibrate_modules(self, adapter: VLAAdapter, names: Sequence[str], run: Callable[[], None]) -> None:
        if not self._sens:
            raise RuntimeError("QVLA.calibrate_modules: sequential_begin() has not run")

    def apply_modules(self, adapter: VLAAdapter, names: Sequence[str]) -> None:
        self._swap(adapter, {n: self._bits[n] for n in names if n in self._bits})

    def sequential_end(self, adapter: VLAAdapter, run: Callable[[], None]) -> None:
        self._decide(adapter, self._bits)

    def record(self) -> QuantRecord:
        """The base record, each module's note saying its rows' widths (its spec's weight bits are unused)."""
        rec = super().record()
        rows = self.decisions.get("rows_by_bits", {})
        modules = {
            n: dataclasses.replace(m, note=f"QVLA rows by width {rows[n]}") if n in rows else m
            for n, m in rec.modules.items()
        }
        return dataclasses.replace(rec, modules=modules)


def mixed_layers(model: nn.Module) -> dict[str, MixedBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedBitLinear)}


def mixed_model_bytes(model: nn.Module) -> dict[str, int]:
    """Summed ``mixed_bytes`` over every MixedBitLinear of ``model``."""
    total = {"stored_bytes": 0, "ideal_bytes": 0, "fp16_bytes": 0}
    for layer in mixed_layers(model).values():
        for k, v in mixed_bytes(layer).items():
            total[k] += v
    return total


MIXED_FORMAT = "daptq-qvla-mixed"
MIXED_FORMAT_VERSION = 1


def save_mixed_layers(model: nn.Module, path: str | Path) -> str:
    """Write every MixedBitLinear of ``model`` (grouped codes, scales, float16 rows, bit maps, biases) to one
    safetensors file, atomically; returns its sha256 for the caller's record."""
    from safetensors.torch import save as st_save

    layers = mixed_layers(model)
    if not layers:
        raise ValueError("save_mixed_layers: the model has no MixedBitLinear layer")
    tensors: dict[str, torch.Tensor] = {}
    meta = {}
    for name, layer in layers.items():
        tensors.update(layer.checkpoint_tensors(name))
        meta[name] = {"shape": [layer.out_features, layer.in_features], **layer.checkpoint_config()}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"format": MIXED_FORMAT, "version": str(MIXED_FORMAT_VERSION), "layers": json.dumps(meta)}
    data = st_save(tensors, metadata=header)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_mixed_layers(model: nn.Module, path: str | Path, sha256: str | None = None) -> list[str]:
    """Swap the stored layers into ``model`` (a freshly built float model); outputs equal the saved model's
    bit for bit. ``sha256`` (from ``save_mixed_layers``) is checked when given. Nothing is unpickled."""
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    from daptq.quant._util import set_module

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixed-bit layer file not found: {path}")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 mismatch (the file changed since it was recorded)")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != MIXED_FORMAT or header.get("version") != str(MIXED_FORMAT_VERSION):
        raise ValueError(f"{path}: not a {MIXED_FORMAT} v{MIXED_FORMAT_VERSION} file (header {header})")
    tensors = dict(st_load(data))
    meta = json.loads(header["layers"])
    for name, cfg in meta.items():
        set_module(model, name, load_mixed_linear(model.get_submodule(name), tensors, name, cfg))
    return list(meta)


def load_mixed_linear(
    original: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, cfg: Mapping[str, Any]
) -> MixedBitLinear:
    """Rebuild one stored layer over the float Linear it replaces (the keys it uses are popped)."""
    if type(original) is not nn.Linear:
        raise ValueError(f"{prefix}: a mixed-bit layer replaces a plain nn.Linear, the model has {original}")
    act = cfg.get("activation")
    layer = MixedBitLinear.from_float(
        original,
        torch.full((original.out_features,), 16),
        None if act is None else ActivationSpec.from_dict(act),
    )
    load_mixed_state(layer, tensors, prefix)
    for suffix in ("row_bits", "rows_16", *(f"{kind}_{b}" for kind in ("codes", "scale") for b in INT_BITS)):
        tensors.pop(f"{prefix}.{suffix}", None)
    if cfg.get("bias"):
        if f"{prefix}.bias" not in tensors or layer.bias is None:
            raise ValueError(f"{prefix}: the stored layer has a bias the model lacks (or it is missing)")
        with torch.no_grad():
            layer.bias.copy_(tensors.pop(f"{prefix}.bias"))
    return layer
