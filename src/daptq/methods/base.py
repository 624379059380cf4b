"""The method interface: a validated, versioned config plus an algorithm object with an explicit lifecycle.

``quantize_policy`` drives every method the same way::

    method.prepare(adapter)            # resolve the scope into a per-module plan; no weights change
    method.calibrate(adapter, batches) # observe (own hooks via HooksMixin, removed also on error)
    method.apply(adapter)              # round, fold, compensate: the model changes here
    method.record()                    # -> QuantRecord of what was decided

Adding a method touches one file (runnable)::

    from dataclasses import dataclass
    from daptq.methods import Method, MethodConfig, register_method
    from daptq.quant import quantize_

    @dataclass(frozen=True)
    class HalfRTNConfig(MethodConfig):
        VERSION = 1
        shrink: float = 0.5          # strict types: "0.5" or True are rejected with a clear error

        def __post_init__(self):
            super().__post_init__()  # type checks every field first
            if not 0 < self.shrink <= 1:
                raise ValueError(f"shrink must be in (0, 1], got {self.shrink}")

    @register_method(HalfRTNConfig, name="half_rtn")
    class HalfRTN(Method):
        def apply(self, adapter):
            quantize_(adapter.model, self.plan.specs)
            self.decisions["shrink"] = self.config.shrink

Configs round-trip through ``to_dict`` / ``from_dict`` / ``to_yaml`` / ``from_yaml`` (with the method name and
``VERSION``), so a YAML file fully describes a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import yaml
from torch import nn

from daptq.methods.record import ModuleRecord, QuantRecord
from daptq.methods.scope import Scope, ScopePlan, resolve_scope
from daptq.models.adapter import VLAAdapter
from daptq.quant.spec import QuantSpec, w4a8

CONFIG_FORMAT = "daptq-method-config"


# ---- strict field types ----------------------------------------------------------------------------------
def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it has type ``hint`` (ints accepted and converted for floats, lists for tuples), else a
    ValueError naming ``where``. No truthiness: ``"false"`` is not a bool, ``4.0`` is not an int."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in typing.get_args(hint)):
            raise ValueError(f"{where} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return check_value(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where} must be {_type_name(hint)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {type(value).__name__}: {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(
            check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value, strict=True))
        )
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(hint, type):
        if not isinstance(value, hint):
            raise ValueError(f"{where} must be a {hint.__name__}, got {type(value).__name__}: {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {hint!r} in a MethodConfig")


def _from_jsonish(value: Any, hint: Any) -> Any:
    """Build nested config objects (QuantSpec, Scope, ...) from mappings in a dict/YAML config."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and hasattr(arg, "from_dict") and isinstance(value, Mapping):
                return arg.from_dict(value)
        return value
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonish(v, args[0]) for v in value)
        return value
    if isinstance(hint, type) and hasattr(hint, "from_dict") and isinstance(value, Mapping):
        return hint.from_dict(value)
    return value


