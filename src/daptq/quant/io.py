"""Save and load fake-quant models: ``model.safetensors`` + ``quantization_config.json``.

The checkpoint stores, for each fake-quant layer, its integer codes packed into 2/4/8-bit containers
(``<name>.qweight_packed``), scales, zero points, bias and calibrated activation scales; all other parameters
and buffers are stored as they are. The float weights of quantized layers are not stored unless asked for, so
a reloaded layer's ``weight`` equals its dequantized weight and the outputs match bit for bit. Nothing is ever
unpickled. The directory is written as a whole (assembled beside the target, then swapped in), so a save that
dies leaves the previous checkpoint loadable; ``quantization_config.json`` records the sha256 of the weights
and of its own content (format_version 2), so an edited layout or a flipped byte is refused at load.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from daptq.atomic import atomic_write_json, write_directory
from daptq.integrity import check_daptq_directory, check_file_digests, check_signed, signed
from daptq.versioned_json import read_versioned_json

from ._util import atomic_write_bytes, get_module, set_module
from .api import quantized_modules, restored_on_failure
from .bytes import CODES_PER_BYTE, container_bits
from .fake import QuantConv2d, QuantLinear, code_dtype, dequantize_weight, quantized_module_for
from .kernels import DEPLOYABLE_TYPES
from .recipe import Recipe
from .spec import QuantSpec, WeightSpec

FORMAT_NAME = "daptq-quant"
FORMAT_VERSION = 2  # 2: "files" required, content_sha256 of the config itself
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantization_config.json"
_QUANT_STATE = ("weight", "qweight", "weight_scale", "weight_zero_point", "act_scale", "act_zero_point")


def _pack_codebook(codes: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Ternary codes {-1, 0, 1} -> base-3 digits, 5 per byte; binary {-1, +1} -> bits, 8 per byte."""
    per_byte = CODES_PER_BYTE[spec.codebook]
    flat = codes.reshape(-1).to(torch.int16)
    u = (flat + 1) if spec.codebook == "ternary" else (flat > 0).to(torch.int16)
    pad = (-u.numel()) % per_byte
    u = torch.cat([u, u.new_zeros(pad)]).reshape(-1, per_byte)
    base = 3 if spec.codebook == "ternary" else 2
    weights = torch.tensor([base**j for j in range(per_byte)], dtype=torch.int16)
    return (u * weights).sum(dim=1).to(torch.uint8)


def _unpack_codebook(packed: torch.Tensor, spec: WeightSpec, shape: tuple[int, int]) -> torch.Tensor:
    per_byte = CODES_PER_BYTE[spec.codebook]
    n = shape[0] * shape[1]
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(n / per_byte):
        raise ValueError(
            f"packed {spec.codebook} codes: expected {math.ceil(n / per_byte)} uint8, got {packed.numel()} "
            f"{packed.dtype} (the layout's format does not match the stored codes)"
        )
    base = 3 if spec.codebook == "ternary" else 2
    v = packed.to(torch.int16)
    digits = []
    for _ in range(per_byte):
        digits.append(v % base)
        v = v // base
    if bool((v != 0).any()):
        raise ValueError(f"packed {spec.codebook} codes: a byte holds a value no {per_byte} digits encode")
    u = torch.stack(digits, dim=1).reshape(-1)[:n]
    codes = (u - 1) if spec.codebook == "ternary" else (2 * u - 1)
    return codes.reshape(shape).to(code_dtype(spec))


