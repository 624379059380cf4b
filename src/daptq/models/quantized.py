"""A quantized policy on disk: a directory any process (evaluation workers included) rebuilds and verifies.

Layout (format_version 2)::

    DIR/config.json                 the base model: its spec, the digest of its weights, and for a base
                                    daptq does not bundle the sha256 of its checkpoint files; action space
    DIR/model.safetensors           packed codes, scales and every tensor that differs from the base model
                                    (every tensor with ``self_contained``)
    DIR/quantization_config.json    the QuantRecord, the per-module layout, a sha256 of the two other files
                                    and of its own content (``content_sha256``); written last, and the
                                    marker that tells daptq the directory is its own

Tensors equal to the base model's are not copied unless the save is self-contained. The whole directory is
written beside the target and swapped in (``daptq.atomic.write_directory``): an interrupted save leaves the
old directory or the new one, never a mix, and the leftovers of a killed save are cleaned by the next save or
load. A save replaces only an empty directory or one daptq wrote (never a source, never anything else).
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from daptq.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    describe_leftovers,
    recover_directory,
    write_directory,
)
from daptq.integrity import check_daptq_directory, check_file_digests, check_signed, sha256_file, signed
from daptq.models.adapter import state_digest
from daptq.versioned_json import read_versioned_json

POLICY_FORMAT = "daptq-quantized-policy"
POLICY_FORMAT_VERSION = 2  # 2: content_sha256 of quantization_config.json, base files, self_contained
BASE_CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
QUANT_CONFIG_FILE = "quantization_config.json"
DIRECTORY_FILES = (BASE_CONFIG_FILE, TENSORS_FILE, QUANT_CONFIG_FILE)
BUNDLED_PREFIXES = ("ref:", "toy:")  # bases daptq ships: rebuilt from the spec alone, identified by digest
MAX_BASE_DEPTH = 4  # a quantized directory's base may itself be a directory, this many levels deep

__all__ = [
    "POLICY_FORMAT",
    "check_policy_out",
    "is_quantized_policy_dir",
    "load_quantized_policy",
    "model_digest",
    "read_quantized_policy_config",
    "save_quantized_policy",
    "sha256_file",
]

_LOADING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("daptq_loading", default=())


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every state tensor (name, dtype, shape, bytes) in name order: identifies base weights."""
    return state_digest(model, None)


def is_bundled(spec: str) -> bool:
    return spec == "toy" or spec.startswith(BUNDLED_PREFIXES)


