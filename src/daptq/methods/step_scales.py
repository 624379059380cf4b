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

from collections.abc import Mapping
from typing import Any

import torch

from daptq.models.adapter import VLAAdapter
from daptq.models.step_scales import (
    DECISION_KEY,
    denoising_steps_of,
    install_recorded_step_scales,
    install_step_scales,
    installed_step_scales,
    remove_step_scales,
    step_scales_from_dict,
    step_scales_to_dict,
)
from daptq.quant.observers import ActivationObserver
from daptq.quant.spec import ActivationSpec


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
