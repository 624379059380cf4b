"""What the real-VLA families (cogact, lerobot_vla, openvla_oft, gr00t) do the same way, in one place.

- ``PREFIX:PATH[?key=value&...]`` model specs: parsing, unknown options, dtype and numbers;
- key-for-key, shape-for-shape comparison of a checkpoint with the architecture, one error listing every
  missing, unexpected and mis-shaped key (each family keeps its own wording through a ``MismatchFormat``,
  so messages users and tests match on do not change);
- safetensors shards with their ``model.safetensors.index.json``: resolving, reading, writing;
- a model built on the meta device: assigning the checkpoint's tensors and checking none is left unset;
- adapter plumbing: the Linear / Conv2d scan, separate-projection attention layouts, batch-key checks;
- policy plumbing: observation-key checks, the towers' image size and ``info()``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn

from daptq.atomic import atomic_write_bytes, atomic_write_json
from daptq.models.adapter import AttentionLayout, PolicyInfo, state_digest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# ---- model specs ------------------------------------------------------------------------------------------
def parse_model_spec(
    spec: str, prefix: str, options: Sequence[str], usage: str
) -> tuple[str, dict[str, str]]:
    """``PREFIX:PATH[?key=value&...]`` -> (PATH, options); an option not in ``options`` is refused.
    ``usage`` is the form the error shows when PATH is empty (``cogact:PATH[?unnorm_key=NAME&...]``)."""
    path, _, query = spec.removeprefix(prefix).partition("?")
    if not path:
        raise ValueError(f"model spec {spec!r}: expected {usage}")
    parsed = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(parsed) - set(options))
    if unknown:
        raise ValueError(f"model spec {spec!r}: unknown options {unknown}; known: {list(options)}")
    return path, parsed


def spec_dtype(spec: str, options: Mapping[str, str]) -> torch.dtype:
    """The spec's ``dtype`` option (float32 when absent)."""
    name = options.get("dtype", "float32")
    if name not in DTYPES:
        raise ValueError(f"model spec {spec!r}: dtype must be one of {sorted(DTYPES)}")
    return DTYPES[name]


def spec_number(
    spec: str, options: Mapping[str, str], key: str, kind: Callable[[str], Any] = int, default: Any = None
) -> Any:
    """``kind(options[key])``, or ``default`` when the option is absent; a malformed value names the spec."""
    if key not in options:
        return default
    try:
        return kind(options[key])
    except ValueError as e:
        raise ValueError(f"model spec {spec!r}: {e}") from e


# ---- checkpoint keys against the architecture --------------------------------------------------------------
@dataclass(frozen=True)
class MismatchFormat:
    """How a family words a key mismatch. The default: ``2 missing: a; b | 1 mis-shaped: c: file (3,), model
    (4,)``; ``counted=False`` gives ``missing keys (2): ['a', 'b']``; ``sort`` sorts each list as shown."""

    labels: tuple[str, str, str] = ("missing", "unexpected", "mis-shaped")
    counted: bool = True
    part_sep: str = " | "
    item_sep: str = "; "
    shape: str = "{key}: file {got}, model {want}"
    more: str = " (+{n} more)"
    limit: int = 20
    sort: bool = False

    def part(self, label: str, items: Sequence[str]) -> str:
        items = sorted(items) if self.sort else list(items)
        more = self.more.format(n=len(items) - self.limit) if len(items) > self.limit else ""
        if self.counted:
            return f"{len(items)} {label}: {self.item_sep.join(items[: self.limit])}{more}"
        return f"{label} ({len(items)}): {items[: self.limit]}{more}"