def is_quantized_policy_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``quantization_config.json`` of this format (checked, not just present)."""
    try:
        content = json.loads(Path(path, QUANT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(content, dict) and content.get("format") == POLICY_FORMAT


def spec_path(spec: str) -> Path | None:
    """The local file or directory a model spec reads (``DIR``, ``onnx:DIR``, ``cogact:PATH``), if any."""
    if not isinstance(spec, str) or not spec or is_bundled(spec):
        return None
    body = spec.partition(":")[2]
    for candidate in (spec, body, body.partition("?")[0]):  # DIR, cogact:PATH, lerobot:PATH?key=value
        if candidate and os.path.lexists(candidate):
            return Path(candidate)
    return None


def check_not_a_source(target: str | os.PathLike, sources: Iterable[str], what: str) -> None:
    """Refuse an output that is, holds, or lies inside one of the model specs being read."""
    out = Path(target).resolve()
    for spec in sources:
        src = spec_path(spec)
        if src is None:
            continue
        src = src.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise ValueError(
                f"{target} is the model being read ({spec}); refusing to replace a source with {what}: "
                "choose another --out"
            )


def check_policy_out(directory: str | os.PathLike, sources: Iterable[str] = ()) -> None:
    """Raise unless ``directory`` may receive a quantized policy: absent, empty, or a quantized policy
    directory daptq wrote (marker checked, no foreign files), and none of the ``sources`` specs."""
    directory = Path(directory)
    recover_directory(directory)
    check_not_a_source(directory, sources, "its quantized policy")
    if os.path.lexists(directory):
        check_daptq_directory(
            directory,
            QUANT_CONFIG_FILE,
            POLICY_FORMAT,
            DIRECTORY_FILES,
            "a quantized policy directory",
            "; only an empty directory or one written by `daptq quantize` is replaced",
        )


# ---- bases daptq does not bundle ------------------------------------------------------------------------
def base_source_files(spec: str, policy: Any = None) -> dict[str, Any] | None:
    """``{"root": ..., "files": {relative path: sha256}}`` of the files a base model is loaded from, or
    None for a base daptq bundles (rebuilt from its spec, identified by its weights' digest).

    Where the files come from, first that answers: the policy's ``source_files()`` (a family that knows its
    checkpoint layout lists exactly its files), else the path the spec names (``cogact:PATH``, ``DIR``):
    one file, or every regular file under a directory (hidden ones excluded)."""
    if is_bundled(spec):
        return None
    listed = getattr(policy, "source_files", None)
    paths: list[Path] | None = None
    root: Path | None = None
    if callable(listed):
        paths = [Path(p) for p in listed()]
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths])) if paths else None
    else:
        src = spec_path(spec)
        if src is not None:
            src = src.resolve()
            if src.is_file():
                root, paths = src.parent, [src]
            elif src.is_dir():
                root = src
                paths = sorted(
                    p
                    for p in src.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
                )
    if not paths or root is None:
        raise ValueError(
            f"cannot identify the checkpoint files of base model {spec!r} (its policy lists none and the "
            "spec names no local path); save with self_contained=True (CLI: --self-contained)"
        )
    files = {str(p.resolve().relative_to(root)): sha256_file(p) for p in paths}
    return {"root": str(root), "files": files}


# ---- bases that run code --------------------------------------------------------------------------------
CODE_PREFIXES = ("torch:",)  # such a spec imports and calls the user's Python code
TRUST_FORMAT = "daptq-trusted-base-code"


def runs_code(spec: str) -> bool:
    return spec.startswith(CODE_PREFIXES)


def _trust_path() -> Path:
    """``$DAPTQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/daptq``, else ``~/.cache/daptq``: this user's list of
    code-running base specs."""
    if os.environ.get("DAPTQ_CACHE_DIR"):
        return Path(os.environ["DAPTQ_CACHE_DIR"]) / "trusted-base-code.json"
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "daptq" / "trusted-base-code.json"
    )


def _code_key(spec: str) -> str:
    """The spec plus the sha256 of the ``.py`` file it runs (a changed file is other code)."""
    target = spec.partition(":")[2].partition("?")[0].rpartition(":")[0]
    digest = None
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        digest = sha256_file(path) if path.is_file() else None
    return json.dumps([spec, digest])


def _trusted() -> set[str]:
    try:
        content = json.loads(_trust_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return set()
    if not isinstance(content, dict) or content.get("format") != TRUST_FORMAT:
        return set()
    return {e for e in content.get("entries", []) if isinstance(e, str)}


def trust_base_code(spec: str) -> None:
    """Record that this user runs ``spec``'s code as a base model (``daptq quantize SPEC`` does it: the user
    named the code). A directory whose base runs code loads only for a recorded spec, same file content."""
    if not runs_code(spec):
        return
    entries = _trusted()
    key = _code_key(spec)
    if key not in entries:
        atomic_write_json(_trust_path(), {"format": TRUST_FORMAT, "entries": sorted(entries | {key})})


def _check_code_base(directory: Path, spec: str, trusted: bool) -> None:
    """A base spec read from a directory's config may run code only with the user's consent: a directory
    from elsewhere could otherwise name any importable function (``torch:os:system?command=...``)."""
    if not runs_code(spec) or trusted or os.environ.get("DAPTQ_TRUST_BASE_CODE") == "1":
        return
    if _code_key(spec) in _trusted():
        return
    raise ValueError(
        f"{directory}: its base model {spec!r} runs Python code named by the directory's config.json, and "
        f"this user has not quantized that spec (with that file content) here (recorded in {_trust_path()}). "
        "If you trust the directory's author: load_quantized_policy(DIR, trust_base_code=True) or "
        "DAPTQ_TRUST_BASE_CODE=1; or pass base_factory=, or re-quantize the model yourself"
    )


def _check_base_files(directory: Path, base: dict[str, Any]) -> None:
    """A base recorded by its files: each present with its recorded sha256, before anything is built."""
    source = base.get("source")
    if source is None:
        return
    spec = base["spec"]
    if not isinstance(source, dict) or not isinstance(source.get("files"), dict):
        raise ValueError(f"{directory / BASE_CONFIG_FILE}: base_model.source must hold 'root' and 'files'")
    root = Path(str(source.get("root")))
    for rel, expected in sorted(source["files"].items()):
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory}: its base model {spec} is missing {path} (the directory stores only what "
                "quantization changed; restore the base checkpoint, or re-quantize with --self-contained)"
            )
        if sha256_file(path) != expected:
            raise ValueError(
                f"{directory}: its base model {spec} changed since it was quantized ({path} has another "
                "sha256); refusing to combine the quantized tensors with other base weights"
            )


# ---- save ---------------------------------------------------------------------------------------------
def save_quantized_policy(
    policy: Any,
    record: Any,
    directory: str | os.PathLike,
    base_spec: str,
    self_contained: bool = False,
    base_factory: Callable[[], Any] | None = None,
) -> Path:
    """Write ``policy`` (quantized in place by ``quantize_policy``) and its ``record`` to ``directory``.

    ``base_spec`` names the float model it came from (``ref:metaworld-mt10``, ``toy:...``, an external
    source); it is rebuilt here (``base_factory()`` instead, for a model only the caller can build) to find
    the tensors that did not change, and its digest must equal ``record.base_model["digest"]``. A base daptq
    does not bundle is also recorded by the sha256 of its checkpoint files. ``self_contained`` stores every
    tensor, so loading needs only the architecture. ``directory`` may be absent, empty, or a quantized policy
    directory daptq wrote (``check_policy_out``).
    """
    from daptq.quant.io import quantized_state

    directory = Path(directory)
    check_policy_out(directory, [base_spec])
    digest = record.base_model.get("digest")
    if base_factory is None:
        trust_base_code(base_spec)  # the caller named this code; its own directory may rebuild it
    base = _build_base(base_spec, base_factory)
    base_state = base.model.state_dict()
    base_digest = model_digest(base.model)
    if digest is not None and base_digest != digest:
        raise ValueError(f"{base_spec} is not the model that was quantized (its digest changed)")
    tensors, modules_cfg = quantized_state(policy.model)
    kept = {
        k: v
        for k, v in tensors.items()
        if self_contained
        or k.rpartition(".")[0] in modules_cfg
        or k not in base_state
        or base_state[k].shape != v.shape
        or base_state[k].dtype != v.dtype
        or not torch.equal(base_state[k].cpu(), v)
    }
    base_model: dict[str, Any] = {"spec": base_spec, "digest": base_digest, "self_contained": self_contained}
    if not self_contained:
        source = base_source_files(base_spec, base)
        if source is not None:
            base_model["source"] = source
    base_config = {
        "format": POLICY_FORMAT,
        "format_version": POLICY_FORMAT_VERSION,
        "base_model": base_model,
        "action_space": policy.action_space.to_dict(),
    }

    def build(tmp: Path) -> None:
        atomic_write_bytes(tmp / TENSORS_FILE, st_save(kept, metadata={"format": POLICY_FORMAT}))
        atomic_write_json(tmp / BASE_CONFIG_FILE, base_config)
        quant_config = {
            "format": POLICY_FORMAT,
            "format_version": POLICY_FORMAT_VERSION,
            "record": record.to_dict(),
            "modules": modules_cfg,
            "files": {n: sha256_file(tmp / n) for n in (TENSORS_FILE, BASE_CONFIG_FILE)},
        }
        atomic_write_json(tmp / QUANT_CONFIG_FILE, signed(quant_config))  # last: the marker

    return write_directory(directory, build, lambda t: check_policy_out(t, [base_spec]))


def _build_base(spec: str, factory: Callable[[], Any] | None, architecture_only: bool = False) -> Any:
    """The base policy: ``factory()``, else the spec's source. ``architecture_only`` (a self-contained
    directory holds every tensor) passes ``weights=False`` to a source whose loader takes it, so a family that
    can build its architecture from its config alone never reads the base checkpoint."""
    if factory is not None:
        policy = factory()
        if not isinstance(getattr(policy, "model", None), torch.nn.Module):
            raise ValueError(f"base_factory for {spec} must return a policy with a torch .model")
        return policy
    from daptq.sources import load_policy

    policy = load_policy(spec, weights=False) if architecture_only else load_policy(spec)
    if not isinstance(getattr(policy, "model", None), torch.nn.Module):
        raise ValueError(
            f"base model {spec!r} is not a torch policy ({type(policy).__name__}); it cannot be a base"
        )
    return policy


# ---- load ---------------------------------------------------------------------------------------------
def read_quantized_policy_config(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, quantization_config.json) after checking every file's sha256 (and the content of
    quantization_config.json against its own ``content_sha256``) and the fields that select behaviour."""
    directory = Path(directory)
    if not directory.is_dir():
        recover_directory(directory)  # a save killed mid-swap: its previous directory is put back
    qpath = directory / QUANT_CONFIG_FILE
    if not qpath.is_file():  # says what it is instead: missing, a file, an eval run, an ONNX export, ...
        from daptq.paths import not_a_quantized_policy

        raise FileNotFoundError(not_a_quantized_policy(directory) + describe_leftovers(directory))
    qconfig = read_versioned_json(qpath, POLICY_FORMAT, POLICY_FORMAT_VERSION, "quantized policy config")
    check_signed(qconfig, qpath)
    check_file_digests(directory, qconfig.get("files"), (TENSORS_FILE, BASE_CONFIG_FILE), qpath)
    cpath = directory / BASE_CONFIG_FILE
    config = read_versioned_json(cpath, POLICY_FORMAT, POLICY_FORMAT_VERSION, "quantized policy base config")
    base = config.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("spec"), str) or not base["spec"]:
        raise ValueError(f"{cpath}: 'base_model' must hold the base model's spec")
    if not isinstance(base.get("digest"), str) or not isinstance(base.get("self_contained", False), bool):
        raise ValueError(f"{cpath}: 'base_model' needs a 'digest' string and a boolean 'self_contained'")
    if not isinstance(qconfig.get("modules"), dict):
        raise ValueError(f"{qpath}: 'modules' must be an object of per-module layouts")
    return config, qconfig


