"""RTN: round-to-nearest on the existing quant core, as a method.

Data-free unless a spec asks for static activation scales: then ``calibrate`` observes each in-scope layer's
input on the float model (one ``ActivationObserver`` per layer, hooks owned by the method) and ``apply``
installs the scales after swapping in the fake-quant layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from daptq.methods import register_method
from daptq.methods.base import Method, MethodConfig, forward_batch, module_of, require_plan
from daptq.quant.api import quantize_
from daptq.quant.observers import ActivationObserver


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round-to-nearest with the spec's observer (min-max, percentile or MSE clipping); no extra fields."""

    VERSION = 1


def _static_layers(specs: Mapping[str, Any]) -> list[str]:
    return [
        n for n, s in specs.items() if s.activation is not None and s.activation.mode == "static_per_tensor"
    ]


@register_method(RTNConfig, name="rtn")
class RTN(Method):
    """Round every in-scope weight to its grid; static activation scales from calibration when asked for."""

    def __init__(self, config: RTNConfig) -> None:
        super().__init__(config)
        self._observers: dict[str, ActivationObserver] = {}

    def requires_calibration(self) -> bool:
        """Only static activation scales need data; weight rounding is data-free."""
        a = self.config.spec.activation
        if a is not None and a.mode == "static_per_tensor":
            return True
        return any(
            r.spec is not None
            and r.spec.activation is not None
            and r.spec.activation.mode == "static_per_tensor"
            for r in self.config.scope.rules
        )

    def calibrate(self, adapter: Any, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        plan = require_plan(self)
        static = _static_layers(plan.specs)
        if not static:
            return
        if not batches:
            raise ValueError(f"RTN: static activation scales need calibration batches ({len(static)} layers)")
        observers = {n: ActivationObserver(plan.modules[n].spec.activation, n) for n in static}
        for name, obs in observers.items():
            self.register_forward_pre_hook(
                module_of(adapter, name), lambda _m, args, _o=obs: _o.update(args[0])
            )
        for i, batch in enumerate(batches):
            forward_batch(adapter, batch, seed=i)
        self._observers = observers

    def apply(self, adapter: Any) -> None:
        plan = require_plan(self)
        results = {n: obs.compute() for n, obs in self._observers.items()}
        quantize_(adapter.model, plan.specs, activation_qparams=results)
        if results:
            self.decisions["activation_scales"] = {n: float(s) for n, (s, _) in results.items()}