@dataclass
class KeyMismatch:
    """The keys of a checkpoint that do not fit the architecture (all lists empty: it fits); ``misshaped``
    holds (key, shape in the file, shape in the model)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def message(self, source: str, architecture: str, fmt: MismatchFormat = MismatchFormat()) -> str:
        shapes = [fmt.shape.format(key=k, got=g, want=w) for k, g, w in self.misshaped]
        lists = (self.missing, self.unexpected, shapes)
        parts = [fmt.part(label, items) for label, items in zip(fmt.labels, lists, strict=True) if items]
        return f"{source} does not match the {architecture} architecture: " + fmt.part_sep.join(parts)

    def raise_if_any(self, source: str, architecture: str, fmt: MismatchFormat = MismatchFormat()) -> None:
        if self:
            raise ValueError(self.message(source, architecture, fmt))


def _shape(t: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)


def compare_keys(
    expected: Mapping[str, torch.Tensor | Sequence[int]],
    got: Mapping[str, torch.Tensor | Sequence[int]],
    *,
    optional: frozenset[str] | set[str] = frozenset(),
) -> KeyMismatch:
    """Every key of ``expected`` (tensors or shapes) missing from ``got`` (unless ``optional``), every key of
    ``got`` not expected, and every shape that differs, in the mappings' order."""
    return KeyMismatch(
        [k for k in expected if k not in got and k not in optional],
        [k for k in got if k not in expected],
        [
            (k, _shape(got[k]), _shape(v))
            for k, v in expected.items()
            if k in got and _shape(got[k]) != _shape(v)
        ],
    )


