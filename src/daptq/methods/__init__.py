"""Quantization methods behind one interface (RTN, SmoothQuant, GPTQ, AWQ, QuantVLA, QVLA, DA-PTQ).

One entry point::

    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.models.registry import load_policy
    from daptq.quant import QuantSpec, WeightSpec

    policy = load_policy("toy")
    record = quantize_policy(policy, RTNConfig(spec=QuantSpec(WeightSpec(4)), scope=...))

A registry maps each config type to its method (``register_method``), so adding a method touches one file;
see ``daptq.methods.base`` for the lifecycle and a runnable example.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import replace
from typing import Any

import torch

from daptq.data.calibration import CalibrationSet
from daptq.methods.base import HooksMixin, Method, MethodConfig, forward_batch
from daptq.methods.record import ModuleRecord, QuantRecord
from daptq.methods.registered import hold_registered, release_registered
from daptq.methods.scope import PlannedModule, Scope, ScopePlan, resolve_scope
from daptq.models.adapter import VLAAdapter, check_adapter
from daptq.models.policy import ChunkedPolicy
from daptq.quant.api import restored_on_failure

_REGISTRY: dict[str, tuple[type[MethodConfig], type[Method]]] = {}
# Modules whose import registers the built-in methods (imported lazily by the lookups below).
BUILTIN_METHOD_MODULES = (
    "daptq.methods.rtn",
    "daptq.methods.smoothquant",
    "daptq.methods.gptq",
    "daptq.methods.awq",
    "daptq.methods.quantvla",
    "daptq.methods.qvla",
    "daptq.methods.daptq",
)


def register_method(config_type: type[MethodConfig], name: str | None = None):
    """Class decorator: ``@register_method(MyConfig, name="my")`` maps the config type to the method."""

    def decorate(method_cls: type[Method]) -> type[Method]:
        key = name or method_cls.__name__.lower()
        if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)):
            raise TypeError(f"register_method: {config_type!r} is not a MethodConfig subclass")
        if not issubclass(method_cls, Method):
            raise TypeError(f"register_method: {method_cls!r} is not a Method subclass")
        existing = _REGISTRY.get(key)
        if existing is not None and existing != (config_type, method_cls):
            raise ValueError(f"method {key!r} is already registered ({existing[1].__name__})")
        for other, (cfg, _) in _REGISTRY.items():
            if cfg is config_type and other != key:
                raise ValueError(f"{config_type.__name__} is already registered for method {other!r}")
        config_type.method_name = key
        method_cls.config_type = config_type
        method_cls.name = key
        _REGISTRY[key] = (config_type, method_cls)
        return method_cls

    return decorate


def _load_builtins() -> None:
    for module in BUILTIN_METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the method exists but something it imports is missing: say so
                raise


def available_methods() -> dict[str, type[MethodConfig]]:
    """``{name: config type}`` of every registered method, sorted by name."""
    _load_builtins()
    return {k: _REGISTRY[k][0] for k in sorted(_REGISTRY)}


def get_method(config_or_name: MethodConfig | str) -> Method | type[Method]:
    """The method object for a config (``get_method(cfg)``), or the method class for a name."""
    _load_builtins()
    if isinstance(config_or_name, str):
        if config_or_name not in _REGISTRY:
            raise ValueError(f"unknown method {config_or_name!r}; available: {sorted(_REGISTRY)}")
        return _REGISTRY[config_or_name][1]
    if not isinstance(config_or_name, MethodConfig):
        raise ValueError(f"expected a MethodConfig or a method name, got {type(config_or_name).__name__}")
    for cfg_type, method_cls in _REGISTRY.values():
        if type(config_or_name) is cfg_type:
            return method_cls(config_or_name)
    raise ValueError(f"{type(config_or_name).__name__} is not registered; available: {sorted(_REGISTRY)}")


def config_type_for(name: str) -> type[MethodConfig]:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name][0]


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """A config from a dict/YAML mapping naming its method (``method: rtn``)."""
    if not isinstance(d, dict) or not isinstance(d.get("method"), str):
        raise ValueError("a method config must be a mapping with a 'method' name")
    return config_type_for(d["method"]).from_dict(d)


def as_adapter(policy_or_adapter: VLAAdapter | ChunkedPolicy) -> VLAAdapter:
    """The checked ``VLAAdapter`` of a policy (``policy.adapter``), or the adapter itself."""
    if isinstance(policy_or_adapter, VLAAdapter):
        return check_adapter(policy_or_adapter)
    adapter = policy_or_adapter.adapter if isinstance(policy_or_adapter, ChunkedPolicy) else None
    if adapter is None:
        raise ValueError(
            f"{type(policy_or_adapter).__name__} is neither a VLAAdapter nor a policy with an adapter "
            "(daptq.models.policy.ChunkedPolicy.adapter); methods need an adapter"
        )
    return check_adapter(adapter)


def quantize_policy(
    policy: VLAAdapter | ChunkedPolicy,
    config: MethodConfig,
    calibration: CalibrationSet | None = None,
    *,
    base_model: dict[str, Any] | None = None,
) -> QuantRecord:
    """Quantize ``policy`` (a policy with an adapter, or a ``VLAAdapter``) in place with the method ``config``
    names and return the record of what it did.

    ``calibration`` is required by methods that observe data; it is checked first (empty, NaN, another action
    space are errors). ``base_model`` ({"spec": ..., "digest": ...}) is copied into the record. On any error
    the model is left exactly as it was and no hooks remain.
    """
    if not isinstance(config, MethodConfig):  # a name: get_method would give a class, and fail later
        raise ValueError(
            f"quantize_policy: config must be a method config such as RTNConfig(...), got "
            f"{type(config).__name__} {config!r}; for a method's defaults by name use config_type_for(name)()"
        )
    adapter = as_adapter(policy)
    method = get_method(config)
    if method.requires_calibration():
        if calibration is None:
            raise ValueError(f"method {method.name!r} needs calibration data (a CalibrationSet)")
    if calibration is not None:
        if not isinstance(calibration, CalibrationSet):
            raise ValueError(f"calibration must be a CalibrationSet, got {type(calibration).__name__}")
        calibration.check(adapter.action_space)
    from daptq.methods.rotation import rotate_for_method
    from daptq.methods.sequential import peak_rss_bytes, reset_peak_rss

    timings: dict[str, float] = {}
    with restored_on_failure(adapter.model):
        reset_peak_rss()
        t0 = time.perf_counter()
        method.prepare(adapter)
        rotate_for_method(method, adapter)  # the config's rotation option (daptq.methods.rotation)
        held = hold_registered(method, adapter)  # registered module types: RTN after the method (recorded)
        timings["prepare_s"] = time.perf_counter() - t0
        timings["prepare_peak_rss_mb"] = peak_rss_bytes() / 2**20
        reset_peak_rss()
        t0 = time.perf_counter()
        batches = [] if calibration is None else list(adapter.calibration_batches(iter(calibration.batches)))
        try:
            method.calibrate(adapter, batches)
        finally:
            method.remove_hooks()
        timings["calibrate_s"] = time.perf_counter() - t0
        timings["calibrate_peak_rss_mb"] = peak_rss_bytes() / 2**20
        reset_peak_rss()
        t0 = time.perf_counter()
        try:
            method.apply(adapter)
        finally:
            method.remove_hooks()
        release_registered(method, adapter, held)
        timings["apply_s"] = time.perf_counter() - t0
        timings["apply_peak_rss_mb"] = peak_rss_bytes() / 2**20
    if isinstance(policy, ChunkedPolicy):
        policy.invalidate_caches()
    record = method.record()
    provenance = (
        None if calibration is None else {**calibration.provenance, "samples": calibration.num_samples}
    )
    return replace(
        record,
        calibration=provenance,
        base_model=dict(base_model or {}),
        timings={**record.timings, **timings},
        versions={"torch": torch.__version__, **_daptq_version()},
    )


def _daptq_version() -> dict[str, str]:
    try:
        from importlib.metadata import version

        return {"daptq": version("daptq")}
    except Exception:  # noqa: BLE001 (a source checkout without metadata)
        return {}


__all__ = [
    "CalibrationSet",
    "HooksMixin",
    "Method",
    "MethodConfig",
    "ModuleRecord",
    "PlannedModule",
    "QuantRecord",
    "Scope",
    "ScopePlan",
    "as_adapter",
    "available_methods",
    "config_from_dict",
    "config_type_for",
    "forward_batch",
    "get_method",
    "quantize_policy",
    "register_method",
    "resolve_scope",
    "restored_on_failure",
]