def pack_codes(codes: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Integer codes -> flat uint8 (8-bit codes are stored as they are, in int8/uint8)."""
    if spec.codebook != "uniform":
        return _pack_codebook(codes, spec)
    if spec.bits == 8:
        return codes.contiguous()
    c = container_bits(spec.bits)
    per_byte = 8 // c
    u = (codes.to(torch.int16) - spec.qmin).reshape(-1).to(torch.uint8)
    pad = (-u.numel()) % per_byte
    u = torch.cat([u, u.new_zeros(pad)]).reshape(-1, per_byte)
    out = torch.zeros(u.shape[0], dtype=torch.uint8)
    for j in range(per_byte):
        out |= u[:, j] << (c * j)
    return out


def unpack_codes(packed: torch.Tensor, spec: WeightSpec, shape: tuple[int, int]) -> torch.Tensor:
    if spec.codebook != "uniform":
        return _unpack_codebook(packed, spec, shape)
    if spec.bits == 8:
        if packed.numel() != shape[0] * shape[1] or packed.dtype not in (torch.int8, torch.uint8):
            raise ValueError(
                f"packed codes: expected {shape[0] * shape[1]} int8 for 8-bit, got {packed.numel()} "
                f"{packed.dtype} (the layout's bits do not match the stored codes)"
            )
        return packed.reshape(shape).to(code_dtype(spec))
    c = container_bits(spec.bits)
    per_byte = 8 // c
    n = shape[0] * shape[1]
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(n / per_byte):
        raise ValueError(
            f"packed codes: expected {math.ceil(n / per_byte)} uint8, got {packed.numel()} {packed.dtype}"
        )
    parts = [(packed >> (c * j)) & ((1 << c) - 1) for j in range(per_byte)]
    u = torch.stack(parts, dim=1).reshape(-1)[:n].to(torch.int16) + spec.qmin
    return u.reshape(shape).to(code_dtype(spec))


def quantized_state(
    model: nn.Module, include_float_weights: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors a checkpoint stores (packed codes, scales, other state) and the per-module config."""
    if any(isinstance(m, DEPLOYABLE_TYPES) for m in model.modules()):
        raise ValueError(
            "save_quantized expects a fake-quant model; save before to_deployable_ (packing is "
            "recomputed from the saved codes)"
        )
    layers = quantized_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    modules_cfg: dict[str, Any] = {}
    for name, layer in layers.items():
        spec = layer.spec.weight
        if spec.is_float or include_float_weights:
            tensors[f"{name}.weight"] = layer.weight.detach()
        if not spec.is_float:
            if layer.qweight is None:
                raise ValueError(f"{name}: not quantized yet (no codes)")
            tensors[f"{name}.qweight_packed"] = pack_codes(layer.qweight, spec)
            tensors[f"{name}.weight_scale"] = layer.weight_scale
            if layer.weight_zero_point is not None:
                tensors[f"{name}.weight_zero_point"] = layer.weight_zero_point
        a = layer.spec.activation
        if a is not None and a.mode == "static_per_tensor":
            if layer.act_scale is None:
                raise ValueError(
                    f"{name}: static activation spec but not calibrated; calibrate before saving"
                )
            tensors[f"{name}.act_scale"] = layer.act_scale
            if layer.act_zero_point is not None:
                tensors[f"{name}.act_zero_point"] = layer.act_zero_point
        modules_cfg[name] = {
            "type": type(layer).__name__,
            "weight_shape": list(layer.weight.shape),
            "spec": layer.spec.to_dict(),
            "has_float_weight": spec.is_float or include_float_weights,
        }
    custom = custom_checkpoint_modules(model)
    for name, layer in custom.items():
        tensors.update(layer.checkpoint_tensors(name))
        modules_cfg[name] = {
            "type": type(layer).__name__,
            "weight_shape": list(layer.weight.shape),
            **layer.checkpoint_config(),
        }
    for key, value in model.state_dict().items():
        prefix, _, attr = key.rpartition(".")
        if (prefix in layers and attr in _QUANT_STATE) or prefix in custom:
            continue
        tensors[key] = value
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # unties shared storage
    return tensors, modules_cfg


def custom_checkpoint_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fake-quant layers defined outside daptq.quant that store themselves (methods.qvla's per-row widths).

    Such a layer has ``checkpoint_tensors(prefix) -> {key: tensor}`` (every tensor it needs, bias included,
    keys under ``prefix``) and ``checkpoint_config() -> dict`` (JSON) whose ``"loader"`` is a name in
    ``CHECKPOINT_LOADERS`` (or one added by ``register_checkpoint_loader``): a function with signature
    ``(float_module, tensors, prefix, cfg) -> layer`` that pops the keys it uses from ``tensors``.
    """
    return {n: m for n, m in model.named_modules() if n and hasattr(m, "checkpoint_tensors")}


# The loaders a checkpoint may name: a fixed registry, so a config file never picks which code runs.
# Values are "module:function" imported on first use (daptq.quant does not import the methods at import).
CHECKPOINT_LOADERS: dict[str, str | Callable[..., nn.Module]] = {
    "daptq.methods.qvla:load_mixed_linear": "daptq.methods.qvla:load_mixed_linear",
    "daptq.quant.category:load_category_linear": "daptq.quant.category:load_category_linear",
}


def register_checkpoint_loader(name: str, loader: Callable[..., nn.Module]) -> None:
    """Allow checkpoints to name ``name`` for a custom layer type defined outside daptq (from code only)."""
    if not isinstance(name, str) or not name or not callable(loader):
        raise ValueError(f"register_checkpoint_loader needs a name and a function, got {name!r}, {loader!r}")
    if name in CHECKPOINT_LOADERS and CHECKPOINT_LOADERS[name] is not loader:
        raise ValueError(f"checkpoint loader {name!r} is already registered")
    CHECKPOINT_LOADERS[name] = loader


def _custom_loader(name: str, loader: Any) -> Callable[..., nn.Module]:
    """The registered loader a custom module's config names; any other name is refused."""
    entry = CHECKPOINT_LOADERS.get(loader) if isinstance(loader, str) else None
    if entry is None:
        raise ValueError(
            f"{name}: checkpoint loader {loader!r} is not a registered loader (known: "
            f"{', '.join(sorted(CHECKPOINT_LOADERS))})"
        )
    if isinstance(entry, str):
        module_name, _, fn_name = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), fn_name)
    return entry