def load_quantized_policy(
    directory: str | os.PathLike,
    base_factory: Callable[[], Any] | None = None,
    trust_base_code: bool = False,
) -> Any:
    """Rebuild a policy saved by ``save_quantized_policy``: checksums, base files and digest, then tensors.

    ``base_factory()`` builds the base policy instead of its spec (a model only the caller can build; for a
    self-contained directory any weights do, only the architecture matters). A base spec that runs code
    (``torch:``) is rebuilt only if this user quantized it here, or with ``trust_base_code``. The returned
    policy carries ``quant_record`` (a QuantRecord) and ``recipe`` (its summary, for reports).
    """
    from daptq.models.record import QuantRecord
    from daptq.quant.io import _read_safetensors, load_quantized_state

    directory = Path(directory)
    config, qconfig = read_quantized_policy_config(directory)
    record = QuantRecord.from_dict(qconfig.get("record"))
    base = config["base_model"]
    base_spec, self_contained = base["spec"], base.get("self_contained", False)
    chain = _LOADING.get()
    here = str(directory.resolve())
    src = spec_path(base_spec)
    if here in chain or (src is not None and str(src.resolve()) in (*chain, here)):
        shown = " -> ".join([*chain, here, base_spec])
        raise ValueError(f"{directory}: its base model spec leads back to itself ({shown}); refusing to load")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ValueError(
            f"{directory}: base models nest more than {MAX_BASE_DEPTH} directories deep "
            f"({' -> '.join([*chain, here])}); refusing to load"
        )
    if base_factory is None:
        _check_code_base(directory, base_spec, trust_base_code)
    if not self_contained:
        _check_base_files(directory, base)
    token = _LOADING.set((*chain, here))
    try:
        policy = _build_base(base_spec, base_factory, architecture_only=self_contained)
    finally:
        _LOADING.reset(token)
    if not self_contained:
        digest = model_digest(policy.model)
        if digest != base["digest"]:
            raise ValueError(
                f"{directory}: base model {base_spec} has digest {digest[:16]}..., the quantized policy was "
                f"made from {base['digest'][:16]}...; refusing to combine them"
            )
    tensors = _read_safetensors(directory / TENSORS_FILE)
    base_keys = set(policy.model.state_dict())
    allow = None if self_contained else base_keys.__contains__
    try:
        load_quantized_state(policy.model, tensors, qconfig["modules"], allow_missing=allow)
    except ValueError as exc:
        raise ValueError(f"{directory}: {exc}") from None
    from daptq.models.step_scales import install_recorded_step_scales

    install_recorded_step_scales(policy, record)  # per-denoising-step activation scales, if recorded
    for hook in ("invalidate_caches", "clear_language_cache"):  # caches computed from the base weights
        if callable(getattr(policy, hook, None)):
            getattr(policy, hook)()
            break
    policy.quant_record = record
    policy.recipe = {**record.summary(), "base_model": base_spec, "path": str(directory)}
    return policy
