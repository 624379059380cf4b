"""Layer sensitivities on the float model: what DA-MPA ranks and what the budget allocator trades.

- Eq. 18, the drift-weighted denoising loss, is the adapter's own loss re-weighted per action dimension:
  ``adapter.objective(batch, dim_weights=s^)`` (diffusion, flow matching, regression: whatever it declares).
- Eq. 19, ``phi_l = mean over R batches of mean |dL_drift/dW_l|``: :func:`gradient_stats` (``.phi``).
- Per (layer, bits) cost for the budget preset: :func:`bit_sensitivities`, a second-order Taylor estimate of
  the loss increase when that layer alone is rounded at b bits, ``0.5 * sum_i F_ii dW_i^2`` with the
  empirical (batch-gradient) Fisher ``F = mean_r g_r^2`` as the Hessian's diagonal and ``dW`` the RTN error;
  ``proxy="taylor"`` adds the first-order term ``sum_i g_bar_i dW_i``. No extra forward passes per bit width.
- The two alternatives the surrogate check compares: the same gradient statistics with ``dim_weights=None``
  (unweighted sensitivity), and :func:`action_deviation`, a QVLA-style proxy that quantizes one layer at a
  time and measures the (optionally drift-weighted) squared change of the sampled action chunks, with the
  sampling noise shared between the float and the quantized pass.
- Per (layer, activation bits) cost for activation-aware allocation: :func:`activation_costs`, the same
  diagonal-Fisher estimate in the layer's *output*: ``0.5 * sum_t,j (g_tj * dy_tj)^2`` with ``g`` the gradient
  of the drift-weighted loss w.r.t. the output and ``dy = f(Q_a(x)) - f(x)`` the output's change when only
  the input is rounded at ``a`` bits (exact for a linear layer), averaged over the R batches. Registered
  types (GR00T's category-specific layers) are priced like Linear layers on their ``[C*out, in]`` grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from daptq.models.adapter import VLAAdapter
from daptq.quant import QuantSpec, WeightSpec, fake_quantize_weight, temporarily_quantized
from daptq.quant.category import from_weight_matrix as category_from_matrix
from daptq.quant.category import registered_type
from daptq.quant.category import weight_matrix as category_weight_matrix
from daptq.quant.fake import fake_quantize_activation
from daptq.quant.observers import ActivationObserver
from daptq.quant.spec import ActivationSpec

Batch = Mapping[str, torch.Tensor]
Proxy = Literal["fisher", "taylor"]


@dataclass
class GradientStats:
    """Per layer: ``phi`` (Eq. 19), mean gradient and mean squared gradient over the R batches."""

    phi: dict[str, float]
    grad_mean: dict[str, torch.Tensor]
    grad_sq_mean: dict[str, torch.Tensor]
    n_batches: int


def layer_weight(module: nn.Module) -> nn.Parameter | None:
    """The parameter a layer's quantizer rounds: ``weight``, or a registered type's own (GR00T's
    ``CategorySpecificLinear.W``, ``[C, in, out]``; see :func:`as_matrix`)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        return weight
    if registered_type(module) is not None and isinstance(getattr(module, "W", None), nn.Parameter):
        return module.W
    return None


def as_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the ``[rows, fan_in]`` layout the quantizer's grid is defined on."""
    return category_weight_matrix(weight) if registered_type(module) is not None else weight


def _weights(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    if not names:
        raise ValueError("sensitivity: no layers given")
    out = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"sensitivity: {name!r} is not a module of the model") from None
        weight = layer_weight(module)
        if weight is None:
            raise ValueError(f"sensitivity: {name!r} ({type(module).__name__}) has no weight parameter")
        out.append(weight)
    return out


