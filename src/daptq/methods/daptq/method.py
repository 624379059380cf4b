"""The DA-PTQ method on the methods interface, in the pipeline order of paper-notes section 4.

1. ``calibrate`` (float model): drift scores s^ from the calibration actions; gradients of the drift-weighted
   denoising loss over R batches (phi, and the Fisher for per-bit costs); interface output mean/covariance;
   GPTQ input Hessians when ``rounding="gptq"``.
2. ``apply``: the bit map (paper: Eq. 20; budget: the MILP), quantization with that map (RTN or GPTQ), a pass
   through the quantized model for the interface's mu_Q/S_Q, then CSRC folded into the interface layer
   before its (re-)rounding.
3. ``record``: the plan with the final per-module specs, and the decisions (drift weights, phi, bit map,
   allocation, compensation) in the QuantRecord.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from daptq.methods import register_method
from daptq.methods.base import Method, forward_batch, require_plan
from daptq.methods.gptq import gptq_quantize_layer_
from daptq.methods.scope import ScopePlan, fit_group_size, with_weight_bits
from daptq.methods.smoothquant import static_activation_layers
from daptq.methods.step_scales import DECISION_KEY as STEP_SCALES
from daptq.methods.step_scales import StepObservers, install_observed_step_scales
from daptq.models.adapter import VLAAdapter
from daptq.quant import QuantSpec, quantize_
from daptq.quant._util import set_module
from daptq.quant.capture import Covariance, Hessian, capture, capturing, channel_rows, fan_in_rows
from daptq.quant.category import quantize_registered, registered_type

from .allocation import (
    FLOAT_BITS,
    LayerShape,
    WeightFormat,
    allocate_bits,
    budget_from_average_bits,
    layer_bytes,
    paper_bit_map,
)
from .blockwise import blockwise_gradient_stats
from .compensation import Stats, compensate, fold_compensation, output_stats
from .config import DAPTQConfig
from .drift import drift_scores
from .sensitivity import (
    GradientStats,
    action_deviation,
    activation_costs,
    bit_sensitivities,
    gradient_stats,
    sampled_chunks,
)

Batches = Sequence[Mapping[str, torch.Tensor]]


def _run_all(adapter: VLAAdapter, batches: Batches):
    def run(_model) -> None:
        for i, batch in enumerate(batches):
            forward_batch(adapter, batch, seed=i)

    return run


def action_head_blocks(adapter: VLAAdapter, stack: str | None = None) -> dict[str, int]:
    """Module -> block index in the action head's repeated stack (the paper's "DiT blocks"), from the
    adapter's declarations: ``stack``, or the one stack its action-head modules have blocks in."""
    modules = [m for m in adapter.quantizable_modules() if m.block is not None]
    if stack is None:
        stacks = sorted({m.stack for m in modules if m.role == "action_head" and m.stack is not None})
        if not stacks and not any(m.role == "action_head" and m.block is not None for m in modules):
            return {}  # no repeated action-head blocks (e.g. OpenVLA-OFT's MLP head): the caller records it
        if len(stacks) != 1:
            raise ValueError(
                f"DA-PTQ: float_dit_blocks needs the action head's block stack, but "
                f"{type(adapter).__name__} declares action-head blocks in {stacks or 'no stack'}; "
                "set action_head_stack (or float_dit_blocks=0)"
            )
        stack = stacks[0]
    out = {m.name: int(m.block) for m in modules if m.stack == stack}  # type: ignore[arg-type]
    if not out:
        raise ValueError(f"DA-PTQ: {type(adapter).__name__} declares no module in stack {stack!r}")
    return out


def calibration_actions(batches: Batches) -> np.ndarray:
    """All calibration action chunks, (N, K, D)."""
    missing = [i for i, b in enumerate(batches) if "actions" not in b]
    if missing:
        raise ValueError(
            f"DA-PTQ needs calibration action chunks ('actions'); batches {missing[:5]} have none"
        )
    return np.concatenate([np.asarray(b["actions"], dtype=np.float64) for b in batches])


