"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before quantizing both.

Activation outliers sit in a few fixed input channels, so per-token activation scales are set by them and the
other channels lose their resolution. Per input channel ``c`` of layers sharing an input, SmoothQuant divides
the activation by ``s_c = max|x_c|^alpha / max|W_{:,c}|^(1 - alpha)`` and multiplies the weight column by it
(``alpha``, the migration strength, 0.5 by default: both sides end with range ``sqrt(max|x_c| max|W_c|)``).
The division is folded into the module that produces the input (``daptq.quant.smoothing``), so the smoothed
model equals the original before rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from daptq.methods import register_method
from daptq.methods.base import Method, MethodConfig, forward_batch, require_plan
from daptq.methods.scope import ScopePlan
from daptq.models.adapter import VLAAdapter
from daptq.quant.api import quantize_
from daptq.quant.capture import ChannelStats, capture, capturing
from daptq.quant.observers import ActivationObserver
from daptq.quant.smoothing import SmoothingGroup, check_groups, smooth_
from daptq.quant.spec import QuantSpec


def smoothquant_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5, min_scale: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel scales ``max|x|^alpha / max|W|^(1-alpha)`` (float64); channels whose activation or
    weight is all zero get 1 (nothing to migrate)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant_scales: alpha must be in [0, 1], got {alpha!r}")
    a, w = act_absmax.detach().double(), weight_absmax.detach().double()
    if a.shape != w.shape or a.dim() != 1:
        raise ValueError(
            f"smoothquant_scales: activation {tuple(a.shape)} and weight {tuple(w.shape)} maxima must be "
            "equal-length vectors"
        )
    live = (a > 0) & (w > 0)
    s = a.clamp(min=min_scale).pow(alpha) / w.clamp(min=min_scale).pow(1.0 - alpha)
    return torch.where(live, s.clamp(min=min_scale), torch.ones_like(s))


def weight_absmax_per_input(layers: Sequence[nn.Linear]) -> torch.Tensor:
    """``max |W[:, c]|`` over the output rows of every layer sharing the input (float64, ``[C]``)."""
    if not layers:
        raise ValueError("weight_absmax_per_input: no layers")
    return torch.stack([layer.weight.detach().abs().amax(dim=0).double() for layer in layers]).amax(dim=0)


# ---- shared by the calibration-based baselines ------------------------------------------------------------
def calibration_run(
    adapter: VLAAdapter, batches: Sequence[Mapping[str, torch.Tensor]]
) -> Callable[[nn.Module], None]:
    """The forward passes a method observes: every batch through the whole policy (``forward_batch``)."""

    def run(_model: nn.Module) -> None:
        for i, batch in enumerate(batches):
            forward_batch(adapter, batch, seed=i)

    return run


class ObserverReduction:
    """A capture reduction feeding an ``ActivationObserver`` (static per-tensor activation ranges)."""

    def __init__(self, observer: ActivationObserver) -> None:
        self.observer = observer

    def update(self, rows: torch.Tensor) -> None:
        self.observer.update(rows)


def static_activation_layers(specs: Mapping[str, QuantSpec]) -> list[str]:
    return [
        n for n, s in specs.items() if s.activation is not None and s.activation.mode == "static_per_tensor"
    ]


