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
    return write_streamed_cogact_state(model.state_dict(), model.config, directory, max_shard_bytes)


def convert_cogact_run(
    run: str | Path,
    directory: str | Path,
    max_shard_bytes: int = 2 << 30,
    tokenizer: str | Path | None = None,
) -> Path:
    """Convert a CogACT run (``RUN`` or ``RUN/checkpoints/NAME.pt``, the original's layout) once into a
    streamed directory, for a checkpoint too large to hold whole: the ``.pt`` is read with
    ``torch.load(weights_only=True, mmap=True)`` (tensors only: anything else is refused), checked key for
    key against the architecture on the meta device, and written as shards one at a time in its own dtype
    (each shard is the most held in memory), with the run's ``config.json`` and
    ``dataset_statistics.json`` beside. All of it is written into a temporary sibling directory renamed
    into place last, so ``directory`` is either absent or complete; an existing one is refused."""
    import os
    import shutil
    import tempfile

    from daptq.models.cogact.checkpoint import (
        check_groups,
        dit_type_of,
        read_checkpoint,
        resolve_run,
    )
    from daptq.models.cogact.model import CHECKPOINT_GROUPS
    from daptq.models.family_common import read_json

    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists: convert_cogact_run writes a new directory")
    files = resolve_run(run, tokenizer=tokenizer)
    groups = read_checkpoint(files.checkpoint)
    config = CogACTConfig.from_run_config(
        read_json(files.config), str(files.config), dit_type_of(groups["action_model"])
    )
    with torch.device("meta"):
        check_groups(CogACT(config), groups, str(files.checkpoint))
    state = {f"{g}.{k}": v for g in CHECKPOINT_GROUPS for k, v in groups[g].items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_streamed_cogact_state(state, config, tmp, max_shard_bytes)
        shutil.copyfile(files.statistics, tmp / "dataset_statistics.json")
        shutil.copyfile(files.config, tmp / "run_config.json")
        if files.tokenizer is not None:
            shutil.copytree(files.tokenizer, tmp / "tokenizer", ignore=shutil.ignore_patterns(".*"))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def write_streamed_cogact_state(
    state: dict[str, torch.Tensor],
    config: CogACTConfig,
    directory: str | Path,
    max_shard_bytes: int,
    materialize: Any = None,
) -> Path:
    """``write_streamed_cogact`` from a state dict and its config (the model need not exist; ``materialize``:
    see ``streaming.write_shards``)."""
    directory = Path(directory)
    write_shards(state, directory, max_shard_bytes, materialize=materialize)
    atomic_write_json(directory / CONFIG_FILE, config.to_dict())
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


__all__ = [
    "CONFIG_FILE",
    "convert_cogact_run",
    "load_streamed_cogact",
    "write_streamed_cogact",
    "write_streamed_cogact_state",
]