@register_method(DAPTQConfig, name="daptq")
class DAPTQ(Method):
    """Drift-aware PTQ: DA-MPA bit allocation plus CSRC at the interface (see the module docstring)."""

    config: DAPTQConfig

    def __init__(self, config: DAPTQConfig) -> None:
        super().__init__(config)
        self._batches: list[Mapping[str, torch.Tensor]] = []
        self._weights: torch.Tensor | None = None
        self._grads: GradientStats | None = None
        self._fp_stats: dict[str, Stats] = {}
        self._hessians: dict[str, torch.Tensor] = {}
        self._interfaces: list[str] = []
        self._pairs: dict[str, torch.Tensor] = {}
        self._act_costs: dict[str, dict[int, float]] = {}
        self._registered: set[str] = set()
        self._blockwise: dict[str, dict[Any, float]] | None = None
        self._specs: dict[str, QuantSpec] = {}

    @property
    def sees_registered_types(self) -> bool:
        """The budget preset allocates registered-type layers (GR00T's category-specific projections) itself,
        their bytes and sensitivities counted, so the driver does not hold them out (``methods.registered``).
        """
        return self.config.preset == "budget"

    # --- 1. the float pass ------------------------------------------------------------------------------
    def calibrate(self, adapter: VLAAdapter, batches: Batches) -> None:
        plan = require_plan(self)
        self._float_statistics(adapter, plan, batches)
        self._capture_float_stats(adapter, plan)

    def _float_statistics(
        self, adapter: VLAAdapter, plan: ScopePlan, batches: Batches, blockwise=False
    ) -> None:
        """Drift scores, gradient sensitivities, activation costs and CSRC's targets (the float model).
        ``blockwise``: the budget preset's whole-model gradients block by block (``blockwise.py``)."""
        cfg = self.config
        if not batches:
            raise ValueError("DA-PTQ needs calibration batches")
        self._batches = list(batches)
        scores = drift_scores(calibration_actions(batches), adapter.action_space, cfg.drift_config())
        self._weights = torch.tensor(scores, dtype=torch.float32)
        self.decisions["drift_scores"] = dict(
            zip(adapter.action_space.names, map(float, scores), strict=True)
        )
        self.decisions["drift_config"] = cfg.drift_config().to_dict()
        self._registered = {n for n in plan.modules if registered_type(adapter.module(n)) is not None}
        ranked = self._ranked_layers(plan)
        if ranked and blockwise and cfg.preset == "budget":
            self._grads = self._blockwise_costs(adapter, plan, ranked)
            self.decisions["phi"] = self._grads.phi
            self.decisions["sensitivity_batches"] = self._grads.n_batches
        elif ranked:
            self._grads = gradient_stats(
                adapter,
                self._batches[: cfg.sensitivity_batches],
                ranked,
                dim_weights=self._weights if cfg.drift_weighted else None,
                seed=cfg.sensitivity_seed,
            )
            self.decisions["phi"] = self._grads.phi
            self.decisions["sensitivity_batches"] = self._grads.n_batches
        if cfg.activation_choices:
            self._act_costs = activation_costs(
                adapter,
                self._batches[: cfg.sensitivity_batches],
                list(plan.modules),
                {a: cfg.activation_spec(a) for a in cfg.activation_choices},
                dim_weights=self._weights if cfg.drift_weighted else None,
                seed=cfg.sensitivity_seed,
            )
        self._interfaces = self._interface_layers(adapter) if cfg.use_csrc else []

    def _blockwise_costs(self, adapter: VLAAdapter, plan: ScopePlan, names: list[str]) -> GradientStats:
        """The budget preset's per-(layer, choice) costs from gradients computed block by block, each block's
        costs taken before the next block's gradients exist; returns phi (no gradient tensors kept)."""
        cfg = self.config
        batches = self._batches[: cfg.sensitivity_batches]
        weighted = self._weights if cfg.drift_weighted else None
        candidates = self._candidates(plan)
        specs = {n: {c: q.weight for c, q in candidates[n].items()} for n in names}
        proxy = "taylor" if cfg.estimator == "drift_taylor" else "fisher"
        costs: dict[str, dict[Any, float]] = {}

        def reduce(stats: GradientStats) -> None:
            for n in stats.grad_sq_mean:
                costs[n] = bit_sensitivities(adapter.model, _only(stats, n), specs[n], proxy)[n]

        unweighted = cfg.estimator == "unweighted_fisher" and cfg.drift_weighted
        seed = cfg.sensitivity_seed
        first = (lambda _stats: None) if unweighted else reduce  # phi only: never every layer's gradient
        phi = blockwise_gradient_stats(adapter, batches, names, weighted, seed, first)
        if unweighted:  # phi from the weighted loss, the costs from the unweighted one (as _costs does)
            blockwise_gradient_stats(adapter, batches, names, None, seed, reduce)
        self._blockwise = {n: costs[n] for n in plan.modules}
        return phi

    def _ranked_layers(self, plan: ScopePlan) -> list[str]:
        cfg = self.config
        if cfg.preset == "budget":
            return list(plan.modules) if cfg.estimator != "action_deviation" else []
        if not cfg.use_mpa:
            return []
        return [n for n, m in plan.modules.items() if m.role in cfg.rank_roles]

    def _interface_layers(self, adapter: VLAAdapter) -> list[str]:
        """CSRC's targets: ``interface_layers`` or the declared interface modules. A declared ``fold="none"``
        is refused; ``"tied_pairs"`` restricts CSRC there to gains tied across each RoPE pair."""
        declared = {m.name: m for m in adapter.interface_modules()}
        names = list(self.config.interface_layers) or list(declared)
        if not names:
            raise ValueError("DA-PTQ: CSRC is on but the adapter declares no interface modules")
        known = {n for n, _ in adapter.model.named_modules()}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"DA-PTQ: interface_layers {unknown} are not modules of the model")
        self._pairs = {}
        for name in names:
            m = declared.get(name)
            if m is None or m.fold == "exact":
                continue
            if m.fold == "none":
                why = f"; {m.note}" if m.note else ""
                raise ValueError(
                    f"DA-PTQ: CSRC cannot fold a correction into interface {name!r}: "
                    f"{type(adapter).__name__} declares its fold inexact (fold='none'{why}). "
                    "Set use_csrc=False, or name foldable layers in interface_layers."
                )
            self._pairs[name] = m.rope_pairs()  # "tied_pairs"
        if self._pairs:
            self.decisions["csrc_restricted"] = {
                n: "rotary embedding follows: diagonal gains tied across each RoPE pair, no cross-channel map"
                for n in self._pairs
            }
        return names

    def _capture_float_stats(self, adapter: VLAAdapter, plan: ScopePlan) -> None:
        """In one pass over the calibration set on the float model: the interface layers' output statistics
        (CSRC's targets) and, for GPTQ rounding, every in-scope layer's input Hessian (one per conv group)."""
        model = adapter.model
        hessians = {}
        if self.config.rounding == "gptq":  # registered types have no GPTQ: their own RTN (recorded)
            hessians = {
                n: Hessian(getattr(model.get_submodule(n), "groups", 1))
                for n in plan.modules
                if n not in self._registered
            }
        covariances = {n: Covariance() for n in self._interfaces}
        if not hessians and not covariances:
            return
        run = _run_all(adapter, self._batches)
        capture(model, run, inputs=hessians, outputs=covariances, rows=fan_in_rows, output_rows=channel_rows)
        if covariances:
            self._fp_stats = {n: Stats.of(r) for n, r in covariances.items()}
        if hessians:
            self._hessians = {n: h.hessian for n, h in hessians.items()}

    # --- 2. decide, quantize, compensate ----------------------------------------------------------------
    def apply(self, adapter: VLAAdapter) -> None:
        specs = self._decide(adapter, require_plan(self))
        model = adapter.model
        registered = {n: q for n, q in specs.items() if n in self._registered}
        quantize_(
            model,
            {n: q for n, q in specs.items() if n not in registered},
            calibration=_run_all(adapter, self._batches),
        )
        for name, spec in registered.items():
            set_module(model, name, quantize_registered(adapter.module(name), spec, name))
        self._record_rounding(adapter, specs)
        if self.config.rounding == "gptq":
            for name in specs:
                self._gptq_if_uniform(model, name, specs[name])
        if self._interfaces:
            self._compensate(adapter)
        if self.config.step_scales:
            self._install_step_scales(adapter, specs)

    def _install_step_scales(self, adapter: VLAAdapter, specs: Mapping[str, QuantSpec]) -> None:
        """Per-denoising-step scales of the static layers, observed on the model as rounded and compensated
        (the allocation decides which layers are static and at what width, so this pass comes last)."""
        static = {n: specs[n].activation for n in static_activation_layers(specs)}
        steps = StepObservers(adapter, static, "DA-PTQ")
        steps.attach(self, adapter)
        try:
            _run_all(adapter, self._batches)(adapter.model)
        finally:
            self.remove_hooks()
        self.decisions[STEP_SCALES] = install_observed_step_scales(adapter, steps)

    def _decide(self, adapter: VLAAdapter, plan: ScopePlan) -> dict[str, QuantSpec]:
        """The bit map (paper) or the allocation (budget): the final per-module specs; ``self.plan`` is
        replaced by the plan with those specs (layers kept float move to ``kept_float``)."""
        if self.config.preset == "paper":
            bits = self._paper_bits(adapter, plan)
            chosen = {n: with_weight_bits(m.spec, bits[n]) for n, m in plan.modules.items()}
        else:
            chosen = self._budget_specs(adapter, plan)
            bits = {n: q.weight.bits for n, q in chosen.items()}
        if self.config.activation_choices:  # a float-weight layer may still round its input
            specs = {
                n: q for n, q in chosen.items() if q.weight.bits != FLOAT_BITS or q.activation is not None
            }
        else:
            specs = {n: q for n, q in chosen.items() if q.weight.bits != FLOAT_BITS}
        self.decisions["bit_map"] = bits
        self._finalize_plan(plan, specs)
        return specs

    def _record_rounding(self, adapter: VLAAdapter, specs: Mapping[str, QuantSpec]) -> None:
        if self._registered:
            self.decisions["registered_types"] = {
                n: (
                    f"{type(adapter.module(n)).__name__}: allocated by DA-PTQ budget (bytes and sensitivity "
                    f"counted), rounded by its registered type's RTN"
                    + (f" at {specs[n].short()}" if n in specs else "; kept float")
                )
                for n in sorted(self._registered)
            }
        self.decisions["rounding"] = self.config.rounding

    def _gptq_if_uniform(self, model, name: str, spec: QuantSpec) -> None:
        if name in self._hessians and not spec.weight.is_float:
            if spec.weight.codebook != "uniform":  # GPTQ's grid search has no codebook
                self.decisions.setdefault("rtn_codebook_layers", []).append(name)
                return
            self._gptq(model, name)

    def _gptq(self, model, name: str) -> None:
        gptq_quantize_layer_(
            model.get_submodule(name),
            self._hessians[name],
            block_size=self.config.gptq_block_size,
            damp=self.config.gptq_damp,
        )

    def _paper_bits(self, adapter: VLAAdapter, plan: ScopePlan) -> dict[str, int]:
        cfg = self.config
        base = {n: m.spec.weight.bits for n, m in plan.modules.items()}
        if not cfg.use_mpa or self._grads is None:
            return base
        block_of = action_head_blocks(adapter, cfg.action_head_stack) if cfg.float_dit_blocks else {}
        float_blocks = cfg.float_dit_blocks
        if float_blocks and not block_of:
            self.decisions["float_by_block_note"] = "no DiT blocks: none kept float"
            float_blocks = 0
        bit_map = paper_bit_map(
            self._grads.phi, cfg.keep_float_fraction, cfg.spec.weight.bits, block_of, float_blocks
        )
        self.decisions["float_by_rank"] = bit_map.float_by_rank
        self.decisions["float_by_block"] = bit_map.float_by_block
        self.decisions["ranking"] = bit_map.ranked
        return {**base, **bit_map.bits}

    def _candidates(self, plan: ScopePlan) -> dict[str, dict[Any, QuantSpec]]:
        """Per layer, each allocator choice and the spec it means on that layer: ``bits`` on the layer's own
        (fitted) grid, or ``formats`` with their group sizes fitted to the fan-in by the scope's rule.

        A registered-type layer (GR00T's category-specific projections) takes the integer choices only: its
        quantized type has no float-weight mode (a scope rule with ``spec: null`` keeps one float)."""
        cfg = self.config
        formats = cfg.weight_formats()
        out: dict[str, dict[Any, QuantSpec]] = {}
        for n, m in plan.modules.items():
            if not formats:
                row = {b: with_weight_bits(m.spec, b) for b in cfg.bits}
            else:
                row = {}
                for f in formats:
                    asked = QuantSpec(f.weight_spec(m.spec.weight), m.spec.activation, m.spec.version)
                    fitted, note = fit_group_size(asked, m.fan_in, cfg.scope.group_fallback)
                    if fitted is None:
                        raise ValueError(
                            f"DA-PTQ: format {f.label} cannot serve {n} (fan-in {m.fan_in}): {note}"
                        )
                    row[f] = fitted
            if n in self._registered:
                row = {c: q for c, q in row.items() if not q.weight.is_float}
                if not row:
                    raise ValueError(
                        f"DA-PTQ: {n} ({m.kind}) rounds its weight, but every candidate keeps it float; "
                        "add an integer bit width or format"
                    )
            out[n] = row
        return out

    def _with_activations(
        self, candidates: dict[str, dict[Any, QuantSpec]], costs: dict[str, dict[Any, float]]
    ) -> tuple[dict[str, dict[Any, QuantSpec]], dict[str, dict[Any, float]]]:
        """Each weight choice paired with each activation width: ``(weight choice, a)`` candidates, cost the
        weight term plus ``activation_cost_weight`` x the activation term (additive per layer). A registered
        type takes per-token activations only, and no float weight with a rounded input."""
        cfg = self.config
        out_c: dict[str, dict[Any, QuantSpec]] = {}
        out_k: dict[str, dict[Any, float]] = {}
        for n, row in candidates.items():
            out_c[n], out_k[n] = {}, {}
            for c, q in row.items():
                for a in cfg.activation_choices:
                    act = cfg.activation_spec(a)
                    if n in self._registered and act is not None:
                        if q.weight.is_float:
                            continue
                        act = dataclasses.replace(act, mode="dynamic_per_token", observer="minmax")
                    out_c[n][(c, a)] = QuantSpec(q.weight, act, q.version)
                    out_k[n][(c, a)] = costs[n][c] + cfg.activation_cost_weight * self._act_costs[n][a]
        return out_c, out_k

    def _budget_specs(self, adapter: VLAAdapter, plan: ScopePlan) -> dict[str, QuantSpec]:
        cfg = self.config
        candidates = self._candidates(plan)
        costs = self._costs(adapter, plan, candidates)
        if cfg.activation_choices:
            candidates, costs = self._with_activations(candidates, costs)
        per_layer = {n: {c: q.weight for c, q in row.items()} for n, row in candidates.items()}
        shapes = {n: LayerShape(m.weight_shape[0], m.fan_in) for n, m in plan.modules.items()}
        budget = (
            cfg.budget_bytes
            if cfg.budget_bytes is not None
            else budget_from_average_bits(shapes, float(cfg.average_bits))  # type: ignore[arg-type]
        )
        latency = None
        if cfg.latency_weight:
            latency = {
                n: {c: layer_bytes(shapes[n], c, per_layer[n]) / 2**20 for c in per_layer[n]} for n in shapes
            }
            if cfg.activation_choices:  # + compute: the weights "read" at the activation width
                for n, row in latency.items():
                    for c in row:
                        row[c] += cfg.latency_compute * shapes[n].n_weights * c[1] / 8 / 2**20
        alloc = allocate_bits(costs, shapes, per_layer, budget, latency, cfg.latency_weight)
        if cfg.reestimate_rounds:  # interactions: re-price on the model rounded as allocated (reestimate.py)
            from .reestimate import reestimate_and_resolve

            alloc, costs, self.decisions["reestimate"] = reestimate_and_resolve(
                adapter, self._batches[: cfg.sensitivity_batches], per_layer, alloc, costs,
                lambda k: allocate_bits(k, shapes, per_layer, budget, latency, cfg.latency_weight),
                cfg, self._weights, _choice_label,
            )  # fmt: skip
        fp16 = sum(s.n_weights for s in shapes.values()) * 2
        self.decisions["allocation"] = {
            "budget_bytes": alloc.budget_bytes,
            "total_bytes": alloc.total_bytes,
            "average_bits": alloc.average_bits,
            "bytes_vs_bf16": alloc.total_bytes / fp16,
            "objective": alloc.objective,
            "estimator": cfg.estimator,
            "costs": {n: {_choice_label(c): v for c, v in row.items()} for n, row in costs.items()},
        }
        if cfg.activation_choices:
            self.decisions["allocation"]["activation_costs"] = {
                n: {f"a{a}": v for a, v in row.items()} for n, row in self._act_costs.items()
            }
            self.decisions["allocation"]["activation_mode"] = cfg.activation_mode
            self.decisions["activation_map"] = {n: c[1] for n, c in alloc.bits.items()}
            self.decisions["wa_map"] = {n: _wa_label(c) for n, c in alloc.bits.items()}
            if cfg.formats:
                self.decisions["format_map"] = {n: c[0].label for n, c in alloc.bits.items()}
        elif cfg.formats:
            self.decisions["format_map"] = {n: c.label for n, c in alloc.bits.items()}
        return {n: candidates[n][c] for n, c in alloc.bits.items()}

    def _costs(self, adapter: VLAAdapter, plan: ScopePlan, candidates) -> dict[str, dict[Any, float]]:
        cfg = self.config
        if self._blockwise is not None:  # computed block by block with the gradients (_blockwise_costs)
            return self._blockwise
        names = list(plan.modules)
        if cfg.estimator == "action_deviation":
            batches = self._batches[: cfg.sensitivity_batches]
            reference = sampled_chunks(adapter, batches, cfg.sensitivity_seed)  # the float chunks, once
            out: dict[str, dict[Any, float]] = {n: {} for n in names}
            for n in names:  # one layer and choice at a time (each layer's own fitted spec)
                for c, spec in candidates[n].items():
                    if spec.weight.is_float:
                        out[n][c] = 0.0
                        continue
                    if n in self._registered:
                        out[n][c] = _registered_deviation(
                            adapter, batches, n, spec, cfg.sensitivity_seed, reference
                        )
                        continue
                    out[n][c] = action_deviation(
                        adapter, batches, [n], spec, seed=cfg.sensitivity_seed, reference=reference
                    )[n]
            return out
        stats = self._grads
        if cfg.estimator == "unweighted_fisher" and cfg.drift_weighted:
            stats = gradient_stats(
                adapter, self._batches[: cfg.sensitivity_batches], names, None, cfg.sensitivity_seed
            )
        assert stats is not None
        proxy = "taylor" if cfg.estimator == "drift_taylor" else "fisher"
        weights = {n: {c: q.weight for c, q in candidates[n].items()} for n in names}
        return {n: bit_sensitivities(adapter.model, _only(stats, n), weights[n], proxy)[n] for n in names}

    def _finalize_plan(self, plan: ScopePlan, specs: Mapping[str, QuantSpec]) -> None:
        modules = {n: dataclasses.replace(m, spec=specs[n]) for n, m in plan.modules.items() if n in specs}
        kept = dict(plan.kept_float)
        for n in plan.modules:
            if n not in specs:
                kept[n] = f"kept float by DA-PTQ ({self.config.preset} bit map)"
        self.plan = ScopePlan(modules, kept)

    def _compensate(self, adapter: VLAAdapter) -> None:
        model = adapter.model
        q_stats = output_stats(model, _run_all(adapter, self._batches), self._interfaces)
        summaries = {}
        for name in self._interfaces:
            options = self.config.csrc_options()
            comp = compensate(self._fp_stats[name], q_stats[name], options, self._pairs.get(name))
            layer = model.get_submodule(name)
            fold_compensation(layer, comp)  # re-rounds a fake-quant layer with RTN: fold before rounding
            if self.config.rounding == "gptq" and name in self._hessians and hasattr(layer, "requantize"):
                if not layer.spec.weight.is_float:
                    self._gptq(model, name)  # the input Hessian does not change under an output-side fold
            summaries[name] = comp.summary()
        self.decisions["compensation"] = {
            "options": dataclasses.asdict(self.config.csrc_options()),
            **summaries,
        }

    # --- block by block (daptq.methods.sequential) --------------------------------------------------------
    # Before the loop, on the whole float policy (sequential_begin): drift scores, the sensitivities and
    # the bit map or allocation (paper: gradients over the ranked action-head layers only, the graph never
    # reaching the backbone; budget: whole-model gradients block by block, blockwise.py), CSRC's float
    # interface statistics. In the loop: each block's GPTQ Hessians from its recorded float inputs, its
    # rounding. After (sequential_end): CSRC's quantized statistics on the quantized policy, the fold (into
    # the interface, outside the blocks: with streamed weights the pass reloads the rounded blocks).
    def sequential_needs_whole_model(self) -> bool:
        """``paper`` streams (the head's blocks stay loaded through its gradient pass, the CSRC pass reloads
        rounded blocks); ``budget``'s block-wise gradients and activation costs need every block in memory."""
        cfg = self.config
        return cfg.preset == "budget" or bool(cfg.activation_choices)

    def sequential_resident(self, adapter: VLAAdapter) -> list[str]:
        return self._ranked_layers(require_plan(self)) if self.config.preset == "paper" else []

    def sequential_begin(self, adapter: VLAAdapter, batches: Batches) -> None:
        plan = require_plan(self)
        self._float_statistics(adapter, plan, batches, blockwise=True)
        specs = self._decide(adapter, plan)
        static = static_activation_layers(specs)
        if static:  # the whole-model path observes them on the whole weight-rounded model
            raise ValueError(
                "DA-PTQ block by block: static activation scales are observed on the whole rounded model, "
                f"which no block's recorded inputs give (layers {static[:5]}); use dynamic per-token "
                "activations or run DA-PTQ on the whole model"
            )
        self._specs = specs
        if self._interfaces:
            covariances = {n: Covariance() for n in self._interfaces}
            capture(adapter.model, _run_all(adapter, self._batches), outputs=covariances, rows=channel_rows)
            self._fp_stats = {n: Stats.of(r) for n, r in covariances.items()}

    def calibrate_modules(self, adapter: VLAAdapter, names: Sequence[str], run) -> None:
        if self.config.rounding != "gptq":
            return
        model = adapter.model
        hessians = {
            n: Hessian(getattr(model.get_submodule(n), "groups", 1))
            for n in names
            if n in self._specs and n not in self._registered
        }
        if hessians:
            with capturing(model, inputs=hessians, rows=fan_in_rows):
                run()
            self._hessians.update({n: h.hessian for n, h in hessians.items()})

    def apply_modules(self, adapter: VLAAdapter, names: Sequence[str]) -> None:
        model = adapter.model
        specs = {n: self._specs[n] for n in names if n in self._specs}
        plain = {n: q for n, q in specs.items() if n not in self._registered}
        if plain:
            quantize_(model, plain)
        for name, spec in specs.items():
            if name in self._registered:
                set_module(model, name, quantize_registered(adapter.module(name), spec, name))
            elif self.config.rounding == "gptq":
                self._gptq_if_uniform(model, name, spec)
                if name not in self._interfaces:  # CSRC re-rounds the interface with its Hessian
                    self._hessians.pop(name, None)

    def sequential_end(self, adapter: VLAAdapter, run) -> None:
        self._record_rounding(adapter, self._specs)
        streamed = [n for n in self._interfaces if any(t.is_meta for t in adapter.module(n).parameters())]
        if streamed:  # a block streamed out: the fold would be lost
            raise ValueError(
                f"DA-PTQ block by block: CSRC folds into interface layers {streamed} inside a streamed "
                "block; run without a streamed loader, or name interface_layers outside the blocks"
            )
        if self._interfaces:
            self._compensate(adapter)