def save_quantized(
    model: nn.Module, directory: str | Path, recipe: Recipe | None = None, include_float_weights: bool = False
) -> Path:
    """Write ``model.safetensors`` and ``quantization_config.json`` as the directory ``directory``.

    ``directory`` may be absent, empty, or a checkpoint this function wrote (nothing else is replaced); the
    new directory is assembled beside it and swapped in, so a save that dies leaves the previous one whole.
    """
    directory = Path(directory)
    check_checkpoint_out(directory)
    tensors, modules_cfg = quantized_state(model, include_float_weights)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "modules": modules_cfg,
        "recipe": None if recipe is None else recipe.to_dict(),
    }
    data = st_save(tensors, metadata={"format": FORMAT_NAME})
    # The config names the exact weights file it belongs to and checksums its own content: flipped bytes or
    # an edited layout fail to load instead of changing the model.
    config["files"] = {WEIGHTS_FILE: hashlib.sha256(data).hexdigest()}

    def build(tmp: Path) -> None:
        atomic_write_bytes(tmp / WEIGHTS_FILE, data)
        atomic_write_json(tmp / CONFIG_FILE, signed(config))

    return write_directory(directory, build, check_checkpoint_out)


def check_checkpoint_out(directory: str | Path) -> None:
    """Raise unless ``directory`` is absent, empty, or a checkpoint ``save_quantized`` wrote."""
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        check_daptq_directory(
            directory, CONFIG_FILE, FORMAT_NAME, (WEIGHTS_FILE, CONFIG_FILE), f"a {FORMAT_NAME} checkpoint"
        )


def _verify_files(directory: Path, config: dict[str, Any]) -> None:
    """The config's own content checksum, then the sha256 it records for the weights file (required)."""
    path = directory / CONFIG_FILE
    check_signed(config, path)
    check_file_digests(directory, config.get("files"), (WEIGHTS_FILE,), path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    looks_safetensors = len(data) > 8 and data[8:9] == b"{"
    if not looks_safetensors:
        if data[:4] == b"PK\x03\x04" or (
            data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        ):
            raise ValueError(
                f"{path} is a pickle / torch.save archive, not safetensors; daptq never unpickles"
            )
        raise ValueError(
            f"{path} is not a safetensors file (truncated or corrupted header, {len(data)} bytes)"
        )
    if 8 + header_len > len(data):
        raise ValueError(f"{path} is truncated: header claims {header_len} bytes, file has {len(data) - 8}")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupted or truncated safetensors: {e}") from None


def read_config(directory: str | Path) -> dict[str, Any]:
    return read_versioned_json(
        Path(directory) / CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, f"{FORMAT_NAME} config"
    )


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"checkpoint is missing tensor {key!r}")
    return tensors.pop(key)


