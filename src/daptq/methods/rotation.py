"""Orthogonal rotations folded into the weights before rounding (QuaRot / SpinQuant style, Hadamard).

A rotation Q of a residual stream (x -> x Q) leaves the float model's function unchanged when every writer's
output rows are turned by Q^T, every embedding added into the stream by Q, and every reader of the stream's
norms takes the norm's elementwise affine and then Q into its input columns. Outliers in single channels are
spread over all of them, so 4-bit grids of weights and activations lose less (QuaRot, arXiv:2404.00456).

LayerNorm: its mean subtraction commutes with Q when Q maps the all-ones vector to itself (then
mean(xQ) = mean(x) and xQ - mean(x) 1 = (x - mean(x) 1) Q), so a LayerNorm stays a LayerNorm (weight 1,
bias 0 once fused) with no SliceGPT centering and no module swapped: a saved directory stores only tensors.
``stream_rotation`` builds such a Q from a randomized Hadamard with one Householder reflection.

V/O: each attention's value rows are turned per head by H^T and ``out``'s matching input columns by H (softmax
mixes tokens, not channels, so this is exact for any attention, grouped-query included).

Where the adapter declares a place not foldable (``RotationLayout.not_rotated``: the DiT stream under adaLN's
per-sample modulation, the MLP down-projection input after the nonlinearity), nothing is rotated there: those
would need an online rotation (an O(n log n) fast Walsh-Hadamard transform per token and layer at deployment,
plus a kernel for it), which daptq does not do yet; they are recorded in the method's decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from daptq.models.adapter import AttentionLayout, ResidualStream, RotationLayout, VLAAdapter

ROTATIONS = ("hadamard",)


def check_rotation(value: Any, where: str) -> None:
    """A ValueError naming ``where`` unless ``value`` is None or one of ``ROTATIONS``."""
    if value is not None and value not in ROTATIONS:
        raise ValueError(f"{where} must be one of {list(ROTATIONS)} or null, got {value!r}")


def random_hadamard(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """An (n, n) float64 orthogonal matrix: diag(random signs) (H_{2^k} / sqrt(2^k) kron R_m), n = 2^k m.

    H is Sylvester's Hadamard (``scipy.linalg.hadamard``); for an odd factor m > 1 (e.g. 192 = 64 x 3),
    R_m is a random orthogonal m x m matrix (QR of a Gaussian, signs fixed), so every output channel still
    mixes every input channel. Returns the matrix and a description of the construction (recorded)."""
    from scipy.linalg import hadamard

    if n < 1:
        raise ValueError(f"rotation width must be positive, got {n}")
    power = n & -n  # largest power of two dividing n
    m = n // power
    h = torch.from_numpy(hadamard(power).astype("float64")) / math.sqrt(power)
    construction = f"hadamard({power})"
    if m > 1:
        g = torch.randn(m, m, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))[None, :]
        h = torch.kron(h.contiguous(), q.contiguous())
        construction += f" kron random_orthogonal({m})"
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * h, construction


def stream_rotation(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """A randomized Hadamard corrected by one Householder reflection so that Q 1 = 1 (LayerNorm-exact)."""
    r, construction = random_hadamard(n, generator)
    u = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
    w = r @ u - u  # reflect R u back onto u: P R u = u with P = I - 2 w w^T / |w|^2
    if float(w.norm()) > 1e-12:
        r = r - 2.0 * torch.outer(w, w @ r) / float(w @ w)
    return r, construction + " + householder(ones)"


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def rotate_stream(model: nn.Module, stream: ResidualStream, q: torch.Tensor) -> None:
    """Turn ``stream`` by ``q`` (x -> x q) in ``model``'s weights, exactly (see the module docstring)."""
    for name in stream.writers:
        lin = model.get_submodule(name)
        _set(lin.weight, q.T @ lin.weight.double())
        if lin.bias is not None:
            _set(lin.bias, lin.bias.double() @ q)
    params = dict(model.named_parameters())
    for name in stream.embeddings:
        _set(params[name], params[name].double() @ q)
    for entry in stream.norms:
        norm = model.get_submodule(entry.norm)
        gain = norm.weight.double() if getattr(norm, "weight", None) is not None else None
        shift = norm.bias.double() if getattr(norm, "bias", None) is not None else None
        for name in entry.readers:
            lin = model.get_submodule(name)
            w = lin.weight.double()
            if shift is not None:
                if lin.bias is None:
                    raise ValueError(
                        f"rotation: {name} reads {entry.norm} whose bias cannot be folded into it (it has "
                        "no bias)"
                    )
                _set(lin.bias, lin.bias.double() + w @ shift)
            if gain is not None:
                w = w * gain[None, :]
            _set(lin.weight, w @ q)
        for name in entry.substitutes:  # fed to the readers instead of the norm's output: keep their effect
            if shift is not None or (gain is not None and bool((gain == 0).any())):
                raise ValueError(
                    f"rotation: {name} substitutes for {entry.norm}, which has a bias or a zero gain"
                )
            value = params[name].double()
            _set(params[name], (value if gain is None else value / gain) @ q)
        if gain is not None:
            norm.weight.fill_(1.0)
        if shift is not None:
            norm.bias.zero_()


