"""The verbs: quantize_, calibrate, temporarily_quantized, dequantize_, fold_affine_.

``quantize_(model, recipe, calibration)`` swaps every Linear/Conv2d the recipe selects for a fake-quant module
and rounds it with RTN; if a spec asks for static activation scales, the calibration batches are run through
the model with forward hooks feeding one observer per layer. Hooks are removed in a ``finally`` block, so a
failing batch never leaves a model half-instrumented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._util import get_module, set_module
from .fake import QUANT_MODULE_TYPES, QuantConv2d, QuantLinear, quantized_module_for
from .observers import ActivationObserver, check_finite
from .recipe import Recipe, as_recipe
from .spec import QuantSpec

Calibration = Iterable[Any] | Callable[[nn.Module], Any]
ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Tuples/lists are unpacked into positional arguments; anything else (tensor, dict) is passed as is."""
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_MODULE_TYPES)}


def quantize_(
    model: nn.Module,
    recipe: Recipe | QuantSpec | Mapping[str, QuantSpec | None],
    calibration: Calibration | None = None,
    *,
    method: str = "rtn",
    forward_fn: ForwardFn = default_forward,
    strict: bool = True,
    activation_qparams: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> dict[str, QuantSpec]:
    """Quantize ``model`` in place with round-to-nearest and return ``{module name: spec}`` of what changed.

    ``recipe`` may be a Recipe, a single QuantSpec (applied to every Linear/Conv2d) or ``{exact name: spec}``.
    ``calibration`` (an iterable of batches, or a callable running the model) is required when any spec has a
    static activation scale, unless ``activation_qparams`` gives those layers' ``(scale, zero_point)``
    (observed elsewhere, e.g. by a method on the float model). Example::

        quantize_(model, QuantSpec(WeightSpec(4, granularity="per_group", group_size=128)))
    """
    if method != "rtn":
        raise ValueError(
            f"quantize_ implements method='rtn'; other methods live in daptq.methods, got {method!r}"
        )
    specs = as_recipe(recipe).resolve(model, strict=strict)
    needs_calibration = [
        n for n, s in specs.items() if s.activation is not None and s.activation.mode == "static_per_tensor"
    ]
    given = dict(activation_qparams or {})
    stray = sorted(set(given) - set(needs_calibration))
    if stray:
        raise ValueError(f"activation_qparams names layers without a static activation spec: {stray[:5]}")
    needs_calibration = [n for n in needs_calibration if n not in given]
    if needs_calibration and calibration is None:
        raise ValueError(f"static activation specs need calibration data; layers: {needs_calibration[:5]}...")
    for name in specs:  # validate everything before touching the model
        m = get_module(model, name)
        if isinstance(m, QUANT_MODULE_TYPES):
            raise ValueError(f"{name} is already quantized; call dequantize_(model) first")
        check_finite(m.weight, f"{name}.weight")
    swapped: dict[str, nn.Module] = {}
    try:
        for name, spec in specs.items():
            swapped[name] = set_module(model, name, quantized_module_for(get_module(model, name), spec, name))
        for name, (scale, zp) in given.items():
            get_module(model, name).set_activation_qparams(scale, zp)
        if needs_calibration:
            calibrate(model, calibration, forward_fn=forward_fn, names=needs_calibration)
    except BaseException:
        for name, original in swapped.items():  # all or nothing: leave the model as it was
            set_module(model, name, original)
        raise
    return specs


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """All or nothing: if the block raises, every submodule and tensor of ``model`` is put back as it was."""
    modules = dict(model.named_modules())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    except BaseException:
        for name, module in modules.items():  # parents first, so children land in the original parents
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            if getattr(parent, child, None) is not module:
                setattr(parent, child, module)
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        raise


@contextlib.contextmanager
def calibration_hooks(
    model: nn.Module, names: Iterable[str] | None = None
) -> Iterator[dict[str, ActivationObserver]]:
    """Attach an observer to the input of each static-activation layer; hooks and flags are always removed.

    Inside the context those layers run without activation rounding (they are being measured).
    """
    layers = quantized_modules(model)
    selected = list(layers) if names is None else list(names)
    observers: dict[str, ActivationObserver] = {}
    handles = []
    try:
        for name in selected:
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"calibration: {name!r} is not a quantized module of this model")
            a = layer.spec.activation
            if a is None or a.mode != "static_per_tensor":
                continue
            obs = observers[name] = ActivationObserver(a, name)
            layer.calibrating = True
            handles.append(layer.register_forward_pre_hook(lambda _m, args, _o=obs: _o.update(args[0])))
        yield observers
    finally:
        for h in handles:
            h.remove()
        for name in observers:
            layers[name].calibrating = False


