"""Load a GR00T N1.x checkpoint directory as the original saves it (``save_pretrained``); write one.

    DIR/config.json                       model_type gr00t_n1_5 / gr00t_n1, backbone_cfg, action_head_cfg
    DIR/model.safetensors.index.json      with DIR/model-0000i-of-0000n.safetensors (or DIR/model.safetensors)
    DIR/experiment_cfg/metadata.json      per-embodiment statistics and modalities
    DIR/tokenizer/                        (not in the original layout) the Eagle tokenizer, or tokenizer=DIR

Shards are read with safetensors (nothing is unpickled); every tensor must match the architecture key for key
and shape for shape (one error lists every missing, unexpected and mis-shaped key). The model is built on the
meta device and the tensors are assigned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daptq.atomic import atomic_write_json
from daptq.integrity import sha256_file
from daptq.models.family_common import (
    assign_state,
    check_materialized,
    compare_keys,
    read_json,
    read_sharded_safetensors,
    resolve_shards,
    save_tokenizer_dir,
    write_sharded_safetensors,
)
from daptq.models.gr00t.config import Gr00tConfig
from daptq.models.gr00t.model import Gr00tN1

METADATA = Path("experiment_cfg") / "metadata.json"
# Released N1.5 checkpoints' backbone_cfg.eagle_path: SigLIP-2 400M, one-Linear connector, no pixel shuffle.
N15_EAGLE_PATH = "NVEagle/eagle_er-qwen3_1_7B-Siglip2_400M_stage1_5_128gpu_er_v7_1mlp_nops"


@dataclass(frozen=True)
class Gr00tFiles:
    directory: Path
    config: Path
    shards: tuple[Path, ...]
    index: Path | None
    metadata: Path
    tokenizer: Path | None

    def paths(self) -> list[Path]:
        files = [self.config, *([self.index] if self.index else []), *self.shards, self.metadata]
        if self.tokenizer is not None:
            files += sorted(p for p in self.tokenizer.iterdir() if p.is_file() and not p.name.startswith("."))
        return files

    def sha256(self) -> dict[str, str]:
        return {str(f): sha256_file(f) for f in self.paths()}


def resolve_files(path: str | Path, tokenizer: str | Path | None = None) -> Gr00tFiles:
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"GR00T checkpoint directory not found: {d}")
    for f, what in ((d / "config.json", "config"), (d / METADATA, "embodiment metadata")):
        if not f.is_file():
            raise FileNotFoundError(f"{d}: missing {f.relative_to(d)} (the checkpoint's {what})")
    shards, index = resolve_shards(d)
    tok = (
        Path(tokenizer)
        if tokenizer is not None
        else (d / "tokenizer" if (d / "tokenizer").is_dir() else None)
    )
    return Gr00tFiles(d, d / "config.json", shards, index, d / METADATA, tok)  # type: ignore[arg-type]


def build_gr00t(
    config: Gr00tConfig,
    state: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> Gr00tN1:
    if state is None:
        return Gr00tN1(config).to(dtype).eval()
    with torch.device("meta"):
        model = Gr00tN1(config)
    compare_keys(model.state_dict(), state).raise_if_any(source, "GR00T")
    assign_state(model, state, dtype)
    model.reset_rotary()
    check_materialized(model, source)
    return model.eval()


def model_from_files(files: Gr00tFiles, dtype: torch.dtype = torch.float32) -> tuple[Gr00tN1, dict[str, Any]]:
    cfg = read_json(files.config)
    config = Gr00tConfig.from_checkpoint_config(cfg, str(files.config))
    state = read_sharded_safetensors(files.shards, files.index)
    return build_gr00t(config, state, dtype, str(files.directory)), cfg


def save_gr00t_checkpoint(
    model: Gr00tN1, directory: str | Path, metadata: Mapping[str, Any], tokenizer: Any = None
) -> Path:
    """Write a directory in the original layout (tests): sharded safetensors + index, ``config.json`` with the
    original's fields (plus ``daptq_gr00t``: the exact sizes), ``experiment_cfg/metadata.json``."""
    d = Path(directory)
    c = model.config
    write_sharded_safetensors(d, model.state_dict())
    atomic_write_json(d / METADATA, dict(metadata))
    if tokenizer is not None:
        save_tokenizer_dir(tokenizer, d / "tokenizer")
    cfg = {
        "architectures": ["GR00T_N1_5" if c.model_type == "gr00t_n1_5" else "GR00T_N1"],
        "model_type": c.model_type,
        "action_dim": c.action_dim,
        "action_horizon": c.action_horizon,
        "backbone_cfg": {
            "select_layer": c.select_layer,
            "project_to_dim": c.project_to_dim,
            **({"eagle_path": N15_EAGLE_PATH} if c.model_type == "gr00t_n1_5" else {}),
        },
        "action_head_cfg": {
            "action_dim": c.action_dim,
            "action_horizon": c.action_horizon,
            "max_state_dim": c.max_state_dim,
            "max_num_embodiments": c.max_num_embodiments,
            "hidden_size": c.ah_hidden_size,
            "input_embedding_dim": c.input_embedding_dim,
            "backbone_embedding_dim": c.backbone_embedding_dim,
            "diffusion_model_cfg": dict(c.dit),
            "vl_self_attention_cfg": dict(c.vl_self_attention),
            "num_inference_timesteps": c.num_inference_timesteps,
            "num_target_vision_tokens": c.num_target_vision_tokens,
        },
        "daptq_gr00t": c.to_dict(),
    }
    atomic_write_json(d / "config.json", cfg)
    return d