def _to_jsonish(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_to_jsonish(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_jsonish(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: the base spec and the scope, strictly typed, versioned.

    ``spec`` is the spec every in-scope module gets unless a scope rule says otherwise (default: the paper's
    W4A8, group 128, resolved per layer by ``scope.group_fallback``). Subclasses add their own fields and set
    ``VERSION``; ``__post_init__`` checks every field against its annotation.
    """

    VERSION: ClassVar[int] = 1
    method_name: ClassVar[str] = ""  # set by register_method

    spec: QuantSpec = field(default_factory=w4a8)
    scope: Scope = field(default_factory=Scope)

    @classmethod
    def default_symmetric_range(cls, bits: int) -> str:
        """The symmetric grid convention (``WeightSpec.symmetric_range``) this method uses at ``bits`` when a
        user gives only bit widths. Methods override it with a measured choice; the base keeps the
        historical "restricted" grid."""
        return "restricted"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = check_value(getattr(self, f.name), hints[f.name], f"{type(self).__name__}.{f.name}")
            object.__setattr__(self, f.name, value)

    # serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _to_jsonish(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"format": CONFIG_FORMAT, "method": self.method_name, "version": self.VERSION, **body}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodConfig:
        """Inverse of ``to_dict``; ``method`` and ``version`` are checked when present."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__}.from_dict: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        d.pop("format", None)
        method = d.pop("method", cls.method_name)
        if method != cls.method_name:
            raise ValueError(f"{cls.__name__}: config is for method {method!r}, not {cls.method_name!r}")
        version = d.pop("version", cls.VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"{cls.__name__}: config version must be an integer, got {version!r}")
        if version != cls.VERSION:
            raise ValueError(f"{cls.__name__}: config version {version!r} unsupported (reads {cls.VERSION})")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**{k: _from_jsonish(v, hints[k]) for k, v in d.items()})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MethodConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"method config YAML does not parse: {e}") from None
        return cls.from_dict(data)


# ---- hooks ------------------------------------------------------------------------------------------------
class HooksMixin:
    """Owns every hook handle a method registers, so ``remove_hooks()`` always leaves the model clean."""

    def _handles(self) -> list[Any]:
        if not hasattr(self, "_hook_handles"):
            self._hook_handles: list[Any] = []
        return self._hook_handles

    def register_forward_pre_hook(self, module: nn.Module, fn: Callable[..., Any]) -> Any:
        handle = module.register_forward_pre_hook(fn)
        self._handles().append(handle)
        return handle

    def register_forward_hook(
        self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False
    ) -> Any:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._handles().append(handle)
        return handle

    def remove_hooks(self) -> None:
        handles = self._handles()
        while handles:
            handles.pop().remove()

    @property
    def hook_count(self) -> int:
        return len(self._handles())


def forward_batch(adapter: VLAAdapter, batch: Mapping[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Run the whole policy on one model-input batch (every denoising step), with seeded sampling noise, so
    every module sees the activations it sees in closed loop. Methods use this to drive their hooks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return adapter.predict_chunk(batch, generator=generator)


# ---- the method -------------------------------------------------------------------------------------------
class Method(HooksMixin, ABC):
    """One algorithm's lifecycle. Subclasses implement ``apply`` and, if they observe data, ``calibrate``;
    they put what they decided into ``self.decisions`` (JSON values or tensors)."""

    config_type: ClassVar[type[MethodConfig]] = MethodConfig
    name: ClassVar[str] = ""

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_type):
            raise ValueError(
                f"{type(self).__name__} takes a {self.config_type.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.plan: ScopePlan | None = None
        self.decisions: dict[str, Any] = {}

    def requires_calibration(self) -> bool:
        """True when ``calibrate`` needs batches (the default for everything but data-free methods)."""
        return True

    def prepare(self, adapter: VLAAdapter) -> None:
        """Resolve the scope against the adapter's modules into ``self.plan``; the model is not changed."""
        self.plan = resolve_scope(
            adapter.model, adapter.quantizable_modules(), self.config.scope, self.config.spec
        )

    def calibrate(self, adapter: VLAAdapter, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:  # noqa: B027
        """Observe the model on calibration batches (model-input batches; see ``forward_batch``).

        Register hooks with ``self.register_forward_hook`` / ``register_forward_pre_hook``: the driver calls
        ``remove_hooks()`` in a ``finally`` after this returns or raises. Default: observe nothing."""

    @abstractmethod
    def apply(self, adapter: VLAAdapter) -> None:
        """Change the model: swap in fake-quant layers, round, fold, compensate (per ``self.plan``)."""

    # ---- block-by-block lifecycle (daptq.methods.sequential) ----------------------------------------------
    def supports_sequential(self) -> bool:
        """True when the method implements ``calibrate_modules`` / ``apply_modules``."""
        return type(self).calibrate_modules is not Method.calibrate_modules

    def sequential_propagation(self) -> str:
        """What the next block is calibrated on: "float" outputs (as the whole-model pass) or "quantized"."""
        return "float"

    def calibrate_modules(self, adapter: VLAAdapter, names: Sequence[str], run: Callable[[], None]) -> None:
        """Observe only the modules ``names`` while ``run()`` drives the forwards (the whole policy, or one
        block replaying its recorded inputs); accumulates across calls. Hooks as in ``calibrate``."""
        raise NotImplementedError(f"{type(self).__name__} has no per-block calibration")

    def apply_modules(self, adapter: VLAAdapter, names: Sequence[str]) -> None:
        """Round the modules ``names`` from what ``calibrate_modules`` observed of them."""
        raise NotImplementedError(f"{type(self).__name__} has no per-block calibration")

    def on_block_end(self, adapter: VLAAdapter, key: tuple[str, int]) -> None:  # noqa: B027
        """The per-block event: block ``key`` is rounded (free per-block state here). Default: nothing."""

    def sequential_begin(self, adapter: VLAAdapter, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:  # noqa: B027
        """Before any block is observed: method-wide statistics (drift weights, gradient sensitivities) from
        the calibration batches, on the float model. Default: nothing."""

    def sequential_end(self, adapter: VLAAdapter, run: Callable[[], None]) -> None:  # noqa: B027
        """After every block is rounded: corrections measured on the quantized policy (``run()`` drives it
        on the calibration batches), e.g. QuantVLA's ATM/OHB, DA-PTQ's CSRC. Default: nothing."""

    def sequential_needs_whole_model(self) -> bool:
        """True when the method cannot run with a streamed block loader (its model must stay in memory).
        Default: False (with a loader, ``sequential_end`` sees each rounded block reloaded as rounded)."""
        return False

    def sequential_resident(self, adapter: VLAAdapter) -> Sequence[str]:
        """Modules whose blocks a streamed loader keeps loaded through ``sequential_begin`` (e.g. layers it
        differentiates: a backward needs their weights after the forward). Default: none."""
        return ()

    def record(self) -> QuantRecord:
        """What was decided; ``quantize_policy`` adds calibration provenance, the base model and timings."""
        if self.plan is None:
            raise RuntimeError(f"{type(self).__name__}.record(): prepare() has not run")
        modules = {
            n: ModuleRecord(
                m.role,
                m.kind,
                m.weight_shape,
                m.spec,
                m.requested if m.note else None,
                m.note,
                m.block,
                m.stack,
                m.stream,
            )
            for n, m in self.plan.modules.items()
        }
        decisions = {"kept_float": dict(self.plan.kept_float), **self.decisions}
        return QuantRecord(self.name, self.config.to_dict(), modules, decisions)


def require_plan(method: Method) -> ScopePlan:
    if method.plan is None:
        raise RuntimeError(f"{type(method).__name__}: prepare() must run before calibrate()/apply()")
    return method.plan


def module_of(adapter: VLAAdapter, name: str) -> nn.Module:
    return adapter.module(name)


__all__ = [
    "HooksMixin",
    "Method",
    "MethodConfig",
    "QuantSpec",
    "check_value",
    "forward_batch",
    "module_of",
    "require_plan",
]