def assign_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype, strict: bool = True
) -> None:
    """Assign ``state`` (floating tensors cast to ``dtype``) into a model built on the meta device."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=strict, assign=True)


def check_materialized(model: nn.Module, source: str) -> None:
    """Refuse a model with a parameter or buffer still on the meta device after loading."""
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: tensors left unmaterialized after loading: {left[:10]}")


def choose_entry(
    mapping: Any, key: str | None, source: str, *, expected: str, holds: str, name_one: str, noun: str
) -> str:
    """The key of ``mapping`` (a file's {name: entry}) to use: ``key``, or the only one when ``key`` is None.
    Errors name ``source`` and the choices; ``expected`` describes the mapping, ``holds`` (with ``{n}``) its
    entries, ``name_one`` how to pick one, ``noun`` one entry ("dataset", "embodiment")."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"{source}: expected {expected}")
    if key is None:
        if len(mapping) != 1:
            raise ValueError(
                f"{source} holds {holds.format(n=len(mapping))}: {name_one}; choices: {sorted(mapping)}"
            )
        return next(iter(mapping))
    if key not in mapping:
        raise ValueError(f"{source}: no {noun} {key!r}; choices: {sorted(mapping)}")
    return key


def input_dtype(layer: nn.Module) -> torch.dtype:
    """The float dtype to feed a linear-like layer: its weight's; for a packed or quantized layer whose weight
    is not a float parameter (``to_deployable_``'s int4 kernels), its bias's, else float32 (those layers
    compute in their own dtype and return the input's)."""
    for name in ("weight", "bias"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def read_json(path: Path) -> Any:
    """A JSON file; malformed JSON is a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


# ---- safetensors shards ------------------------------------------------------------------------------------
def resolve_shards(directory: Path) -> tuple[tuple[Path, ...], Path | None]:
    """(shards, index) of a Hugging Face weights directory: the index's shards, else one model.safetensors."""
    index = directory / INDEX
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs 'weight_map'): {e}") from e
        shards = tuple(directory / s for s in shard_names)
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return shards, index
    if (directory / SINGLE).is_file():
        return (directory / SINGLE,), None
    raise FileNotFoundError(f"{directory}: neither {INDEX} nor {SINGLE}")


def read_sharded_safetensors(shards: tuple[Path, ...], index: Path | None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors shards; with an index, each key must be in the shard it names."""
    from safetensors import SafetensorError, safe_open

    weight_map = json.loads(index.read_text())["weight_map"] if index else None
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in out:
                        raise ValueError(f"{shard}: key {key!r} is also in another shard")
                    if weight_map is not None and weight_map.get(key) != shard.name:
                        raise ValueError(
                            f"{shard}: key {key!r} is not in the index {index} for this shard "
                            f"(index says {weight_map.get(key)!r})"
                        )
                    out[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{shard}: not a readable safetensors file ({e})") from e
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(out))
        if absent:
            raise ValueError(f"{index} lists keys no shard holds: {absent[:10]}")
    return out


def write_sharded_safetensors(
    directory: Path, state: Mapping[str, torch.Tensor], max_shard_tensors: int | None = None
) -> None:
    """``model-0000i-of-0000n.safetensors`` shards (two by default) and their index json, each atomic."""
    from safetensors.torch import save

    keys = list(state)
    per = max_shard_tensors or (len(keys) + 1) // 2
    chunks = [keys[i : i + per] for i in range(0, len(keys), per)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        name = f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        atomic_write_bytes(directory / name, save({k: state[k].detach().cpu().contiguous() for k in chunk}))
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_tokenizer_dir(tokenizer: Any, target: Path) -> None:
    """``tokenizer.save_pretrained`` into ``target`` as a whole: written beside it, then moved into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---- adapter plumbing --------------------------------------------------------------------------------------
def is_under(name: str, prefixes: Sequence[str]) -> bool:
    """``name`` is one of ``prefixes`` or a submodule of one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def weight_modules(
    model: nn.Module, skip: Sequence[str] = (), extra: Mapping[type, str] | None = None
) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every ``nn.Linear`` ("linear"), ``nn.Conv2d`` ("conv2d") and ``extra`` type
    (its kind) in ``model``, except those under a ``skip`` name (modules off the inference path)."""
    kinds: dict[type, str] = {nn.Linear: "linear", nn.Conv2d: "conv2d", **(extra or {})}
    for name, module in model.named_modules():
        kind = next((k for t, k in kinds.items() if isinstance(module, t)), None)
        if kind is not None and not is_under(name, skip):
            yield name, module, kind


def qkv_layout(
    prefix: str,
    heads: int,
    role: str,
    *,
    block: int | None = None,
    stack: str | None = None,
    out: str = "o_proj",
    kv_heads: int | None = None,
    stream: str | None = None,
    names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj"),
) -> AttentionLayout:
    """An attention with separate q/k/v projections (``names``) under ``prefix`` and output ``out``;
    ``kv_heads`` is kept only when it differs from ``heads`` (grouped-query attention)."""
    q, k, v = (f"{prefix}.{n}" for n in names)
    return AttentionLayout(
        prefix,
        heads,
        role,  # type: ignore[arg-type]
        f"{prefix}.{out}",
        q=q,
        k=k,
        v=v,
        kv_heads=kv_heads if kv_heads is not None and kv_heads != heads else None,
        block=block,
        stack=stack,
        stream=stream,
    )


def stack_layouts(
    layers: str,
    n: int,
    heads: int,
    role: str,
    stack: str,
    *,
    kv_heads: int | None = None,
    stream: str | None = None,
    out: str = "o_proj",
) -> list[AttentionLayout]:
    """``qkv_layout`` of ``{layers}{i}.self_attn`` for the first ``n`` layers of an encoder or decoder."""
    return [
        qkv_layout(
            f"{layers}{i}.self_attn",
            heads,
            role,
            block=i,
            stack=stack,
            out=out,
            kv_heads=kv_heads,
            stream=stream,
        )
        for i in range(n)
    ]


def require_inputs(batch: Mapping[str, Any], keys: Sequence[str], family: str, hint: str) -> None:
    """Refuse a batch without every model input; ``hint`` says how batches are built."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{family} batch is missing {missing} (has {sorted(batch)}); {hint}")


# ---- policy plumbing ---------------------------------------------------------------------------------------
def require_observation(observation: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Refuse an observation without one of ``keys``, naming the first missing one."""
    for key in keys:
        if key not in observation:
            raise ValueError(f"observation is missing {key!r} (has {sorted(observation)})")


class FamilyPolicyMixin:
    """What every family's ``ChunkedPolicy`` derives from ``self.model`` and ``self.config`` alone: the
    square size the towers see (observations of any size are resized to it) and ``info()``, whose digest
    covers the weights and ``info_config()`` (mix in before ``ChunkedPolicy``)."""

    model: nn.Module
    config: Any

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def info_config(self) -> dict[str, Any]:
        """Everything besides the weights that changes the actions (config, statistics...)."""
        raise NotImplementedError

    def info(self) -> PolicyInfo:
        return PolicyInfo(
            digest=state_digest(self.model, self.info_config()),
            image_size=self.config.image_size,
            recipe=self.recorded_recipe(),  # type: ignore[attr-defined] (ChunkedPolicy's)
        )