@torch.no_grad()
def load_quantized(model_or_factory: nn.Module | Callable[[], nn.Module], directory: str | Path) -> nn.Module:
    """Rebuild a fake-quant model from ``save_quantized`` output; returns the (same or new) model.

    ``model_or_factory`` is the float architecture (its weights are overwritten) or a zero-argument callable
    building it. If loading fails the model is left exactly as it was.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    config = read_config(directory)
    tensors = _read_safetensors(directory / WEIGHTS_FILE)  # format errors first (pickles, truncation)
    _verify_files(directory, config)
    if not isinstance(config.get("modules"), dict):
        raise ValueError(f"{directory / CONFIG_FILE}: 'modules' must be an object of module configs")
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory returned {type(model).__name__}, not an nn.Module")
    load_quantized_state(model, tensors, config.get("modules"))
    return model


@torch.no_grad()
def load_quantized_state(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    modules_cfg: Any,
    allow_missing: Callable[[str], bool] | None = None,
) -> None:
    """Swap in the fake-quant layers ``modules_cfg`` describes and load ``tensors``; all or nothing.

    ``allow_missing(key)`` names float tensors the checkpoint may leave out (they keep the model's values,
    e.g. the unchanged encoders of a quantized policy).
    """
    if not isinstance(modules_cfg, dict):
        raise ValueError(f"checkpoint 'modules' must be an object of module configs, got {modules_cfg!r}")
    tensors = dict(tensors)
    with restored_on_failure(model):
        for name, cfg in modules_cfg.items():
            if not isinstance(cfg, dict):
                raise ValueError(f"{name}: module config must be an object, got {cfg!r}")
            try:
                set_module(model, name, _load_layer(model, name, cfg, tensors))
            except ValueError as exc:
                if str(exc).startswith(f"{name}:"):
                    raise
                raise ValueError(f"{name}: {exc}") from None
            except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
                # a layout edited by hand (bits 4 -> 8, a type): name the layer, not torch's internals
                raise ValueError(
                    f"{name}: checkpoint layout does not fit its tensors or the model ({type(exc).__name__}: "
                    f"{exc})"
                ) from None
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint tensors do not fit the model: {exc}") from None
        quant_prefixes = set(modules_cfg)
        missing = [k for k in missing if k.rpartition(".")[0] not in quant_prefixes]
        if allow_missing is not None:
            missing = [k for k in missing if not allow_missing(k)]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )


def _load_layer(
    model: nn.Module, name: str, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> nn.Module:
    """The fake-quant layer ``cfg`` describes for the model's module ``name``, its tensors popped."""
    if "loader" in cfg:
        return _custom_loader(name, cfg["loader"])(get_module(model, name), tensors, name, cfg)
    spec = QuantSpec.from_dict(cfg.get("spec"))
    original = get_module(model, name)
    shape = cfg.get("weight_shape")
    if not isinstance(shape, list) or tuple(original.weight.shape) != tuple(shape):
        raise ValueError(f"{name}: model weight shape {tuple(original.weight.shape)} != checkpoint {shape!r}")
    expected = {"QuantLinear": nn.Linear, "QuantConv2d": nn.Conv2d}.get(cfg.get("type"))
    if (
        expected is None
        or not isinstance(original, expected)
        or isinstance(original, QuantLinear | QuantConv2d)
    ):
        raise ValueError(
            f"{name}: checkpoint type {cfg.get('type')!r} does not fit model module {type(original)}"
        )
    layer = quantized_module_for(original, spec, name, round_now=False)
    added_bias = tensors.get(f"{name}.bias")
    if layer.bias is None and added_bias is not None:  # a folded correction (CSRC) gave a bias-free layer one
        if tuple(added_bias.shape) != (layer.weight.shape[0],):
            raise ValueError(f"{name}: bias shape {tuple(added_bias.shape)} != ({layer.weight.shape[0]},)")
        layer.bias = nn.Parameter(torch.zeros_like(added_bias, dtype=layer.weight.dtype))
    w = layer.weight
    if cfg.get("has_float_weight"):
        w.copy_(_take(tensors, f"{name}.weight"))
    if not spec.weight.is_float:
        codes = unpack_codes(
            _take(tensors, f"{name}.qweight_packed"), spec.weight, (w.shape[0], w[0].numel())
        )
        scale = _take(tensors, f"{name}.weight_scale")
        zp = tensors.pop(f"{name}.weight_zero_point", None)
        layer.set_quantized_weight(codes, scale, zp)
        if not cfg.get("has_float_weight"):
            w.copy_(dequantize_weight(codes, scale, zp, spec.weight).reshape(w.shape))
    if f"{name}.act_scale" in tensors:
        layer.set_activation_qparams(
            tensors.pop(f"{name}.act_scale"), tensors.pop(f"{name}.act_zero_point", None)
        )
    return layer
