"""CogACT with its weights streamed from safetensors shards (``daptq.models.streaming``): the model is built
on the meta device, everything outside the repeated blocks is loaded, the blocks are filled one at a time by
the sequential loop. A streamed directory holds ``cogact_config.json`` (``CogACTConfig.to_dict``) and the
shards of ``CogACT.state_dict()`` with their index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from daptq.atomic import atomic_write_json
from daptq.models.cogact.adapter import CogACTAdapter
from daptq.models.cogact.config import CogACTConfig
from daptq.models.cogact.model import CogACT
from daptq.models.streaming import (
    SafetensorsCheckpoint,
    StreamingLoader,
    materialize_outside,
    resolve_device,
    write_shards,
)

CONFIG_FILE = "cogact_config.json"


def write_streamed_cogact(model: CogACT, directory: str | Path, max_shard_bytes: int = 2 << 30) -> Path:
    """Shards + index of ``model``'s state dict and its config (the config last: its presence marks a
    complete directory)."""
    directory = Path(directory)
    write_shards(model.state_dict(), directory, max_shard_bytes)
    atomic_write_json(directory / CONFIG_FILE, model.config.to_dict())
    return directory


def load_streamed_cogact(
    directory: str | Path,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[CogACTAdapter, StreamingLoader]:
    """(an adapter over a CogACT whose blocks are on meta, the loader that fills them) from ``directory``."""
    directory = Path(directory)
    dev = resolve_device(device)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (write it with write_streamed_cogact)")
    try:
        config = CogACTConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    checkpoint = SafetensorsCheckpoint(directory)
    with torch.device("meta"):
        model = CogACT(config)
    adapter = CogACTAdapter(model.eval(), tokenizer)
    blocks = list(adapter.block_modules().values())
    left = materialize_outside(model, checkpoint, blocks, dev, dtype)
    model.llm_backbone.reset_rotary()  # non-persistent rotary tables: rebuilt, not read
    model.llm_backbone.llm.model.rotary_emb.to(dev)
    left = [n for n in left if "rotary_emb" not in n]
    if left:
        raise ValueError(f"{directory}: tensors outside the blocks are not in the checkpoint: {left[:10]}")
    return adapter, StreamingLoader(checkpoint, dev, dtype)


__all__ = ["CONFIG_FILE", "load_streamed_cogact", "write_streamed_cogact"]
