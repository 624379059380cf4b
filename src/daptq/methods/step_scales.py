"""Static activation scales per denoising step for the layers the action head runs at every step.

A diffusion / flow head is evaluated once per DDIM or Euler step on inputs whose range moves with the noise
level, so one static per-tensor scale fits no step well (the largest range sets it for all). Here each such
layer gets one scale per step, observed on calibration; the adapter says which step is running
(``VLAAdapter.denoising_step_hook``, capability "denoising_steps"); the method never guesses it.

At run time ``install_step_scales`` registers that hook on the quantized model: before each head evaluation
every layer's ``act_scale`` (and zero point) is set to the step's, and after it back to the shared scale, so
the layer's own buffers always hold the shared scale at rest (a reader that does not know steps sees the
one-scale model). The per-step scales live in the method's record (``decisions["step_scales"]``) and are
re-installed by ``load_quantized_policy``; deployment costs one scalar-scale swap per layer and step.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from daptq.models.adapter import VLAAdapter
from daptq.quant.fake import QUANT_MODULE_TYPES
from daptq.quant.observers import ActivationObserver
from daptq.quant.spec import ActivationSpec

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


class StepObservers:
    """One ``ActivationObserver`` per (layer, denoising step), fed by input pre-hooks the method owns."""

    def __init__(self, adapter: VLAAdapter, specs: Mapping[str, ActivationSpec], who: str) -> None:
        if not specs:
            raise ValueError(
                f"{who}: step_scales=True needs static activation scales (an ActivationSpec with "
                "mode='static_per_tensor') on some in-scope layer"
            )
        self.steps = denoising_steps_of(adapter, who)
        self.step: int | None = None
        self.observers = {
            n: [ActivationObserver(a, f"{n} (denoising step {i})") for i in range(self.steps)]
            for n, a in specs.items()
        }

    def set_step(self, step: int | None) -> None:
        self.step = step

    def attach(self, method: Any, adapter: VLAAdapter) -> None:
        """Register the step hook and one input pre-hook per layer through ``method`` (a HooksMixin), so the
        method's ``remove_hooks()`` removes them all."""
        method._handles().append(adapter.denoising_step_hook(self.set_step))
        for name, per_step in self.observers.items():
            method.register_forward_pre_hook(
                adapter.module(name), lambda _m, args, _o=per_step: self._update(_o, args[0])
            )

    def _update(self, per_step: list[ActivationObserver], x: torch.Tensor) -> None:
        if self.step is not None:
            per_step[self.step].update(x)

    def compute(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``{layer: (scales (steps,), zero points (steps,) | None)}`` for every layer seen at every step
        (the action head's); layers outside the head (never seen at a step) are left out."""
        out = {}
        for name, per_step in self.observers.items():
            if any(o.min is None for o in per_step):
                continue
            qparams = [o.compute() for o in per_step]
            scales = torch.stack([s.reshape(()) for s, _ in qparams])
            zps = None if qparams[0][1] is None else torch.stack([z.reshape(()) for _, z in qparams])
            out[name] = (scales, zps)
        return out


def install_observed_step_scales(adapter: VLAAdapter, observers: StepObservers) -> dict[str, Any]:
    """Compute the per-step scales ``observers`` saw, install them on the (quantized) model and return
    their record form (for ``decisions["step_scales"]``)."""
    scales = observers.compute()
    install_step_scales(adapter, scales)
    return step_scales_to_dict(scales)


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
    "StepObservers",
    "install_observed_step_scales",
    "install_recorded_step_scales",
    "install_step_scales",
    "installed_step_scales",
    "remove_step_scales",
    "step_scales_from_dict",
    "step_scales_to_dict",
]