@torch.no_grad()
def rotate_value_output(model: nn.Module, layout: AttentionLayout, h: torch.Tensor) -> None:
    """Turn each head's value channels by ``h`` (head_dim, head_dim): V rows by h^T, ``out`` columns by h."""
    out = model.get_submodule(layout.out)
    head_dim = out.in_features // layout.heads
    if layout.fused:
        qkv = model.get_submodule(layout.qkv)
        c = qkv.out_features // 3
        v_weight, v_bias, offset = qkv.weight, qkv.bias, 2 * c
    else:
        v = model.get_submodule(layout.v)
        v_weight, v_bias, offset = v.weight, v.bias, 0
    for g in range(layout.n_kv_heads):
        rows = slice(offset + g * head_dim, offset + (g + 1) * head_dim)
        _set(v_weight[rows], h.T @ v_weight[rows].double())
        if v_bias is not None:
            _set(v_bias[rows], v_bias[rows].double() @ h)
    for k in range(layout.heads):
        cols = slice(k * head_dim, (k + 1) * head_dim)
        _set(out.weight[:, cols], out.weight[:, cols].double() @ h)


def rotate_model(
    adapter: VLAAdapter, names: Iterable[str] | None = None, seed: int = 0, kind: str = "hadamard"
) -> dict[str, Any]:
    """Fold rotations into ``adapter.model`` wherever the adapter's ``rotation_layout()`` says it is exact,
    limited to streams and attentions touching a module in ``names`` (every declared one when None).

    The float model computes the same function afterwards (up to float rounding). Returns what was rotated
    (JSON-able, for the method's record)."""
    check_rotation(kind, "rotation")
    if "rotation" not in adapter.capabilities:
        raise ValueError(
            f"rotation={kind!r}: {type(adapter).__name__} does not declare the 'rotation' capability "
            "(VLAAdapter.rotation_layout(): its residual streams' writers, norms and readers, and its V/O "
            "pairs); quantize without rotation, or declare it in the model's adapter"
        )
    layout = adapter.rotation_layout()
    if not isinstance(layout, RotationLayout):
        raise ValueError(f"{type(adapter).__name__}.rotation_layout() must return a RotationLayout")
    wanted = None if names is None else set(names)
    generator = torch.Generator().manual_seed(seed)
    record: dict[str, Any] = {"kind": kind, "seed": seed, "streams": {}, "value_output": {}}
    for stream in layout.streams:
        members = {*stream.writers, *(r for n in stream.norms for r in n.readers)}
        if wanted is not None and not members & wanted:
            continue
        q, construction = stream_rotation(stream.width, generator)
        rotate_stream(adapter.model, stream, q)
        record["streams"][stream.name] = {
            "width": stream.width,
            "construction": construction,
            "writers": len(stream.writers),
            "embeddings": len(stream.embeddings),
            "readers": sum(len(n.readers) for n in stream.norms),
        }
    by_name = {a.name: a for a in adapter.attention_layouts()}
    for name in layout.value_output:
        att = by_name[name]
        if wanted is not None and not set(att.linears()) & wanted:
            continue
        head_dim = adapter.module(att.out).in_features // att.heads
        h, construction = random_hadamard(head_dim, generator)
        rotate_value_output(adapter.model, att, h)
        record["value_output"][name] = construction
    record["not_rotated"] = list(layout.not_rotated)
    record["online"] = []  # no online rotation: every rotation above is folded into weights
    return record


def rotation_of(config: Any) -> str | None:
    """The ``rotation`` option of a method config (None for methods without one)."""
    return getattr(config, "rotation", None) if "rotation" in {f.name for f in fields(config)} else None


def rotate_for_method(method: Any, adapter: VLAAdapter, streamed: bool = False) -> None:
    """The method's ``rotation`` option, run after ``prepare`` and before calibration (so GPTQ's Hessians
    and static activation scales see the rotated model); what was rotated goes into its decisions."""
    kind = rotation_of(method.config)
    if kind is None:
        return
    if streamed:
        raise ValueError(
            f'{method.name}: rotation="{kind}" turns whole residual streams and needs every weight in '
            "memory; it cannot run with streamed (block-by-block loaded) weights"
        )
    if method.plan is None:
        raise RuntimeError(f"{type(method).__name__}: prepare() must run before the rotation")
    method.decisions["rotation"] = rotate_model(adapter, method.plan.modules, seed=0, kind=kind)


__all__ = [
    "ROTATIONS",
    "check_rotation",
    "random_hadamard",
    "rotate_model",
    "rotate_stream",
    "rotate_for_method",
    "rotate_value_output",
    "rotation_of",
    "stream_rotation",
]
