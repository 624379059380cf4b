"""Interactions: re-estimate the budget allocator's costs on the partly quantized model and re-solve.

The ``budget`` MILP sums per-layer costs, each estimated on the float model with that layer alone rounded, so
it assumes the damages add up. VLAQuantBench (2026) found they do not on real VLAs (two groups harmless alone,
broken together). ``DAPTQConfig.reestimate_rounds = R`` makes the allocator see the first allocation's
rounding: after an allocation, every in-scope layer's weight is rounded in place as allocated (RTN; float
choices untouched), the gradient statistics of the (drift-weighted) objective are taken at that point, so
each layer's Fisher (and, with ``drift_taylor``, its mean gradient) reflects the other layers' rounding, the
layer's cost per candidate is recomputed from them (``bit_sensitivities``, the candidate's error measured
from the float weight), the weights are restored, and the same MILP is solved again under the same budget.
Round r solves on the mean of its r re-estimates (round 1: the re-estimate itself): solving on the last one
alone swung between two allocations on the reference VLA (``benchmarks/reestimate_open_loop.py``). Repeated
R times, or until the allocation stops changing. Each round's allocation, objective, bytes and the costs it
solved on are recorded in ``decisions["reestimate"]``.

Cost: one extra gradient pass over the ``sensitivity_batches`` per round (the first estimate's price), no
extra pass per candidate. Weight-only: activation widths (``activation_choices``) and the
``action_deviation`` estimator are not re-estimated (the config refuses them together).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from daptq.models.adapter import VLAAdapter
from daptq.quant import WeightSpec
from daptq.quant.category import from_weight_matrix as category_from_matrix
from daptq.quant.category import registered_type

from .sensitivity import GradientStats, as_matrix, bit_sensitivities, gradient_stats, layer_weight, rtn_error


@contextmanager
def rounded_weights(model: nn.Module, specs: Mapping[str, WeightSpec]) -> Iterator[None]:
    """Each named layer's weight replaced in place by its round-to-nearest under ``specs`` (float specs left
    as they are), all restored bitwise on exit, also on error."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, spec in specs.items():
                if spec.is_float:
                    continue
                module = model.get_submodule(name)
                weight = layer_weight(module)
                if weight is None:
                    raise ValueError(
                        f"re-estimation: {name!r} ({type(module).__name__}) has no weight to round"
                    )
                saved[name] = weight.detach().clone()
                dw = rtn_error(as_matrix(module, weight), spec)
                if registered_type(module) is not None:
                    dw = category_from_matrix(dw, weight.shape)
                weight.add_(dw.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                layer_weight(model.get_submodule(name)).copy_(original)  # type: ignore[union-attr]


def costs_on_allocation(
    adapter: VLAAdapter,
    batches: Sequence[Mapping[str, torch.Tensor]],
    allocated: Mapping[str, WeightSpec],
    candidates: Mapping[str, Mapping[Any, WeightSpec]],
    *,
    dim_weights: torch.Tensor | None,
    seed: int,
    proxy: str = "fisher",
) -> tuple[dict[str, dict[Any, float]], GradientStats]:
    """Per layer and candidate, the estimated loss increase with the gradient statistics taken on the model
    rounded as ``allocated`` (every layer at its allocated weight spec), and those statistics."""
    names = list(candidates)
    with rounded_weights(adapter.model, allocated):
        stats = gradient_stats(adapter, batches, names, dim_weights, seed)
    costs = {}
    for n in names:
        one = GradientStats(
            {n: stats.phi[n]}, {n: stats.grad_mean[n]}, {n: stats.grad_sq_mean[n]}, stats.n_batches
        )
        costs[n] = bit_sensitivities(adapter.model, one, dict(candidates[n]), proxy)[n]  # type: ignore[arg-type]
    return costs, stats


def reestimate_and_resolve(
    adapter: VLAAdapter,
    batches: Sequence[Mapping[str, torch.Tensor]],
    candidates: Mapping[str, Mapping[Any, WeightSpec]],
    first: Any,
    first_costs: Mapping[str, Mapping[Any, float]],
    solve: Callable[[dict[str, dict[Any, float]]], Any],
    config: Any,
    drift_weights: torch.Tensor | None,
    label: Callable[[Any], str] = str,
) -> tuple[Any, dict[str, dict[Any, float]], dict[str, Any]]:
    """Up to ``config.reestimate_rounds`` re-estimations after the allocation ``first`` (``allocate_bits``'s
    result), each followed by ``solve(costs)`` under the caller's budget, with the estimator of ``config``
    (a ``DAPTQConfig``: drift weighting, Fisher or Taylor proxy, seed). Returns the final allocation, its
    costs and the record of every round (round 0 is the first allocation)."""
    rounds = int(config.reestimate_rounds)
    weighted = config.drift_weighted and config.estimator != "unweighted_fisher"
    dim_weights = drift_weights if weighted else None
    proxy = "taylor" if config.estimator == "drift_taylor" else "fisher"
    seed = config.sensitivity_seed

    def entry(alloc: Any, costs: Mapping[str, Mapping[Any, float]]) -> dict[str, Any]:
        return {
            "choices": {n: label(c) for n, c in alloc.bits.items()},
            "objective": alloc.objective,
            "total_bytes": alloc.total_bytes,
            "average_bits": alloc.average_bits,
            "costs": {n: {label(c): v for c, v in row.items()} for n, row in costs.items()},
        }

    history = [entry(first, first_costs)]
    seen = [dict(first.bits)]
    alloc, costs = first, {n: dict(r) for n, r in first_costs.items()}
    converged = None
    estimates: list[dict[str, dict[Any, float]]] = []
    for r in range(1, rounds + 1):
        allocated = {n: candidates[n][c] for n, c in alloc.bits.items()}
        estimate, _ = costs_on_allocation(
            adapter, batches, allocated, candidates, dim_weights=dim_weights, seed=seed, proxy=proxy
        )
        estimates.append(estimate)
        # solve on the mean of the re-estimates so far: re-solving on the last one alone swings between
        # two allocations (benchmarks/reestimate_open_loop.py); round 1 is the re-estimate itself
        costs = {
            n: {c: sum(e[n][c] for e in estimates) / len(estimates) for c in row}
            for n, row in estimate.items()
        }
        alloc = solve(costs)
        history.append(entry(alloc, costs))
        history[-1]["changed_layers"] = sorted(n for n, c in alloc.bits.items() if seen[-1].get(n) != c)
        if dict(alloc.bits) == seen[-1]:  # unchanged: the next estimate would be taken at the same point
            converged = r
            break
        seen.append(dict(alloc.bits))
    record = {
        "rounds_asked": rounds,
        "rounds_run": len(history) - 1,
        "converged_at_round": converged,
        "method": "RTN-rounded weights of the previous allocation, gradient statistics re-taken, same MILP",
        "rounds": history,
    }
    return alloc, costs, record