def gradient_stats(
    adapter: VLAAdapter,
    batches: Sequence[Batch],
    names: Sequence[str],
    dim_weights: torch.Tensor | None = None,
    seed: int = 0,
) -> GradientStats:
    """Gradients of the (drift-weighted) objective w.r.t. each named layer's weight, over R batches.

    The diffusion timesteps and noise come from one generator seeded with ``seed``, so two calls (e.g.
    weighted and unweighted) see the same draws. ``requires_grad`` flags are restored afterwards.
    """
    if not batches:
        raise ValueError("sensitivity: no calibration batches")
    weights = _weights(adapter.model, names)
    flags = {p: p.requires_grad for p in adapter.model.parameters()}
    sums = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    sq_sums = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    abs_means = [0.0] * len(weights)
    generator = torch.Generator().manual_seed(seed)
    try:
        for p in flags:  # the graph only over what the named layers' gradients need (e.g. the head alone)
            p.requires_grad_(False)
        for p in weights:
            p.requires_grad_(True)
        for batch in batches:
            loss = adapter.objective(batch, dim_weights=dim_weights, generator=generator)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, (name, g) in enumerate(zip(names, grads, strict=True)):
                if g is None:
                    raise ValueError(f"sensitivity: the adapter's objective does not depend on {name!r}")
                g = g.detach().double()
                sums[i] += g
                sq_sums[i] += g * g
                abs_means[i] += float(g.abs().mean())
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    r = len(batches)
    return GradientStats(
        phi={n: a / r for n, a in zip(names, abs_means, strict=True)},
        grad_mean={n: s / r for n, s in zip(names, sums, strict=True)},
        grad_sq_mean={n: s / r for n, s in zip(names, sq_sums, strict=True)},
        n_batches=r,
    )


def rtn_error(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """``dW = Q(W) - W`` for round-to-nearest with ``spec`` (zero for bits=16), float64."""
    w = weight.detach()
    return (
        (fake_quantize_weight(w, spec).double() - w.double())
        if not spec.is_float
        else torch.zeros_like(w, dtype=torch.float64)
    )


def bit_sensitivities(
    model: nn.Module,
    stats: GradientStats,
    specs: Mapping[int, WeightSpec],
    proxy: Proxy = "fisher",
) -> dict[str, dict[int, float]]:
    """Estimated loss increase ``{layer: {bits: cost}}`` if that layer alone is rounded with ``specs[bits]``.

    ``fisher``: ``0.5 sum F dW^2`` (>= 0, the default: at a trained model the mean gradient is noise);
    ``taylor``: adds ``sum g_bar dW`` (may be negative).
    """
    if proxy not in ("fisher", "taylor"):
        raise ValueError(f"bit_sensitivities: proxy must be 'fisher' or 'taylor', got {proxy!r}")
    out: dict[str, dict[int, float]] = {}
    for name, fisher in stats.grad_sq_mean.items():
        module = model.get_submodule(name)
        weight = layer_weight(module)
        assert weight is not None, name
        row = {}
        for bits, spec in specs.items():
            dw = rtn_error(as_matrix(module, weight), spec)
            if registered_type(module) is not None:
                dw = category_from_matrix(dw, weight.shape)
            cost = 0.5 * float((fisher * dw * dw).sum())
            if proxy == "taylor":
                cost += float((stats.grad_mean[name] * dw).sum())
            row[bits] = cost
        out[name] = row
    return out


@torch.no_grad()
def sampled_chunks(policy: VLAAdapter, batches: Sequence[Batch], seed: int = 0) -> list[torch.Tensor]:
    """The policy's sampled action chunks per batch (float64), batch i's noise from ``seed + i``."""
    return [
        policy.predict_chunk(b, generator=torch.Generator().manual_seed(seed + i)).double()
        for i, b in enumerate(batches)
    ]


def action_deviation(
    policy: VLAAdapter,
    batches: Sequence[Batch],
    names: Sequence[str],
    spec: QuantSpec,
    dim_weights: torch.Tensor | None = None,
    seed: int = 0,
    reference: Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """QVLA-style proxy: ``mean_j w_j (a_q - a_fp)_j^2`` of sampled chunks with one layer quantized.

    ``policy.predict_chunk(batch, generator)`` samples the chunks; each batch is sampled with a generator
    seeded with ``seed + batch index`` in both passes, so only the weights differ. ``reference``: the float
    model's chunks from :func:`sampled_chunks` with the same batches and seed, when the caller scores many
    (layer, spec) pairs (computed here otherwise).
    """
    if not batches:
        raise ValueError("action_deviation: no calibration batches")
    model = policy.model
    if reference is None:
        reference = sampled_chunks(policy, batches, seed)
    elif len(reference) != len(batches):
        raise ValueError(f"action_deviation: {len(reference)} reference chunks for {len(batches)} batches")
    weights = None if dim_weights is None else torch.as_tensor(dim_weights, dtype=torch.float64)
    out = {}
    for name in names:
        _weights(model, [name])
        with temporarily_quantized(model, name, spec):
            quantized = sampled_chunks(policy, batches, seed)
        errs = []
        for a_fp, a_q in zip(reference, quantized, strict=True):
            sq = (a_q - a_fp) ** 2
            errs.append(float((sq if weights is None else sq * weights).mean()))
        out[name] = sum(errs) / len(errs)
    return out


def _feature_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Conv2d) else -1


@torch.no_grad()
def _static_qparams(
    adapter: VLAAdapter, batches: Sequence[Batch], names: Sequence[str], specs: Mapping[int, ActivationSpec]
) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor | None]]]:
    """Static per-tensor scales each layer's input would calibrate to (min-max over ``batches``)."""
    model = adapter.model
    observers = {n: {b: ActivationObserver(s, n) for b, s in specs.items()} for n in names}
    handles = []
    for n in names:

        def hook(_m, args, kwargs, n=n):
            for obs in observers[n].values():
                obs.update(_input_of(n, args, kwargs))

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        from daptq.methods.base import forward_batch

        for i, batch in enumerate(batches):
            forward_batch(adapter, batch, seed=i)
    finally:
        for h in handles:
            h.remove()
    return {n: {b: obs.compute() for b, obs in row.items()} for n, row in observers.items()}


