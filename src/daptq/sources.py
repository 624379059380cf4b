"""Policy sources: a model spec string -> a policy, so the CLI, evaluation workers and tests name models the
same way (specs are plain strings: a worker process rebuilds the same policy without pickling a model).

Specs:
- ``ref:<name>``: a reference VLA bundled with daptq (``ref:metaworld-mt10``, ``ref:libero-smolvla``);
- ``libero-smolvla:<dir>[?n_action_steps=N]``: a LIBERO reference VLA checkpoint directory (SmolVLA's
  layout, as ``daptq train --arch smolvla`` writes it);
- ``toy`` / ``toy:<key>=<value>,...``: a tiny state-only policy for tests and smoke runs;
- ``onnx:<dir>``: a policy exported by ``daptq export`` running on ONNX Runtime;
- ``cogact:<run dir>[?key=value&...]``: a CogACT run directory in the original layout;
- ``lerobot:<dir>[?key=value&...]``: a lerobot pi0 / pi05 / smolvla checkpoint (family from config.json);
- ``openvla-oft:<dir>[?key=value&...]``: an OpenVLA-OFT Hugging Face checkpoint directory (L1 head);
- ``gr00t:<dir>[?key=value&...]``: a GR00T N1.x checkpoint directory;
- ``torch:<module or file.py>:<factory>[?key=value&...]``: your own model, declared with ``daptq.adapt``;
- a directory written by ``daptq quantize`` (no prefix).

Each source registers its prefix: ``register_source("mine", loader)`` with ``loader(spec, **options) ->
Policy`` (it gets the whole spec, prefix included, and those ``load_policy`` options its signature names).
The built-in sources are a fixed table of ``module:function`` names imported on first use, so importing this
module imports no model code and has no side effects, and no package has to import the packages that provide
sources (``models/`` no longer imports ``deploy/`` or ``methods/``): every layer may resolve a spec.
"""

from __future__ import annotations

import importlib
import inspect
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

Loader = Callable[..., Any]

# prefix -> "module:function"; imported when a spec with that prefix is first resolved.
BUILTIN_SOURCES: dict[str, str] = {
    "ref": "daptq.models.reference:load_reference",
    "toy": "daptq.models.toy:toy_policy_from_spec",
    "onnx": "daptq.deploy.runtime:load_onnx_source",
    "cogact": "daptq.models.cogact.policy:load_cogact_spec",
    "torch": "daptq.models.generic:load_torch_spec",
    "lerobot": "daptq.models.lerobot_vla.policy:load_lerobot_spec",
    "openvla-oft": "daptq.models.openvla_oft.policy:load_oft_spec",
    "gr00t": "daptq.models.gr00t.policy:load_gr00t_spec",
    "libero-smolvla": "daptq.models.libero_smolvla:load_spec",
}
DIRECTORY_SOURCE = "daptq.models.quantized:load_quantized_policy"  # a spec without a prefix that is a dir
_PREFIX = re.compile(r"^([a-z][a-z0-9_-]*):")

_registered: dict[str, Loader] = {}
_lock = threading.Lock()


def register_source(prefix: str, loader: Loader, *, replace: bool = False) -> None:
    """Make ``<prefix>:...`` specs resolve through ``loader(spec, **options)``. Registering a prefix twice
    (built-ins included) is an error unless ``replace``."""
    if not isinstance(prefix, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", prefix):
        raise ValueError(f"source prefix must be lowercase letters, digits, '-' or '_', got {prefix!r}")
    if not callable(loader):
        raise TypeError(f"register_source({prefix!r}): loader must be callable, got {type(loader).__name__}")
    with _lock:
        taken = prefix in _registered or prefix in BUILTIN_SOURCES
        if taken and not replace:
            raise ValueError(f"source prefix {prefix!r} is already registered (replace=True overrides it)")
        _registered[prefix] = loader


def available_sources() -> list[str]:
    """Every prefix a spec may start with, sorted."""
    return sorted(set(BUILTIN_SOURCES) | set(_registered))


def _import(target: str) -> Loader:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"built-in policy source {target!r} cannot be imported: {e}") from e


def source_loader(prefix: str) -> Loader:
    """The loader of a registered prefix (a built-in's module is imported here, on first use)."""
    with _lock:
        loader = _registered.get(prefix)
    if loader is not None:
        return loader
    if prefix not in BUILTIN_SOURCES:
        raise ValueError(f"unknown model source {prefix!r}; registered: {', '.join(available_sources())}")
    loader = _import(BUILTIN_SOURCES[prefix])
    with _lock:
        return _registered.setdefault(prefix, loader)


def _call(loader: Loader, spec: str, options: dict[str, Any]) -> Any:
    """``loader(spec, **options)`` with only the options its signature accepts."""
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):
        return loader(spec)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return loader(spec, **options)
    return loader(spec, **{k: v for k, v in options.items() if k in params})


def load_policy(spec: str, **options: Any) -> Any:
    """Build the policy ``spec`` names.

    ``options`` go to the sources that take them (``onnx_threads``: intra-op threads of an ``onnx:`` policy's
    ONNX Runtime sessions). ValueError for an unknown prefix (listing the registered ones) or a malformed
    spec; FileNotFoundError when nothing is at the path.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    m = _PREFIX.match(spec)
    prefix = m.group(1) if m else (spec if spec in available_sources() else None)
    if prefix is not None and prefix in available_sources():
        return _call(source_loader(prefix), spec, options)
    path = Path(spec)
    if not path.exists():
        from daptq.atomic import recover_directory

        recover_directory(path)  # a save killed while swapping directories: its previous version is put back
    if path.is_dir():
        return _call(_import(DIRECTORY_SOURCE), spec, options)
    if m is not None and len(m.group(1)) > 1:  # "C:" and the like stay paths
        raise ValueError(
            f"model spec {spec!r}: unknown source {m.group(1)!r}; "
            f"registered: {', '.join(available_sources())}"
        )
    from daptq.atomic import describe_leftovers

    raise FileNotFoundError(
        f"model spec {spec!r} is neither '<source>:...' (sources: {', '.join(available_sources())}) nor an "
        f"existing directory written by `daptq quantize`{describe_leftovers(path)}"
    )


__all__ = ["BUILTIN_SOURCES", "available_sources", "load_policy", "register_source", "source_loader"]
