"""Input-channel scaling folded into what precedes a layer (SmoothQuant, AWQ).

For layers ``L_1..L_k`` that read the same input ``x`` (``C`` channels), dividing channel ``c`` of ``x``
by ``s_c`` and multiplying column ``c`` of every ``L_i`` weight by ``s_c`` leaves their outputs unchanged,
and moves range between activations and weights. The division is folded into the module that produces
``x`` so it costs nothing at inference:

- ``layernorm``: a LayerNorm with an affine: ``gamma / s``, ``beta / s``;
- ``linear``: rows ``[offset, offset + C)`` of a preceding Linear (e.g. attention's value rows feeding the
  output projection: attention is linear in v): ``W[r] / s``, ``b[r] / s``;
- ``adaln``: an adaLN modulation ``x_hat * (1 + scale) + shift`` whose ``shift`` and ``scale`` chunks are
  rows of a Linear (DiT blocks): shift rows ``/ s``; scale rows ``W / s`` and ``b' = (b + 1) / s - 1``,
  so that ``1 + scale' = (1 + scale) / s``.

The adapter declares its groups (``VLAAdapter.smoothing_groups()``, like llm-compressor's AWQ mappings), so no
method special-cases a model. Fake-quant modules touched by a fold are re-rounded (``requantize``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ._util import get_module
from .fake import QUANT_MODULE_TYPES
from .observers import check_finite

SourceKind = Literal["layernorm", "linear", "adaln"]
SOURCE_KINDS = ("layernorm", "linear", "adaln")


@dataclass(frozen=True)
class SmoothingGroup:
    """Layers sharing one input whose channels ``source`` can rescale exactly.

    ``offset``: for ``linear``, the first output row of ``source`` that feeds the layers; for ``adaln``, the
    first row of the shift chunk, with ``scale_offset`` the first row of the scale chunk.
    """

    source: str
    layers: tuple[str, ...]
    kind: SourceKind
    offset: int = 0
    scale_offset: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"SmoothingGroup: kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if isinstance(self.layers, str) or not self.layers:
            raise ValueError(f"SmoothingGroup {self.source!r}: layers must be a non-empty tuple of names")
        object.__setattr__(self, "layers", tuple(self.layers))
        if (self.kind == "adaln") != (self.scale_offset is not None):
            raise ValueError(f"SmoothingGroup {self.source!r}: scale_offset is given iff kind is 'adaln'")

    @property
    def input_of(self) -> str:
        """The layer whose input is the group's shared input (capture it there)."""
        return self.layers[0]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "layers": list(self.layers),
            "kind": self.kind,
            "offset": self.offset,
            "scale_offset": self.scale_offset,
        }


def group_channels(model: nn.Module, group: SmoothingGroup) -> int:
    """Validate a group against the model and return its channel count ``C``."""
    consumers = [get_module(model, n) for n in group.layers]
    for name, layer in zip(group.layers, consumers, strict=True):
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"smoothing group {group.source!r}: {name} is {type(layer).__name__}, not Linear"
            )
    widths = {layer.in_features for layer in consumers}
    if len(widths) != 1:
        raise ValueError(f"smoothing group {group.source!r}: layers disagree on input size {sorted(widths)}")
    c = widths.pop()
    source = get_module(model, group.source)
    if group.kind == "layernorm":
        if not isinstance(source, nn.LayerNorm) or source.weight is None:
            raise ValueError(f"smoothing group: {group.source} must be a LayerNorm with an affine")
        if tuple(source.normalized_shape) != (c,):
            raise ValueError(f"smoothing group: {group.source} normalizes {source.normalized_shape}, not {c}")
    else:
        if not isinstance(source, nn.Linear):
            raise ValueError(f"smoothing group: {group.source} is {type(source).__name__}, not Linear")
        starts = [group.offset] + ([group.scale_offset] if group.kind == "adaln" else [])
        for start in starts:
            if start < 0 or start + c > source.out_features:
                raise ValueError(
                    f"smoothing group: rows [{start}, {start + c}) outside {group.source}'s "
                    f"{source.out_features} outputs"
                )
        if group.kind == "adaln" and abs(group.offset - group.scale_offset) < c:
            raise ValueError(f"smoothing group {group.source!r}: shift and scale rows overlap")
    return c


def _scale_rows_(linear: nn.Linear, start: int, s: torch.Tensor, plus_one: bool = False) -> None:
    rows = slice(start, start + s.numel())
    w = linear.weight
    w[rows] = (w[rows].double() / s[:, None]).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias[rows].double()
        linear.bias[rows] = ((b + 1) / s - 1 if plus_one else b / s).to(linear.bias.dtype)
    elif plus_one:  # a bias-free scale chunk gains the bias (1/s - 1)
        raise ValueError("smoothing an adaLN scale chunk needs the modulation Linear to have a bias")


@torch.no_grad()
def smooth_(model: nn.Module, group: SmoothingGroup, scales: torch.Tensor) -> None:
    """Divide the group's input channels by ``scales`` (folded into ``source``) and multiply the layers'
    input columns by them: exact before rounding. ``scales``: ``[C]``, positive and finite."""
    c = group_channels(model, group)
    s = torch.as_tensor(scales).detach().double().reshape(-1)
    if s.numel() != c:
        raise ValueError(f"smooth_ {group.source!r}: {s.numel()} scales for {c} channels")
    check_finite(s, f"smoothing scales of {group.source}")
    if bool((s <= 0).any()):
        raise ValueError(f"smooth_ {group.source!r}: scales must be > 0")
    source = get_module(model, group.source)
    s = s.to(source.weight.device)
    if group.kind == "layernorm":
        source.weight.copy_((source.weight.double() / s).to(source.weight.dtype))
        if source.bias is not None:
            source.bias.copy_((source.bias.double() / s).to(source.bias.dtype))
    elif group.kind == "linear":
        _scale_rows_(source, group.offset, s)
    else:
        if source.bias is None:
            raise ValueError(f"smooth_ {group.source!r}: an adaLN modulation Linear needs a bias")
        _scale_rows_(source, group.offset, s)
        _scale_rows_(source, group.scale_offset, s, plus_one=True)
    touched = [source]
    for name in group.layers:
        layer = get_module(model, name)
        layer.weight.copy_((layer.weight.double() * s[None, :]).to(layer.weight.dtype))
        touched.append(layer)
    for module in touched:
        if isinstance(module, QUANT_MODULE_TYPES):
            module.requantize()


def check_groups(model: nn.Module, groups: Sequence[SmoothingGroup]) -> None:
    """Validate every group and that no layer is a consumer in two groups (their scales would compound)."""
    seen: dict[str, str] = {}
    for group in groups:
        group_channels(model, group)
        for name in group.layers:
            if name in seen:
                raise ValueError(f"{name} consumes two smoothing groups ({seen[name]}, {group.source})")
            seen[name] = group.source


__all__ = ["SOURCE_KINDS", "SmoothingGroup", "check_groups", "group_channels", "smooth_"]