def _input_of(name: str, args: tuple, kwargs: Mapping) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise ValueError(f"activation_costs: {name!r} was called without a positional input tensor")


def activation_costs(
    adapter: VLAAdapter,
    batches: Sequence[Batch],
    names: Sequence[str],
    specs: Mapping[int, ActivationSpec | None],
    dim_weights: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Estimated loss increase ``{layer: {bits: cost}}`` if that layer's input alone is rounded with
    ``specs[bits]`` (None: float input, cost 0); see the module docstring for the estimate.

    Static per-tensor specs are priced with the min-max scale the calibration batches give. The diffusion
    timesteps and noise come from a generator seeded with ``seed`` (as :func:`gradient_stats`)."""
    if not batches:
        raise ValueError("activation_costs: no calibration batches")
    model = adapter.model
    weights = _weights(model, names)
    quantized = {b: s for b, s in specs.items() if s is not None}
    static = {b: s for b, s in quantized.items() if s.mode == "static_per_tensor"}
    qparams = _static_qparams(adapter, batches, names, static) if static else {}
    totals = {n: dict.fromkeys(specs, 0.0) for n in names}
    graded = dict.fromkeys(names, 0)  # outputs whose gradient arrived, per layer
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []

    def forward_hook(name: str):
        def hook(module, args, kwargs, out):
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return None
            x = _input_of(name, args, kwargs).detach()
            deltas = {}
            with torch.no_grad():
                for b, a in quantized.items():
                    scale, zp = qparams[name][b] if b in static else (None, None)
                    xq = fake_quantize_activation(x, a, scale, zp, _feature_dim(module))
                    deltas[b] = module.forward(xq, *args[1:], **kwargs).double() - out.detach().double()

            def on_grad(g: torch.Tensor) -> None:
                graded[name] += 1
                gd = g.detach().double()
                for b, dy in deltas.items():
                    totals[name][b] += 0.5 * float(((gd * dy) ** 2).sum())

            out.register_hook(on_grad)
            return None

        return hook

    generator = torch.Generator().manual_seed(seed)
    try:
        for n, p in zip(names, weights, strict=True):
            p.requires_grad_(True)
            handles.append(model.get_submodule(n).register_forward_hook(forward_hook(n), with_kwargs=True))
        for batch in batches:
            loss = adapter.objective(batch, dim_weights=dim_weights, generator=generator)
            torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    missing = [n for n, k in graded.items() if not k]
    if missing:  # e.g. a layer the objective runs without gradients: its cost would read as 0
        raise ValueError(
            f"activation_costs: the adapter's objective does not depend on the output of {missing[:5]}"
        )
    r = len(batches)
    return {n: {b: v / r for b, v in row.items()} for n, row in totals.items()}
