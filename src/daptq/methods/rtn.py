"""RTN: round-to-nearest on the existing quant core, as a method.

Data-free unless a spec asks for static activation scales: then ``calibrate`` observes each in-scope layer's
input on the float model (one ``ActivationObserver`` per layer, hooks owned by the method) and ``apply``
installs the scales after swapping in the fake-quant layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from daptq.methods import register_method
from daptq.methods.base import Method, MethodConfig, forward_batch, module_of, require_plan
from daptq.methods.rotation import check_rotation
from daptq.methods.smoothquant import static_activation_layers
from daptq.methods.step_scales import DECISION_KEY as STEP_SCALES
from daptq.methods.step_scales import StepObservers, install_observed_step_scales
from daptq.models.adapter import VLAAdapter
from daptq.quant.api import quantize_
from daptq.quant.observers import ActivationObserver
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

# The symmetric grid RTN uses per weight bit width, chosen by layer MSE on the reference VLA's in-scope
# weights (results/symmetric_convention.md, `python benchmarks/symmetric_convention.py`): the full range wins
# at 2-4 bits (W2 per-channel 0.24 vs 0.56 restricted, W4 g128 0.0085 vs 0.0096), exact extremes at 8.
RTN_SYMMETRIC_RANGE = {2: "full", 3: "full", 4: "full", 8: "full_exact", 16: "restricted"}


def _rtn_default_spec() -> QuantSpec:
    return QuantSpec(
        WeightSpec(4, granularity="per_group", group_size=128, symmetric_range=RTN_SYMMETRIC_RANGE[4]),
        ActivationSpec(8),
    )


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round-to-nearest with the spec's observer (min-max, percentile or MSE clipping).

    ``rotation``: "hadamard" folds randomized Hadamard rotations into the weights first
    (``daptq.methods.rotation``), None (default) rounds the weights as they are. ``step_scales``: static
    activation scales per denoising step for the action head's layers (``daptq.methods.step_scales``)."""

    VERSION = 1
    spec: QuantSpec = field(default_factory=_rtn_default_spec)
    rotation: str | None = None
    step_scales: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rotation(self.rotation, "RTNConfig.rotation")

    @classmethod
    def default_symmetric_range(cls, bits: int) -> str:
        return RTN_SYMMETRIC_RANGE.get(bits, "restricted")


@register_method(RTNConfig, name="rtn")
class RTN(Method):
    """Round every in-scope weight to its grid; static activation scales from calibration when asked for."""

    def __init__(self, config: RTNConfig) -> None:
        super().__init__(config)
        self._observers: dict[str, ActivationObserver] = {}
        self._steps: StepObservers | None = None

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

    def calibrate(self, adapter: VLAAdapter, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        plan = require_plan(self)
        static = static_activation_layers(plan.specs)
        if not static:
            if self.config.step_scales:
                StepObservers(adapter, {}, "RTN")  # raises: nothing has static scales
            return
        if not batches:
            raise ValueError(f"RTN: static activation scales need calibration batches ({len(static)} layers)")
        observers = {n: ActivationObserver(plan.modules[n].spec.activation, n) for n in static}
        for name, obs in observers.items():
            self.register_forward_pre_hook(
                module_of(adapter, name), lambda _m, args, _o=obs: _o.update(args[0])
            )
        if self.config.step_scales:
            self._steps = StepObservers(adapter, {n: plan.modules[n].spec.activation for n in static}, "RTN")
            self._steps.attach(self, adapter)
        for i, batch in enumerate(batches):
            forward_batch(adapter, batch, seed=i)
        self._observers = observers

    def apply(self, adapter: VLAAdapter) -> None:
        plan = require_plan(self)
        results = {n: obs.compute() for n, obs in self._observers.items()}
        quantize_(adapter.model, plan.specs, activation_qparams=results)
        if results:
            self.decisions["activation_scales"] = {n: float(s) for n, (s, _) in results.items()}
        if self._steps is not None:
            self.decisions[STEP_SCALES] = install_observed_step_scales(adapter, self._steps)

    # block by block (daptq.methods.sequential): the same observers and rounding, per subset of modules
    def calibrate_modules(self, adapter: VLAAdapter, names: Sequence[str], run: Callable[[], None]) -> None:
        plan = require_plan(self)
        if self.config.step_scales:
            raise ValueError("RTN: step_scales is not available block by block (sequential calibration)")
        static = [n for n in static_activation_layers(plan.specs) if n in set(names)]
        for name in static:
            obs = self._observers.setdefault(
                name, ActivationObserver(plan.modules[name].spec.activation, name)
            )
            self.register_forward_pre_hook(
                module_of(adapter, name), lambda _m, args, _o=obs: _o.update(args[0])
            )
        if static:
            run()

    def apply_modules(self, adapter: VLAAdapter, names: Sequence[str]) -> None:
        plan = require_plan(self)
        specs = {n: plan.specs[n] for n in names if n in plan.specs}
        results = {n: self._observers.pop(n).compute() for n in names if n in self._observers}
        if specs:
            quantize_(adapter.model, specs, activation_qparams=results)
        if results:
            scales = self.decisions.setdefault("activation_scales", {})
            scales.update({n: float(s) for n, (s, _) in results.items()})
