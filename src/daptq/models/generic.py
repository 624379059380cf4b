"""Any torch VLA through a few declarations: ``daptq.adapt(model, roles=..., objective=..., sample=...)``.

A user with their own network does not subclass daptq internals. They say which modules play which role
(glob or ``re:`` regex patterns over qualified module names), which Linears are the interface to the action
decoder, the decoder's training loss and a differentiable chunk sampler, and the action space; daptq builds a
checked ``VLAAdapter`` from that (``GenericAdapter``), and a closed-loop policy around it on request
(``GenericAdapter.policy``). Calibration data is a list of the batches the user's callables take (dicts of
tensors, the action chunk under ``"actions"``), or dataset-style batches passed through ``prepare``.

Quantizable modules are the model's ``nn.Linear`` and ``nn.Conv2d``. Each gets the role of the first pattern
(in the order given) that matches its name or the name of a module containing it; a module no pattern
matches is "other" (listed by ``unmatched()``; no method quantizes "other" unless its scope asks); a declared
interface Linear is "interface". A pattern
that matches nothing is an error, as is an interface or attention projection that is not an ``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from daptq.models.adapter import (
    CAPABILITIES,
    OBJECTIVE_KINDS,
    ROLES,
    ActionSpace,
    AttentionLayout,
    InterfaceModule,
    Observation,
    PolicyInfo,
    QuantizableModule,
    VLAAdapter,
    check_adapter,
    state_digest,
)
from daptq.models.policy import ChunkedPolicy
from daptq.quant.smoothing import SmoothingGroup

Batch = Mapping[str, Any]


def _matcher(pattern: str) -> Callable[[str], bool]:
    """``re:<regex>`` (full match) or a glob (``fnmatch``, case-sensitive)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a module pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"pattern {pattern!r}: not a valid regular expression ({e})") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``: a pattern naming a container covers what it contains."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _action_space(value: Any) -> ActionSpace:
    if isinstance(value, ActionSpace):
        return value
    if isinstance(value, Mapping):
        try:
            return ActionSpace(
                tuple(value["names"]),
                tuple(value["kinds"]),
                value.get("control", "delta-eef"),
                float(value.get("low", -1.0)),
                float(value.get("high", 1.0)),
            )
        except KeyError as e:
            raise ValueError(f"action_space: a mapping needs 'names' and 'kinds' (missing {e})") from None
    raise ValueError(
        "action_space must be an ActionSpace or a mapping with 'names' and 'kinds', got "
        f"{type(value).__name__}"
    )


