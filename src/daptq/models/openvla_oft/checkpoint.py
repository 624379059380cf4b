"""Load an OpenVLA-OFT checkpoint directory as the original releases it, and write one (for tests).

The directory (e.g. moojink/openvla-7b-oft-finetuned-libero-spatial)::

    DIR/config.json                         OpenVLAConfig (model_type "openvla")
    DIR/model.safetensors.index.json        {"weight_map": {key: shard}} (or one DIR/model.safetensors)
    DIR/model-0000i-of-0000n.safetensors    vision_backbone.*, projector.*, language_model.*
    DIR/action_head--<step>_checkpoint.pt   torch.save(L1RegressionActionHead.state_dict()) (DDP "module.")
    DIR/proprio_projector--<step>_checkpoint.pt
    DIR/dataset_statistics.json             {dataset: {"action": {q01, q99, mask}, "proprio": {...}}}
    DIR/tokenizer.json / tokenizer.model / tokenizer_config.json

Shards are read with safetensors (no pickle); the two ``.pt`` files with ``torch.load(weights_only=True)``
(anything but a flat dict of tensors is refused, naming the key). Every tensor must match the architecture key
for key and shape for shape; one error lists all missing, unexpected and mis-shaped keys. The model is built
on the meta device and the tensors are assigned into it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daptq.atomic import atomic_write_bytes, atomic_write_json
from daptq.integrity import sha256_file
from daptq.models.family_common import (
    assign_state,
    check_materialized,
    compare_keys,
    read_json,
    read_sharded_safetensors,
    resolve_shards,
    write_sharded_safetensors,
)
from daptq.models.openvla_oft.config import OFTConfig
from daptq.models.openvla_oft.model import OpenVLAOFT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class OFTFiles:
    """The files of one OpenVLA-OFT checkpoint directory a loader reads."""

    directory: Path
    config: Path
    shards: tuple[Path, ...]
    index: Path | None
    action_head: Path
    proprio_projector: Path | None
    statistics: Path
    tokenizer: Path | None

    def paths(self) -> list[Path]:
        files = [self.config, *([self.index] if self.index else []), *self.shards, self.action_head]
        files += [self.proprio_projector] if self.proprio_projector else []
        files.append(self.statistics)
        if self.tokenizer is not None:
            files += [self.tokenizer / n for n in TOKENIZER_FILES if (self.tokenizer / n).is_file()]
        return files

    def sha256(self) -> dict[str, str]:
        return {str(f): sha256_file(f) for f in self.paths()}


def _one(directory: Path, prefix: str, step: str | None, required: bool) -> Path | None:
    found = sorted(directory.glob(f"{prefix}--*.pt"))
    if step is not None:
        found = [p for p in found if p.name.startswith(f"{prefix}--{step}_")]
    if len(found) == 1:
        return found[0]
    if not found:
        if required:
            raise FileNotFoundError(
                f"{directory}: no {prefix}--*.pt file{f' for checkpoint step {step!r}' if step else ''} "
                "(is this an OpenVLA-OFT checkpoint directory?)"
            )
        return None
    raise ValueError(
        f"{directory}: {len(found)} {prefix}--*.pt files ({[p.name for p in found]}); name the step "
        "(openvla-oft:DIR?step=NAME)"
    )


def resolve_files(path: str | Path, step: str | None = None, use_proprio: bool = True) -> OFTFiles:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"OpenVLA-OFT checkpoint directory not found: {directory}")
    config = directory / "config.json"
    statistics = directory / "dataset_statistics.json"
    for f, what in ((config, "config"), (statistics, "dataset statistics")):
        if not f.is_file():
            raise FileNotFoundError(f"{directory}: missing {f.name} (the checkpoint's {what})")
    shards, index = resolve_shards(directory)
    head = _one(directory, "action_head", step, True)
    proprio = _one(directory, "proprio_projector", step, use_proprio)
    tok = directory if any((directory / n).is_file() for n in TOKENIZER_FILES) else None
    return OFTFiles(directory, config, shards, index, head, proprio, statistics, tok)  # type: ignore[arg-type]


def read_shards(files: OFTFiles) -> dict[str, torch.Tensor]:
    return read_sharded_safetensors(files.shards, files.index)


def read_component(path: Path) -> dict[str, torch.Tensor]:
    """A head/projector ``.pt`` state dict (DDP's ``module.`` prefix stripped, as the original's
    ``load_component_state_dict``); anything but tensors is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: weights_only refused an object
        raise ValueError(f"{path}: refused by torch.load(weights_only=True): {e}") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor objects where tensors belong: {bad[:10]}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, architecture: str) -> None:
    """Key-for-key, shape-for-shape comparison; one ValueError lists every problem."""
    compare_keys(model.state_dict(), state).raise_if_any(source, architecture)


def read_state(files: OFTFiles) -> dict[str, torch.Tensor]:
    """All tensors by model key: the shards' keys as they are, the head and projector files' under
    ``action_head.`` / ``proprio_projector.``."""
    state = read_shards(files)
    for prefix, path in (("action_head", files.action_head), ("proprio_projector", files.proprio_projector)):
        if path is None:
            continue
        for k, v in read_component(path).items():
            state[f"{prefix}.{k}"] = v
    return state


def build_oft(
    config: OFTConfig,
    state: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> OpenVLAOFT:
    """The model from a state (built on the meta device, tensors assigned), or random weights."""
    if state is None:
        return OpenVLAOFT(config).to(dtype).eval()
    with torch.device("meta"):
        model = OpenVLAOFT(config)
    check_state(model, state, source, "OpenVLA-OFT")
    assign_state(model, state, dtype)
    model.reset_rotary()
    check_materialized(model, source)
    return model.eval()


def model_from_files(
    files: OFTFiles, platform: str = "LIBERO", dtype: torch.dtype = torch.float32
) -> tuple[OpenVLAOFT, dict[str, Any]]:
    hf = read_json(files.config)
    config = OFTConfig.from_hf_config(hf, str(files.config), platform)
    return build_oft(config, read_state(files), dtype, str(files.directory)), hf


def save_oft_checkpoint(
    model: OpenVLAOFT,
    directory: str | Path,
    dataset_statistics: Mapping[str, Any],
    tokenizer: Any = None,
    step: str = "150000",
    max_shard_tensors: int | None = None,
) -> Path:
    """Write a directory in the original layout (tests; real ones come from OFT's fine-tuning script):
    sharded safetensors with their index, the head and projector ``.pt`` files with DDP's ``module.``
    prefix, the config (plus ``daptq_oft``: the exact sizes) and the statistics. Each file is atomic."""
    directory = Path(directory)
    c = model.config
    shard_state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(("action_head.", "proprio_projector."))
    }
    write_sharded_safetensors(directory, shard_state, max_shard_tensors)
    for prefix in ("action_head", "proprio_projector"):
        module = getattr(model, prefix)
        if module is None:
            continue
        buf = io.BytesIO()
        torch.save({f"module.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}, buf)
        atomic_write_bytes(directory / f"{prefix}--{step}_checkpoint.pt", buf.getvalue())
    hf = {
        "model_type": "openvla",
        "architectures": ["OpenVLAForActionPrediction"],
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_sizes": [c.image_size, c.image_size],
        "pad_token_id": c.pad_token_id,
        "text_config": {"model_type": "llama", "hidden_size": c.hidden_size, "vocab_size": c.vocab_size},
        "norm_stats": dict(dataset_statistics),
        "daptq_oft": c.to_dict(),
    }
    atomic_write_json(directory / "dataset_statistics.json", dict(dataset_statistics))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    atomic_write_json(directory / "config.json", hf)
    return directory