def observe_static_activations(
    adapter: VLAAdapter, specs: Mapping[str, QuantSpec], batches: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Static activation ``(scale, zero_point)`` of every layer whose spec asks for one, observed on the model
    as it is now (after smoothing: the inputs it will see). Empty when no spec is static."""
    names = static_activation_layers(specs)
    if not names:
        return {}
    if not batches:
        raise ValueError(f"static activation scales need calibration batches ({len(names)} layers)")
    observers = {n: ActivationObserver(specs[n].activation, n) for n in names}
    capture(
        adapter.model,
        calibration_run(adapter, batches),
        inputs={n: ObserverReduction(o) for n, o in observers.items()},
    )
    return {n: o.compute() for n, o in observers.items()}


def smoothing_groups_in_plan(
    adapter: VLAAdapter, plan: ScopePlan, needs: Callable[[QuantSpec], bool]
) -> tuple[list[SmoothingGroup], dict[str, str]]:
    """The adapter's smoothing groups whose layers the plan quantizes with specs ``needs`` accepts, and why
    each other group (or all, for an adapter that declares none) is left alone."""
    groups = list(adapter.smoothing_groups())
    check_groups(adapter.model, groups)
    chosen, skipped = [], {}
    for group in groups:
        outside = [n for n in group.layers if n not in plan.modules]
        unfit = [n for n in group.layers if n in plan.modules and not needs(plan.modules[n].spec)]
        if outside:
            skipped[group_key(group)] = f"not quantized: {outside}"
        elif unfit:
            skipped[group_key(group)] = f"spec does not call for it: {unfit}"
        else:
            chosen.append(group)
    if not groups:
        skipped["*"] = f"{type(adapter).__name__}.smoothing_groups() is empty (declares no smoothing groups)"
    return chosen, skipped


def group_key(group: SmoothingGroup) -> str:
    return f"{group.source} -> {', '.join(group.layers)}"


def scale_summary(s: torch.Tensor) -> dict[str, Any]:
    """What a record keeps of a scale vector: every value (float32 precision) and its range."""
    s = s.detach().float().cpu()
    return {"min": float(s.min()), "max": float(s.max()), "scales": [float(v) for v in s]}


# ---- the method -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    """SmoothQuant: activation outliers migrated into the weights by folded per-channel scales.

    ``alpha`` is the migration strength (0: activations keep their range, 1: all of it moves into the
    weights). Only the adapter's smoothing groups whose layers quantize activations are smoothed."""

    VERSION = 1
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuantConfig.alpha must be in [0, 1], got {self.alpha}")


def _quantizes_activations(spec: QuantSpec) -> bool:
    return spec.activation is not None


@register_method(SmoothQuantConfig, name="smoothquant")
class SmoothQuant(Method):
    """Observe per-channel max|x| at each smoothing group's input, fold the scales, then round (RTN)."""

    def __init__(self, config: SmoothQuantConfig) -> None:
        super().__init__(config)
        self._groups: list[SmoothingGroup] = []
        self._stats: dict[str, ChannelStats] = {}
        self._batches: Sequence[Mapping[str, torch.Tensor]] = ()
        self._replays: dict[str, Callable[[], None]] = {}  # block by block: static layer -> its forwards

    def calibrate(self, adapter: VLAAdapter, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        plan = require_plan(self)
        if not batches:
            raise ValueError("SmoothQuant needs calibration batches")
        self._groups, skipped = smoothing_groups_in_plan(adapter, plan, _quantizes_activations)
        self.decisions["skipped_groups"] = skipped
        stats = {g.input_of: ChannelStats() for g in self._groups}
        if stats:
            capture(adapter.model, calibration_run(adapter, batches), inputs=stats)
        self._stats, self._batches = stats, batches

    def apply(self, adapter: VLAAdapter) -> None:
        plan = require_plan(self)
        model = adapter.model
        smoothed = {}
        for group in self._groups:
            layers = [model.get_submodule(n) for n in group.layers]
            s = smoothquant_scales(
                self._stats[group.input_of].absmax, weight_absmax_per_input(layers), self.config.alpha
            )
            smooth_(model, group, s)
            smoothed[group_key(group)] = {**group.to_dict(), **scale_summary(s)}
        self.decisions["smoothing"] = smoothed
        qparams = observe_static_activations(adapter, plan.specs, self._batches)
        quantize_(model, plan.specs, activation_qparams=qparams)
        if qparams:
            self.decisions["activation_scales"] = {n: float(s) for n, (s, _) in qparams.items()}

    # ---- block by block (daptq.methods.sequential) --------------------------------------------------------
    def calibrate_modules(self, adapter: VLAAdapter, names: Sequence[str], run: Callable[[], None]) -> None:
        """Channel maxima at the inputs of the smoothing groups among ``names`` (a group must lie in one
        block); ``run`` is kept to observe static activation ranges after smoothing, in ``apply_modules``."""
        groups = groups_within(self, adapter, names, _quantizes_activations)
        stats = {g.input_of: self._stats.setdefault(g.input_of, ChannelStats()) for g in groups}
        if stats:
            with capturing(adapter.model, inputs=stats):
                run()
        for n in static_activation_layers({n: require_plan(self).specs[n] for n in names}):
            self._replays[n] = run

    def apply_modules(self, adapter: VLAAdapter, names: Sequence[str]) -> None:
        plan, model = require_plan(self), adapter.model
        smoothed = self.decisions.setdefault("smoothing", {})
        for group in groups_within(self, adapter, names, _quantizes_activations):
            layers = [model.get_submodule(n) for n in group.layers]
            stats = self._stats.pop(group.input_of)
            s = smoothquant_scales(stats.absmax, weight_absmax_per_input(layers), self.config.alpha)
            smooth_(model, group, s)
            smoothed[group_key(group)] = {**group.to_dict(), **scale_summary(s)}
        specs = {n: plan.specs[n] for n in names}
        qparams = observe_after(self, adapter, specs)
        quantize_(model, specs, activation_qparams=qparams)
        if qparams:
            self.decisions.setdefault("activation_scales", {}).update(
                {n: float(s) for n, (s, _) in qparams.items()}
            )


def groups_within(
    method: Any, adapter: VLAAdapter, names: Sequence[str], needs: Callable[[QuantSpec], bool]
) -> list[SmoothingGroup]:
    """The method's smoothing groups (chosen on first use, as ``calibrate`` does) whose layers are in
    ``names``; a group split between ``names`` and other modules is refused (its scales need every layer)."""
    if not getattr(method, "_groups_chosen", False):
        method._groups, method.decisions["skipped_groups"] = smoothing_groups_in_plan(
            adapter, require_plan(method), needs
        )
        method._groups_chosen = True
    wanted = set(names)
    groups = [g for g in method._groups if wanted & set(g.layers)]
    split = [group_key(g) for g in groups if not set(g.layers) <= wanted]
    if split:
        raise ValueError(
            f"{type(method).__name__} block by block: smoothing group(s) {split} span more than one block "
            "(or a block and modules outside blocks); run this method on the whole model"
        )
    return groups


def observe_after(
    method: Any, adapter: VLAAdapter, specs: Mapping[str, QuantSpec]
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Static activation ``(scale, zero_point)`` of the static layers in ``specs``, observed by re-running
    the forwards ``calibrate_modules`` was given (the block's replay, or the whole policy) on the model
    as the method left it (smoothed, not yet rounded), as ``observe_static_activations`` does."""
    names = static_activation_layers(specs)
    if not names:
        return {}
    observers = {n: ActivationObserver(specs[n].activation, n) for n in names}
    runs: dict[int, Callable[[], None]] = {}
    for n in names:
        run = method._replays.pop(n)
        runs[id(run)] = run
    with capturing(adapter.model, inputs={n: ObserverReduction(o) for n, o in observers.items()}):
        for run in runs.values():
            run()
    return {n: o.compute() for n, o in observers.items()}