def _to_tensors(batch: Batch) -> dict[str, Any]:
    """numpy arrays -> tensors (floats as float32); tensors, strings and lists of strings kept."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(value))
            out[key] = t.float() if t.is_floating_point() else t
        else:
            out[key] = value
    return out


class GenericAdapter(VLAAdapter):
    """A ``VLAAdapter`` built from declarations (see ``adapt``); checked with ``check_adapter`` once."""

    def __init__(
        self,
        model: nn.Module,
        roles: Mapping[str, str],
        objective: Callable[..., torch.Tensor],
        sample: Callable[..., torch.Tensor],
        action_space: ActionSpace | Mapping[str, Any],
        *,
        interface: Sequence[str | InterfaceModule] = (),
        interface_kind: str = "vector",
        objective_kind: str = "flow_matching",
        attention: Sequence[AttentionLayout | Mapping[str, Any]] = (),
        blocks: Mapping[str, str] | None = None,
        streams: Mapping[str, str] | None = None,
        smoothing: Sequence[SmoothingGroup] = (),
        condition: Callable[[Batch], torch.Tensor] | None = None,
        prepare: Callable[[Batch], Batch] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"adapt: model must be an nn.Module, got {type(model).__name__}")
        for what, fn in (("objective", objective), ("sample", sample)):
            if not callable(fn):
                raise ValueError(f"adapt: {what} must be callable, got {type(fn).__name__}")
        for what, fn in (("condition", condition), ("prepare", prepare)):
            if fn is not None and not callable(fn):
                raise ValueError(f"adapt: {what} must be callable or None, got {type(fn).__name__}")
        if objective_kind not in OBJECTIVE_KINDS:
            raise ValueError(
                f"adapt: objective_kind must be one of {list(OBJECTIVE_KINDS)}, got {objective_kind!r}"
            )
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size < 1):
            raise ValueError(f"adapt: chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.model = model
        self.action_space = _action_space(action_space)
        self.objective_kind = objective_kind  # type: ignore[assignment]
        self.chunk_size = chunk_size
        self._objective, self._sample, self._condition, self._prepare = objective, sample, condition, prepare
        named = dict(model.named_modules())
        self._interface = self._build_interface(interface, interface_kind, named)
        self._modules = self._build_modules(roles, blocks, streams, named)
        self._attention = self._build_attention(attention, named)
        self._smoothing = list(smoothing)
        for g in self._smoothing:
            if not isinstance(g, SmoothingGroup):
                raise ValueError(f"adapt: smoothing must hold SmoothingGroup objects, got {type(g).__name__}")
        caps = set()
        if self._attention:
            caps.add("attention")
        if self._smoothing:
            caps.add("smoothing")
        if condition is not None:
            caps.add("condition")
        self.capabilities = frozenset(c for c in CAPABILITIES if c in caps)
        check_adapter(self)

    # ---- declarations ------------------------------------------------------------------------------------
    def _build_interface(self, interface, kind, named) -> list[InterfaceModule]:
        if isinstance(interface, str):
            interface = [interface]
        out = []
        for item in interface:
            if isinstance(item, InterfaceModule):
                out.append(item)
                continue
            if item not in named:
                raise ValueError(f"adapt: interface {item!r} is not a module of the model")
            if not isinstance(named[item], nn.Linear):
                raise ValueError(
                    f"adapt: interface {item!r} must be an nn.Linear (CSRC folds into its weight and bias), "
                    f"got {type(named[item]).__name__}"
                )
            out.append(InterfaceModule(item, named[item], kind))  # type: ignore[arg-type]
        return out

    def _build_modules(self, roles, blocks, streams, named) -> list[QuantizableModule]:
        if not isinstance(roles, Mapping):
            raise ValueError(f"adapt: roles must be a mapping {{pattern: role}}, got {type(roles).__name__}")
        bad = {p: r for p, r in roles.items() if r not in ROLES}
        if bad:
            raise ValueError(f"adapt: unknown role(s) {bad}; roles are {list(ROLES)}")
        matchers = [(p, _matcher(p), r) for p, r in roles.items()]
        stream_matchers = [(p, _matcher(p), s) for p, s in (streams or {}).items()]
        block_rx = None
        if blocks is not None:
            block_rx = []
            for stack, rx in blocks.items():
                try:
                    compiled = re.compile(rx)
                except re.error as e:
                    raise ValueError(
                        f"adapt: blocks[{stack!r}] {rx!r} is not a regular expression ({e})"
                    ) from None
                if compiled.groups != 1:
                    raise ValueError(
                        f"adapt: blocks[{stack!r}] {rx!r} needs one group capturing the block index"
                    )
                block_rx.append((stack, compiled))
        interface_names = {i.name for i in self._interface}
        used: set[str] = set()
        used_streams: set[str] = set()
        out = []
        for name, module in named.items():
            if not isinstance(module, nn.Linear | nn.Conv2d) or not name:
                continue
            role = None
            for pattern, match, r in matchers:
                if any(match(p) for p in _prefixes(name)):
                    role = r if role is None else role
                    used.add(pattern)
            if name in interface_names:  # the declaration is more specific than a container's pattern
                role = "interface"
            elif role is None:
                role = "other"
            stream = None
            for pattern, match, s in stream_matchers:
                if any(match(p) for p in _prefixes(name)):
                    stream = s if stream is None else stream
                    used_streams.add(pattern)
            stack, block = self._place(name, block_rx, named)
            kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
            out.append(QuantizableModule(name, module, role, {"kind": kind}, block, stack, stream))  # type: ignore[arg-type]
        unused = [p for p in roles if p not in used]
        unused += [p for p in (streams or {}) if p not in used_streams]
        if unused:
            raise ValueError(
                f"adapt: pattern(s) {unused} match no Linear/Conv2d of the model; its quantizable modules "
                f"are {[m.name for m in out][:40]}"
            )
        return out

    @staticmethod
    def _place(name: str, block_rx, named) -> tuple[str | None, int | None]:
        """(stack, block index): from the ``blocks`` regexes, or else the outermost ModuleList holding it."""
        if block_rx is not None:
            for stack, rx in block_rx:
                m = rx.search(name)
                if m:
                    return stack, int(m.group(1))
            return None, None
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if isinstance(named.get(parent), nn.ModuleList) and parts[i].isdigit():
                return parent, int(parts[i])
        return None, None

    def _build_attention(self, attention, named) -> list[AttentionLayout]:
        out = []
        roles = {m.name: m for m in self._modules}
        for item in attention:
            if isinstance(item, Mapping):
                fields = dict(item)
                out_name = fields.get("out")
                placed = roles.get(out_name) if isinstance(out_name, str) else None
                if placed is None:
                    raise ValueError(
                        f"adapt: attention {fields.get('name')!r}: out {out_name!r} is not a Linear of "
                        "the model"
                    )
                fields.setdefault("role", placed.role)
                fields.setdefault("block", placed.block)
                fields.setdefault("stack", placed.stack)
                fields.setdefault("stream", placed.stream)
                try:
                    item = AttentionLayout(**fields)
                except TypeError as e:
                    raise ValueError(f"adapt: attention {fields.get('name')!r}: {e}") from None
            if not isinstance(item, AttentionLayout):
                raise ValueError(
                    f"adapt: attention must hold AttentionLayouts or mappings, got {type(item).__name__}"
                )
            out.append(item)
        return out

    # ---- the contract ------------------------------------------------------------------------------------
    def quantizable_modules(self) -> list[QuantizableModule]:
        # Resolved again on each call: a method may have swapped a module for its quantized version.
        return [dataclasses.replace(m, module=self.module(m.name)) for m in self._modules]

    def interface_modules(self) -> list[InterfaceModule]:
        return [dataclasses.replace(i, module=self.module(i.name)) for i in self._interface]

    def attention_layouts(self) -> list[AttentionLayout]:
        return list(self._attention)

    def smoothing_groups(self) -> list[SmoothingGroup]:
        return list(self._smoothing)

    def unmatched(self) -> list[str]:
        """Quantizable modules no role pattern matched (role "other")."""
        return [m.name for m in self._modules if m.role == "other"]

    def objective(
        self,
        batch: Batch,
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        loss = self._objective(batch, dim_weights=dim_weights, generator=generator)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"adapt: objective must return a scalar tensor, got {got}")
        return loss.reshape(())

    def sample(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        chunk = self._sample(batch, generator=generator)
        if not isinstance(chunk, torch.Tensor) or chunk.ndim != 3 or chunk.shape[-1] != self.action_space.dim:
            got = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise ValueError(f"adapt: sample must return a (B, K, {self.action_space.dim}) tensor, got {got}")
        return chunk

    def condition(self, batch: Batch) -> torch.Tensor:
        if self._condition is None:
            return super().condition(batch)
        return self._condition(batch)

    def calibration_batches(self, batches: Iterator[Batch]) -> Iterator[dict[str, Any]]:
        """Each batch through ``prepare`` (when given), numpy arrays as tensors."""
        for i, batch in enumerate(batches):
            if not isinstance(batch, Mapping):
                raise ValueError(f"calibration batch {i} is a {type(batch).__name__}, not a mapping")
            out = _to_tensors(batch)
            if self._prepare is not None:
                out = dict(self._prepare(out))
            yield out

    def describe(self) -> str:
        """One line per quantizable module: name, role, stack/block, stream."""
        lines = []
        for m in self._modules:
            place = "" if m.block is None else f" {m.stack}[{m.block}]"
            lines.append(f"{m.name}: {m.role}{place}{'' if m.stream is None else ' ' + m.stream}")
        return "\n".join(lines)

    def policy(
        self,
        n_action_steps: int = 1,
        observe: Callable[[Observation], Batch] | None = None,
        seed: int | None = None,
        image_size: int | None = None,
        config: Any = None,
        source_files: Sequence[str | os.PathLike] = (),
    ) -> GenericPolicy:
        """A closed-loop policy: ``observe`` turns one observation into a batch of one (default: arrays get a
        leading batch axis, a string becomes a list of one), ``prepare`` applies, and the first
        ``n_action_steps`` actions of each sampled chunk are executed. ``source_files``: the checkpoint
        files the weights were loaded from; a quantized directory saved without ``self_contained`` records
        their sha256 and refuses to load over changed ones."""
        return GenericPolicy(self, n_action_steps, observe, seed, image_size, config, source_files)


class GenericPolicy(ChunkedPolicy):
    """The closed-loop half of a generic adapter; ``policy.adapter`` is what ``quantize_policy`` takes."""

    def __init__(
        self,
        adapter: GenericAdapter,
        n_action_steps: int = 1,
        observe: Callable[[Observation], Batch] | None = None,
        seed: int | None = None,
        image_size: int | None = None,
        config: Any = None,
        source_files: Sequence[str | os.PathLike] = (),
    ) -> None:
        super().__init__(adapter.action_space, n_action_steps, seed)
        self._source_files = [Path(p) for p in source_files]
        missing = [str(p) for p in self._source_files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"GenericPolicy: source file(s) {missing} do not exist")
        self.adapter = adapter
        self.model = adapter.model
        self.observe = observe
        self.config = config
        self.chunk_size = adapter.chunk_size
        if image_size is not None:
            self.image_size = int(image_size)

    def source_files(self) -> list[Path]:
        """The checkpoint files the weights came from (``save_quantized_policy`` pins their sha256)."""
        if not self._source_files:
            raise ValueError(
                "this generic policy names no source files (adapter.policy(source_files=[...])); save it "
                "with self_contained=True instead"
            )
        return list(self._source_files)

    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        if self.observe is not None:
            batch = self.observe(observation)
        else:
            batch = {k: [v] if isinstance(v, str) else np.asarray(v)[None] for k, v in observation.items()}
        batch = next(self.adapter.calibration_batches(iter([batch])))
        with torch.no_grad():
            chunk = self.adapter.sample(batch, generator)
        return chunk[0].detach().cpu().numpy()

    def info(self) -> PolicyInfo:
        return PolicyInfo(
            digest=state_digest(self.model, self.config),
            image_size=getattr(self, "image_size", None),
            recipe=self.recorded_recipe(),
        )


def adapt(
    model: nn.Module,
    roles: Mapping[str, str],
    interface: Sequence[str | InterfaceModule] = (),
    objective: Callable[..., torch.Tensor] | None = None,
    sample: Callable[..., torch.Tensor] | None = None,
    action_space: ActionSpace | Mapping[str, Any] | None = None,
    attention: Sequence[AttentionLayout | Mapping[str, Any]] = (),
    blocks: Mapping[str, str] | None = None,
    **options: Any,
) -> GenericAdapter:
    """A ``VLAAdapter`` for any torch VLA from declarations.

    ``roles``: ``{pattern: role}`` over qualified module names (globs, or ``re:<regex>``); a pattern naming a
    container covers its submodules; the first matching pattern wins. ``interface``: names of the Linears
    through which the vision-language representation enters the action decoder. ``objective(batch,
    dim_weights=None, generator=None)`` -> scalar loss; ``sample(batch, generator=None)`` -> differentiable
    (B, K, action_dim) chunk. ``attention``: AttentionLayouts or mappings of their fields (role, block, stack
    and stream default to the output projection's). ``blocks``: ``{stack: regex with one group capturing the
    block index}``; by default a module inside an ``nn.ModuleList`` is in block i of that list. Options:
    ``interface_kind``, ``objective_kind`` (default "flow_matching"), ``streams`` ({pattern: stream}),
    ``smoothing`` (SmoothingGroups), ``condition`` (batch -> z), ``prepare`` (dataset-style batch -> the
    callables' batch), ``chunk_size``.
    """
    missing = [
        n
        for n, v in (("objective", objective), ("sample", sample), ("action_space", action_space))
        if v is None
    ]
    if missing:
        raise ValueError(f"adapt: {', '.join(missing)} must be given")
    return GenericAdapter(
        model,
        roles,
        objective,  # type: ignore[arg-type]
        sample,  # type: ignore[arg-type]
        action_space,  # type: ignore[arg-type]
        interface=interface,
        attention=attention,
        blocks=blocks,
        **options,
    )


_USER_MODULES: dict[str, Any] = {}


def load_torch_spec(spec: str) -> ChunkedPolicy:
    """``torch:<module or file.py>:<factory>[?key=value&...]``: the policy your own factory builds.

    ``<module>`` is a dotted module name on ``sys.path`` or a path to a ``.py`` file; ``<factory>(**options)``
    (query values as strings) returns a ``GenericAdapter`` (wrapped with ``.policy()``) or a policy with an
    ``.adapter``. This runs your code, as ``python your_file.py`` would; daptq downloads nothing."""
    import importlib
    import importlib.util
    import sys
    from urllib.parse import parse_qsl

    body = spec.removeprefix("torch:")
    body, _, query = body.partition("?")
    target, _, factory_name = body.rpartition(":")
    if not target or not factory_name.isidentifier():
        raise ValueError(f"model spec {spec!r}: expected torch:<module or file.py>:<factory>[?key=value&...]")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model spec {spec!r}: {path} does not exist")
        module = _USER_MODULES.get(str(path))
        if module is None:
            name = "daptq_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                sys.modules.pop(name, None)
                raise
            _USER_MODULES[str(path)] = module
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"model spec {spec!r}: cannot import {target!r} ({e})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"model spec {spec!r}: {target} has no callable {factory_name!r}")
    built = factory(**dict(parse_qsl(query, strict_parsing=bool(query))))
    if isinstance(built, GenericAdapter):
        built = built.policy()
    if not isinstance(built, ChunkedPolicy) or not isinstance(getattr(built, "adapter", None), VLAAdapter):
        raise ValueError(
            f"model spec {spec!r}: {factory_name}() returned a {type(built).__name__}; it must return "
            "daptq.adapt(...) or a policy with an .adapter (adapter.policy(...))"
        )
    return built


def calibration_set(batches: Sequence[Batch], provenance: Mapping[str, Any] | None = None):
    """The ``CalibrationSet`` ``quantize_policy`` takes, from a list of the batches the callables take (dicts
    of tensors or arrays, the action chunk under ``"actions"``); ``provenance`` says where they came from."""
    from daptq.data.calibration import CalibrationSet

    if isinstance(batches, Mapping) or not isinstance(batches, Sequence):
        raise ValueError(f"calibration batches must be a list of dicts, got {type(batches).__name__}")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "actions" not in batch:
            has = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"calibration batch {i} needs the action chunk under 'actions' (has {has})")
    return CalibrationSet(list(batches), dict(provenance or {"source": "user batches"}))


__all__ = ["GenericAdapter", "GenericPolicy", "adapt", "calibration_set", "load_torch_spec"]