def _choice_label(choice: Any) -> str:
    if isinstance(choice, tuple):  # (weight choice, activation bits)
        return f"{_choice_label(choice[0])}/a{choice[1]}"
    return choice.label if isinstance(choice, WeightFormat) else str(choice)


def _wa_label(choice: tuple) -> str:
    """``"w4g32a8"``-style label of a (weight, activation) choice; ``"w16a16"`` when nothing is rounded."""
    return f"w{_choice_label(choice[0])}a{choice[1]}"


def _registered_deviation(
    adapter: VLAAdapter, batches: Batches, name: str, spec: QuantSpec, seed: int, reference
) -> float:
    """``action_deviation`` for a registered-type layer: swapped for its quantized type, then put back."""
    model = adapter.model
    original = adapter.module(name)
    set_module(model, name, quantize_registered(original, spec, name))
    try:
        quantized = sampled_chunks(adapter, batches, seed)
    finally:
        set_module(model, name, original)
    errs = [float(((q - r) ** 2).mean()) for q, r in zip(quantized, reference, strict=True)]
    return sum(errs) / len(errs)


def _only(stats: GradientStats, name: str) -> GradientStats:
    return GradientStats(
        {name: stats.phi[name]},
        {name: stats.grad_mean[name]},
        {name: stats.grad_sq_mean[name]},
        stats.n_batches,
    )
