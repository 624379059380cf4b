"""Weights streamed from a safetensors checkpoint, so a model larger than memory is never whole in it.

The model is built on the meta device; ``materialize_outside`` fills everything but the repeated blocks
(embeddings, projector, norms: small next to the blocks); ``StreamingLoader`` (a
``daptq.methods.sequential.BlockLoader``) fills one block when the sequential loop reaches it
(each tensor read from the memory-mapped file and assigned in place of its meta tensor) and sends it back
to meta after. Each shard is opened
only for the copy and closed right after, so its mapped pages do not stay in the resident set.

Layout read and written (Hugging Face's): ``model.safetensors``, or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daptq.atomic import atomic_write_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device, or a clear error when it names an accelerator this machine lacks."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(dev)!r}: only cpu and cuda are supported")
    return dev


def write_shards(
    state: Mapping[str, torch.Tensor],
    directory: str | Path,
    max_shard_bytes: int = 2 << 30,
    materialize: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Path:
    """Write ``state`` as safetensors shards plus the index (each file written to a temporary name, then
    renamed, the index last). Tensors are made contiguous and unshared (safetensors refuses shared ones).

    ``materialize(name, tensor)``: the tensor to write in place of ``tensor`` (e.g. a meta tensor's random
    values), called one shard at a time, so a checkpoint larger than memory can be written from a model on
    the meta device; the shards are planned from ``tensor``'s shape and dtype, which it must keep."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = directory / f".{fname}.tmp"
        tensors = {}
        for k, v in shard.items():
            if materialize is None and v.is_meta:
                raise ValueError(f"write_shards: {k!r} is on the meta device (no values); pass materialize")
            t = v if materialize is None else materialize(k, v)
            if t.shape != v.shape or t.dtype != v.dtype or t.is_meta:
                raise ValueError(
                    f"write_shards: materialize({k!r}) gave {t.dtype} {tuple(t.shape)} on "
                    f"{t.device}, not {v.dtype} {tuple(v.shape)} with values"
                )
            tensors[k] = t.detach().contiguous().clone()
        save_file(tensors, str(tmp))
        del tensors
        os.replace(tmp, directory / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return directory


class SafetensorsCheckpoint:
    """A safetensors checkpoint (one file or shards + index) read tensor by tensor, never whole."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file():
            self.directory, files = path.parent, {path.name: None}
            self.weight_map = self._keys_of(path)
        elif (path / INDEX_FILE).is_file():
            self.directory = path
            try:
                index = json.loads((path / INDEX_FILE).read_text())
                self.weight_map = dict(index["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path / INDEX_FILE}: not a safetensors index ({e})") from None
            files = dict.fromkeys(self.weight_map.values())
        elif (path / SINGLE_FILE).is_file():
            self.directory, files = path, {SINGLE_FILE: None}
            self.weight_map = self._keys_of(path / SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
        missing = [f for f in files if not (self.directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.directory}: shard(s) named by the index are missing: {missing}")

    @staticmethod
    def _keys_of(file: Path) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return dict.fromkeys(f.keys(), file.name)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(
        self, names: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` for ``names``, each shard opened once and closed after (unmapped)."""
        from safetensors import safe_open

        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise KeyError(f"{self.directory}: the checkpoint has no tensor(s) {missing[:10]}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(self.directory / file), framework="pt", device="cpu") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[k] = t.to(device)
        return out


def _tensor_slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """``{qualified name: (owner, attribute, is_parameter)}`` of every parameter and persistent buffer."""
    slots: dict[str, tuple[nn.Module, str, bool]] = {}
    for prefix, owner in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, p in owner._parameters.items():
            if p is not None:
                slots[dot + name] = (owner, name, True)
        for name, b in owner._buffers.items():
            if b is not None and name not in owner._non_persistent_buffers_set:
                slots[dot + name] = (owner, name, False)
    return slots


def _assign(owner: nn.Module, attr: str, is_param: bool, t: torch.Tensor) -> None:
    if is_param:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(t, requires_grad=bool(old is not None and old.requires_grad))
    else:
        owner._buffers[attr] = t


def materialize_outside(
    model: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    blocks: Iterable[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Assign every parameter and persistent buffer of ``model`` outside the ``blocks`` containers from the
    checkpoint; the blocks stay on meta. Returns the names of tensors still on meta outside blocks
    (non-persistent buffers the family must rebuild, e.g. rotary tables)."""
    prefixes = tuple(f"{b}." for b in blocks)
    slots = {n: s for n, s in _tensor_slots(model).items() if not n.startswith(prefixes)}
    tensors = checkpoint.read(slots, device, dtype)
    for name, (owner, attr, is_param) in slots.items():
        want = owner._parameters[attr] if is_param else owner._buffers[attr]
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(got.shape)} != model {tuple(want.shape)}")
        _assign(owner, attr, is_param, got)
    left = [
        n
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_meta and not n.startswith(prefixes)
    ]
    return left


def _fixed_mmap_threshold(threshold: int = 1 << 20) -> None:
    """glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which block-sized
    tensors come from the heap and freed blocks stay resident (measured: +10-50 MB per streamed block).
    Fixing the threshold keeps tensors over 1 MB in their own mappings, returned to the system when freed.
    Process-wide, set when a streaming loader is made; a no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class StreamingLoader:
    """Fill one block from the checkpoint when the sequential loop reaches it, free it after.

    ``load_block``: each tensor ``<block>.<key>`` read and assigned over the meta one (shapes checked);
    a block with non-persistent buffers is refused (the checkpoint cannot restore them). ``free_block``:
    back to meta, so the process holds one float block at a time."""

    def __init__(
        self,
        checkpoint: SafetensorsCheckpoint,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.dtype = dtype
        self.loads = 0
        _fixed_mmap_threshold()

    def load_block(self, name: str, module: nn.Module) -> None:
        nonpersistent = [
            f"{p}.{b}" if p else b
            for p, m in module.named_modules()
            for b in m._non_persistent_buffers_set
            if m._buffers.get(b) is not None
        ]
        if nonpersistent:
            raise ValueError(f"block {name!r}: non-persistent buffers {nonpersistent} cannot be streamed")
        slots = _tensor_slots(module)
        tensors = self.checkpoint.read([f"{name}.{k}" for k in slots], self.device, self.dtype)
        for key, (owner, attr, is_param) in slots.items():
            target = owner._parameters[attr] if is_param else owner._buffers[attr]
            src = tensors.pop(f"{name}.{key}")
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(
                    f"{name}.{key}: checkpoint shape {tuple(src.shape)} != model {tuple(target.shape)}"
                )
            # assigned, not copied into a to_empty() allocation: one allocation per tensor, not two
            _assign(owner, attr, is_param, src)
        self.loads += 1

    def free_block(self, name: str, module: nn.Module) -> None:
        # Back to meta (shapes kept), then empty the old tensors in place: other holders of the same
        # Parameter objects (a fake-quant layer's undo reference to the float module it replaced) would
        # otherwise keep every block's float weights alive.
        old = [*module.parameters(), *module.buffers()]
        module.to(device="meta")
        with torch.no_grad():
            for t in old:
                if not t.is_meta:
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def save_block_state(module: nn.Module, path: str | Path) -> Path:
    """Write a (quantized) block's state dict as one safetensors file (temp + rename) so it can be freed."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return path


def estimate_memory(
    model: nn.Module, blocks: Iterable[str], activation_bytes: int = 0, dtype_bytes: int | None = None
) -> dict[str, Any]:
    """Bytes the sequential loop holds: the weights outside blocks, the largest block (twice: float and its
    fake-quant copy while it is rounded) and the calibration activations kept in memory. Works on meta."""
    blocks = list(blocks)

    def size(m: nn.Module) -> int:
        return sum(t.numel() * (dtype_bytes or t.element_size()) for t in (*m.parameters(), *m.buffers()))

    per_block = {b: size(model.get_submodule(b)) for b in blocks}
    total = size(model)
    largest = max(per_block.values(), default=0)
    outside = total - sum(per_block.values())
    return {
        "total_weight_bytes": total,
        "outside_blocks_bytes": outside,
        "largest_block_bytes": largest,
        "activation_bytes": activation_bytes,
        "estimate_bytes": outside + 2 * largest + activation_bytes,
    }


__all__ = [
    "INDEX_FILE",
    "SafetensorsCheckpoint",
    "StreamingLoader",
    "estimate_memory",
    "materialize_outside",
    "resolve_device",
    "save_block_state",
    "write_shards",
]