def calibrate(
    model: nn.Module,
    calibration: Calibration,
    *,
    forward_fn: ForwardFn = default_forward,
    names: Iterable[str] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Run calibration batches and set each static-activation layer's scale; returns ``{name: (scale, zp)}``.

    Scales are only written when every batch succeeded; on error the model keeps its previous state
    (and no hooks).
    """
    with calibration_hooks(model, names) as observers, torch.no_grad():
        if callable(calibration) and not isinstance(calibration, nn.Module | torch.Tensor):
            calibration(model)
        else:
            for batch in calibration:
                forward_fn(model, batch)
        results = {name: obs.compute() for name, obs in observers.items()}
    layers = quantized_modules(model)
    for name, (scale, zp) in results.items():
        layers[name].set_activation_qparams(scale, zp)
    return results


def dequantize_(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Undo quantization: put plain Linear/Conv2d modules (holding the original float weights) back."""
    layers = quantized_modules(model)
    chosen = list(layers) if names is None else list(names)
    for name in chosen:
        if name not in layers:
            raise ValueError(f"dequantize_: {name!r} is not a fake-quant module")
        set_module(model, name, layers[name].to_float())
    return chosen


@contextlib.contextmanager
def temporarily_quantized(
    model: nn.Module, name: str, spec: QuantSpec
) -> Iterator[QuantLinear | QuantConv2d]:
    """Quantize one layer for the block (a sensitivity probe); the original is always restored."""
    original = get_module(model, name)
    quantized = quantized_module_for(original, spec, name)
    set_module(model, name, quantized)
    try:
        yield quantized
    finally:
        set_module(model, name, original)


@torch.no_grad()
def fold_affine_(module: nn.Module, M: torch.Tensor, d: torch.Tensor | None = None) -> None:
    """Fold an output-side affine map into a layer: W' = M W, b' = M b + d (then re-round if fake-quant).

    ``M`` is ``[out, out]`` or a vector of ``out`` diagonal gains. Used by CSRC-style compensation, which must
    fold before rounding so the rounding sees the compensated weights.
    """
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise ValueError(
            f"fold_affine_: expected Linear/Conv2d (or their fake-quant versions), got {type(module)}"
        )
    w = module.weight
    out = w.shape[0]
    M = M.to(device=w.device, dtype=torch.float32)
    if M.shape not in ((out, out), (out,)):
        raise ValueError(f"fold_affine_: M must be [{out}, {out}] or [{out}], got {tuple(M.shape)}")
    check_finite(M, "fold_affine_ M")
    if d is not None:
        d = d.to(device=w.device, dtype=torch.float32)
        if d.shape != (out,):
            raise ValueError(f"fold_affine_: d must be [{out}], got {tuple(d.shape)}")
        check_finite(d, "fold_affine_ d")
    w2d = w.reshape(out, -1).float()
    new_w = (M.unsqueeze(1) * w2d) if M.ndim == 1 else M @ w2d
    w.copy_(new_w.reshape(w.shape).to(w.dtype))
    b = module.bias
    if b is not None:
        new_b = (M * b.float()) if M.ndim == 1 else M @ b.float()
        b.copy_((new_b if d is None else new_b + d).to(b.dtype))
    elif d is not None:
        module.bias = nn.Parameter(d.to(w.dtype).clone())
    if isinstance(module, QUANT_MODULE_TYPES):
        module.requantize()
