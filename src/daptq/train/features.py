"""Frozen-encoder features, precomputed once per dataset shard.

The vision encoder is frozen, so running it on every training step would only repeat work: each shard's frames
are encoded once (fp16 tokens, about 8 KB per frame) and stored next to the states and action labels in
``<cache>/<split>/<shard>.safetensors``. Shards are encoded as they appear, so encoding can run while the
dataset is still being generated. A cached file records the source shard's size and mtime and the encoder
settings; a mismatch re-encodes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from daptq.atomic import atomic_write_bytes
from daptq.data import read_shard
from daptq.models.encoders import VisionEncoder

CACHE_VERSION = 1


def _source_key(shard: Path, encoder: VisionEncoder) -> dict[str, str]:
    st = shard.stat()
    return {
        "cache_version": str(CACHE_VERSION),
        "source_size": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
        "image_size": str(encoder.image_size),
        "vision_blocks": str(len(encoder.blocks)),
    }


def cached_path(cache_dir: Path, shard: Path) -> Path:
    return Path(cache_dir) / shard.parent.name / (shard.stem + ".safetensors")


def is_cached(cache_dir: Path, shard: Path, encoder: VisionEncoder) -> bool:
    path = cached_path(cache_dir, shard)
    if not path.is_file():
        return False
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged cache file is simply rebuilt
        return False
    return all(meta.get(k) == v for k, v in _source_key(shard, encoder).items())


@torch.no_grad()
def encode_shard(shard: Path, cache_dir: Path, encoder: VisionEncoder, batch_size: int = 256) -> Path:
    """Encode every frame of one shard and write its feature file atomically."""
    episodes = read_shard(shard)
    if len({ep.instruction for ep in episodes}) != 1:
        raise ValueError(f"{shard}: episodes disagree on the instruction")
    images = np.concatenate([ep.images for ep in episodes])
    tokens = torch.cat(
        [
            encoder(torch.from_numpy(images[i : i + batch_size])).half()
            for i in range(0, len(images), batch_size)
        ]
    )
    lengths = [len(ep) for ep in episodes]
    tensors = {
        "vision_features": tokens.contiguous(),
        "states": torch.from_numpy(np.concatenate([ep.states for ep in episodes])),
        "actions": torch.from_numpy(np.concatenate([ep.actions for ep in episodes])),
        "episode_offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
    }
    meta = _source_key(shard, encoder)
    meta["task"] = episodes[0].task
    meta["instruction"] = episodes[0].instruction
    meta["seeds"] = json.dumps([ep.seed for ep in episodes])
    path = cached_path(cache_dir, shard)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def encode_shards(
    shards: list[Path], cache_dir: Path, encoder: VisionEncoder, progress: bool = True
) -> list[Path]:
    """Encode the shards not cached yet (or whose source changed); return the cache files of all of them."""
    todo = [s for s in shards if not is_cached(cache_dir, s, encoder)]
    for shard in tqdm(todo, desc="encoding shards", unit="shard", disable=not progress or not todo):
        if not is_cached(cache_dir, shard, encoder):  # a background encoder process may have won
            encode_shard(shard, cache_dir, encoder)
    return [cached_path(cache_dir, s) for s in shards]


def shard_instructions(files: list[Path]) -> list[str]:
    """The distinct instructions of cached shards, in first-seen order."""
    seen: list[str] = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            instruction = (f.metadata() or {}).get("instruction")
        if not instruction:
            raise ValueError(f"{path}: feature file has no instruction in its metadata; delete it to rebuild")
        if instruction not in seen:
            seen.append(instruction)
    return seen


def main(argv: list[str] | None = None) -> None:
    """``python -m daptq.train.features --data ROOT --cache DIR``: encode the shards present now."""
    import argparse

    from daptq.data import open_dataset

    p = argparse.ArgumentParser(prog="python -m daptq.train.features", description=main.__doc__)
    p.add_argument("--data", required=True, help="dataset root written by `daptq data`")
    p.add_argument("--cache", required=True, help="feature cache directory")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = open_dataset(args.data, allow_incomplete=True)
    encoder = VisionEncoder(int(ds.info.get("image_size", 96)))
    for split in args.splits:
        if split in ds.splits:
            encode_shards(ds.shard_paths(split), Path(args.cache), encoder)
    print(f"feature cache at {os.path.abspath(args.cache)}")


if __name__ == "__main__":
    main()
