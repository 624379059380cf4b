"""Per-denoising-step activation scales at run time: installed on a quantized model, recorded, re-installed.

The method side (observing the scales on calibration) lives in ``daptq.methods.step_scales``; this half is
what a loaded quantized policy needs, so ``load_quantized_policy`` re-installs recorded scales
without importing a method. See that module's docstring for the mechanism.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from daptq.models.adapter import VLAAdapter
from daptq.quant.fake import QUANT_MODULE_TYPES

DECISION_KEY = "step_scales"
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def denoising_steps_of(adapter: VLAAdapter, who: str) -> int:
    """The adapter's step count, or a ValueError naming ``who`` when it does not declare the capability."""
    if "denoising_steps" not in adapter.capabilities:
        raise ValueError(
            f"{who}: step_scales needs the adapter's 'denoising_steps' capability (denoising_steps() and "
            f"denoising_step_hook()); {type(adapter).__name__} does not declare it"
        )
    n = adapter.denoising_steps()
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{type(adapter).__name__}.denoising_steps() must be a positive int, got {n!r}")
    return n


def step_scales_to_dict(scales: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, Any]:
    """JSON form for the record (float32 values survive the round trip through Python floats exactly)."""
    return {
        n: {"scales": [float(v) for v in s], "zero_points": None if z is None else [int(v) for v in z]}
        for n, (s, z) in scales.items()
    }


def step_scales_from_dict(d: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    out = {}
    for name, entry in d.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("scales"), list):
            raise ValueError(f"step_scales[{name!r}] must be an object with a 'scales' list, got {entry!r}")
        scales = torch.tensor(entry["scales"], dtype=torch.float32)
        if scales.dim() != 1 or not bool((scales > 0).all()) or not bool(torch.isfinite(scales).all()):
            raise ValueError(f"step_scales[{name!r}]: scales must be finite and > 0")
        zps = entry.get("zero_points")
        zp = None if zps is None else torch.tensor(zps, dtype=torch.uint8)
        if zp is not None and zp.shape != scales.shape:
            raise ValueError(f"step_scales[{name!r}]: {len(zps)} zero points for {len(scales)} scales")
        out[name] = (scales, zp)
    return out


class _StepSwitch:
    """The installed controller: per-step ``act_scale`` / ``act_zero_point`` during a head evaluation."""

    def __init__(self, layers: dict[str, nn.Module], scales: dict[str, tuple[torch.Tensor, Any]]) -> None:
        self.layers = layers
        self.scales = scales
        self.shared = {
            n: (m.act_scale.clone(), None if m.act_zero_point is None else m.act_zero_point.clone())
            for n, m in layers.items()
        }
        self.handle: Any = None

    def __call__(self, step: int | None) -> None:
        for name, layer in self.layers.items():
            if step is None:
                s, z = self.shared[name]
            else:
                scales, zps = self.scales[name]
                s, z = scales[step], None if zps is None else zps[step]
            layer.act_scale.copy_(s)
            if z is not None:
                layer.act_zero_point.copy_(z)


def install_step_scales(
    adapter: VLAAdapter, scales: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]
) -> None:
    """Make the quantized layers ``scales`` names use their per-step scale at each denoising step (replaces
    a previous installation on the same model). Each must be a fake-quant layer with a static activation
    spec, calibrated (its ``act_scale`` is the shared scale used outside sampling)."""
    n = denoising_steps_of(adapter, "install_step_scales")
    layers: dict[str, nn.Module] = {}
    for name, (s, z) in scales.items():
        layer = adapter.module(name)
        a = getattr(getattr(layer, "spec", None), "activation", None)
        if not isinstance(layer, QUANT_MODULE_TYPES) or a is None or a.mode != "static_per_tensor":
            raise ValueError(f"step scales for {name}: it is not a layer with static activation scales")
        if layer.act_scale is None:
            raise ValueError(f"step scales for {name}: its shared activation scale is not calibrated")
        if tuple(s.shape) != (n,):
            raise ValueError(f"step scales for {name}: {tuple(s.shape)} scales, the adapter runs {n} steps")
        if (z is None) != (layer.act_zero_point is None):
            raise ValueError(f"step scales for {name}: zero points do not match its activation spec")
        layers[name] = layer
    remove_step_scales(adapter.model)
    if not layers:
        return
    switch = _StepSwitch(layers, {k: (v[0].float(), v[1]) for k, v in scales.items()})
    switch.handle = adapter.denoising_step_hook(switch)
    _INSTALLED[adapter.model] = switch


def remove_step_scales(model: nn.Module) -> None:
    """Undo ``install_step_scales`` (the shared scales are back in every layer)."""
    switch = _INSTALLED.pop(model, None)
    if switch is not None:
        switch.handle.remove()
        switch(None)


def installed_step_scales(model: nn.Module) -> dict[str, tuple[torch.Tensor, Any]]:
    """What ``install_step_scales`` installed on ``model`` (empty when nothing)."""
    switch = _INSTALLED.get(model)
    return {} if switch is None else dict(switch.scales)


def install_recorded_step_scales(policy: Any, record: Any) -> None:
    """Re-install the per-step scales a loaded policy's record carries (no-op when it has none)."""
    recorded = (getattr(record, "decisions", None) or {}).get(DECISION_KEY)
    if recorded:
        install_step_scales(policy.adapter, step_scales_from_dict(recorded))


__all__ = [
    "DECISION_KEY",
    "denoising_steps_of",
    "install_recorded_step_scales",
    "install_step_scales",
    "installed_step_scales",
    "remove_step_scales",
    "step_scales_from_dict",
    "step_scales_to_dict",
]
