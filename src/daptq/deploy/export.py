"""Export a (fake-)quantized reference VLA as ONNX Runtime graphs that run daptq's own codes and scales.

Three graphs, written with the TorchScript exporter (``dynamo=False``; the dynamo exporter needs onnxscript)
after every fake-quant layer was swapped for its lowered module (``daptq.deploy.lowering``):

- ``language.onnx``: MiniLM (input_ids, attention_mask) -> token features; the runtime calls it once per
  instruction and caches the result, as the PyTorch policy does.
- ``condition.onnx``: (image uint8, state, language_features, language_mask) -> z: EfficientNet convs,
  the projections and the backbone.
- ``denoiser.onnx``: (noisy chunk, t, z) -> epsilon: the DiT action head.

``manifest.json`` (written last) records the model config, the per-layer plan (kernel, accuracy level,
bytes), the runtime's threading default, a sha256 of every graph and of its own content (``content_sha256``,
version 2); a reader refuses a mismatch and validates every field before anything is allocated. The export
is assembled in a hidden sibling and swapped in (``daptq.atomic.write_directory``); ``--overwrite`` replaces
only an earlier export, never a source or any other directory.
onnx 1.23 stamps IR version 14, which ONNX Runtime 1.31 rejects, so graphs are written as IR 10.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from daptq.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    describe_leftovers,
    recover_directory,
    write_directory,
)
from daptq.deploy.lowering import LayerPlan, W4A8Kernel, lower_model_
from daptq.integrity import check_daptq_directory, check_signed, signed
from daptq.quant import QuantConv2d
from daptq.strict_parse import loads_json_strict

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "daptq-onnx"
MANIFEST_VERSION = 2  # 2: content_sha256, every field validated
GRAPHS = ("language", "condition", "denoiser")
EXPORT_FILES = (MANIFEST, *(f"{g}.onnx" for g in GRAPHS))
OPSET = 17
IR_VERSION = 10  # the newest IR ONNX Runtime 1.31 loads
MS_DOMAIN = "com.microsoft"


def export_onnx(
    module: nn.Module,
    args: tuple[Any, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> onnx.ModelProto:
    """``torch.onnx.export`` (TorchScript) into memory, IR version set for ONNX Runtime 1.31."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes or {},
            custom_opsets={MS_DOMAIN: 1},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = IR_VERSION
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return model


class _Condition(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image, state, language_features, language_mask):
        return self.model.condition(
            {
                "image": image,
                "state": state,
                "language_features": language_features,
                "language_mask": language_mask,
            }
        )


def _example_inputs(model: nn.Module) -> dict[str, Any]:
    c = model.config
    tokens = model.language.tokenize(["pick up the puck and place it at the goal"])
    with torch.no_grad():
        features = model.language(tokens["input_ids"], tokens["attention_mask"]).float()
    return {
        "tokens": tokens,
        "image": torch.zeros((1, *c.image_shape), dtype=torch.uint8),
        "state": torch.zeros(1, c.state_dim),
        "language_features": features,
        "language_mask": tokens["attention_mask"].bool(),
        "noisy": torch.zeros(1, c.chunk_size, c.action_dim),
        "t": torch.zeros(1, dtype=torch.long),
        "z": torch.zeros(1, c.d_model),
    }


def quantized_convs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantConv2d)]


def check_convs(model: nn.Module, float_convs: bool) -> list[str]:
    """The quantized convs (``--include-encoders``) that would run as fp32 convs; an error unless allowed.

    No conv lowers to an integer kernel: daptq rounds conv activations per pixel, and a per-pixel scale
    does not factor out of a conv's sum over neighbouring pixels (``ConvInteger`` takes one activation
    scale per tensor). The fp32 conv on the dequantized weight with the rounding emulated computes the same
    numbers as the evaluated fake-quant conv, but it is not an int8 deployment, so it is opt-in."""
    names = quantized_convs(model)
    if names and not float_convs:
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        raise ValueError(
            f"{len(names)} quantized conv layer(s) have no integer ONNX kernel: {shown}. Pass "
            "float_convs=True (CLI: --float-convs) to export them as fp32 convs on their dequantized weights "
            "with the activation rounding emulated (the evaluated numbers, no int8 kernel; recorded in the "
            "manifest), or quantize without the vision encoder"
        )
    return names


def export_graphs(
    model: nn.Module,
    w4a8_kernel: W4A8Kernel = "int8",
    float_convs: bool = False,
    cost_model: dict[str, Any] | None = None,
) -> tuple[dict[str, onnx.ModelProto], list]:
    """The three graphs of a ReferenceVLA (left untouched: a lowered copy is exported) and the layer plans.

    ``float_convs``: see ``check_convs`` (quantized convs are an error unless allowed). ``cost_model``: see
    ``lowering.lower_model_`` (per layer, the integer kernel only where it measured faster than fp32)."""
    check_convs(model, float_convs)
    lowered = copy.deepcopy(model).eval()
    plans = lower_model_(lowered, w4a8_kernel, cost_model)
    ex = _example_inputs(lowered)
    batch = {0: "batch"}
    graphs = {
        "language": export_onnx(
            lowered.language,
            (ex["tokens"]["input_ids"], ex["tokens"]["attention_mask"]),
            ["input_ids", "attention_mask"],
            ["language_features"],
            {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
        ),
        "condition": export_onnx(
            _Condition(lowered),
            (ex["image"], ex["state"], ex["language_features"], ex["language_mask"]),
            ["image", "state", "language_features", "language_mask"],
            ["z"],
            {
                "image": batch,
                "state": batch,
                "language_features": {0: "batch", 1: "tokens"},
                "language_mask": {0: "batch", 1: "tokens"},
            },
        ),
        "denoiser": export_onnx(
            lowered.head,
            (ex["noisy"], ex["t"], ex["z"]),
            ["noisy_actions", "t", "z"],
            ["epsilon"],
            {"noisy_actions": batch, "t": batch, "z": batch},
        ),
    }
    return graphs, plans


def measure_policy_costs(policy: Any, w4a8_kernel: W4A8Kernel = "int8", threads: int = 1) -> dict[str, Any]:
    """``measure_lowered_costs`` at the rows each layer sees in one ``predict_chunk`` of the policy."""
    import numpy as np

    from daptq.deploy.lowering import measure_lowered_costs
    from daptq.quant.kernels import record_layer_rows

    model = policy.model
    c = model.config
    ex = _example_inputs(model)
    batch = {
        "image": torch.zeros((1, *c.image_shape), dtype=torch.uint8),
        "state": torch.from_numpy(np.zeros((1, c.state_dim), np.float32)),
        "language_features": ex["language_features"],
        "language_mask": ex["language_mask"],
    }
    rows = record_layer_rows(model, lambda: policy.predict_chunk(batch, generator=torch.Generator()))
    return measure_lowered_costs(model, rows, w4a8_kernel, threads)


def graph_layer_plans(plans: Sequence[LayerPlan]) -> dict[str, list[dict[str, Any]]]:
    by_graph: dict[str, list[dict[str, Any]]] = {g: [] for g in GRAPHS}
    for p in plans:
        graph = (
            "language"
            if p.name.startswith("language.")
            else "denoiser"
            if p.name.startswith("head.")
            else "condition"
        )
        by_graph[graph].append(p.to_dict())
    return by_graph


def export_reference_policy(
    policy: Any,
    out: str | Path,
    w4a8_kernel: W4A8Kernel = "int8",
    source: str | None = None,
    overwrite: bool = False,
    float_convs: bool = False,
    cost_model: dict[str, Any] | str | None = None,
    threads: int = 1,
) -> Path:
    """Write ``OUT/{language,condition,denoiser}.onnx`` + ``manifest.json`` for a ReferencePolicy.

    The directory is assembled in a temporary sibling and renamed into place, so ``OUT`` is either absent
    or complete. Load it with ``daptq.deploy.OnnxPolicy(OUT)`` or the model spec ``onnx:OUT``.
    ``cost_model="measure"``: time each integer-kernel layer against fp32 on this machine at ``threads``
    (``lowering.measure_lowered_costs``, rows from one policy call) and keep the integer kernel only where it
    pays; a dict of ``LayerCost`` by layer name gives the table instead. Decisions are in the manifest.
    """
    out = Path(out)
    check_export_out(out, overwrite, [] if source is None else [source])
    model = policy.model
    if cost_model == "measure":
        cost_model = measure_policy_costs(policy, w4a8_kernel, threads)
    graphs, plans = export_graphs(model, w4a8_kernel, float_convs, cost_model)

    def build(tmp: Path) -> None:
        digests = {}
        for name, graph in graphs.items():
            data = graph.SerializeToString()
            atomic_write_bytes(tmp / f"{name}.onnx", data)
            digests[f"{name}.onnx"] = hashlib.sha256(data).hexdigest()
        manifest = {
            "version": MANIFEST_VERSION,
            "format": MANIFEST_FORMAT,
            "source": source,
            "model": model.config.to_dict(),
            "state_stats": {
                "mean": model.state_mean.tolist(),
                "std": model.state_std.tolist(),
            },
            "action_space": policy.action_space.to_dict(),
            "w4a8_kernel": w4a8_kernel,
            "float_convs": quantized_convs(model),  # quantized convs run as fp32 (see check_convs)
            "layers": graph_layer_plans(plans),
            "sha256": digests,
            "opset": OPSET,
            "ir_version": IR_VERSION,
        }
        validate_manifest(manifest, tmp / MANIFEST)  # never write what the reader would refuse
        atomic_write_json(tmp / MANIFEST, signed(manifest))  # last

    return write_directory(
        out, build, lambda t: check_export_out(t, overwrite, [] if source is None else [source])
    )


def check_export_out(out: str | Path, overwrite: bool, sources: Sequence[str] = ()) -> None:
    """Raise unless ``out`` may receive an export: absent, empty, or (with ``overwrite``) an earlier export
    daptq wrote; never one of the ``sources`` being exported."""
    from daptq.models.quantized import check_not_a_source

    out = Path(out)
    recover_directory(out)
    check_not_a_source(out, sources, "its ONNX export")
    if not os.path.lexists(out):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace an earlier export"
        )
    check_daptq_directory(
        out,
        MANIFEST,
        MANIFEST_FORMAT,
        EXPORT_FILES,
        "an ONNX export",
        "; --overwrite replaces only a directory written by `daptq export`",
    )


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export, its content checksum verified and every field validated (nothing that
    depends on a field is allocated before this returns)."""
    directory = Path(directory)
    if not directory.is_dir():
        recover_directory(directory)  # an export killed while swapping directories: the previous one is back
    path = directory / MANIFEST
    if not directory.is_dir():
        raise FileNotFoundError(
            f"ONNX export directory not found: {directory}{describe_leftovers(directory)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a directory written by `daptq export`")
    try:
        manifest = loads_json_strict(path.read_text(encoding="utf-8"))  # a duplicate key is an error
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: manifest version {manifest.get('version')!r} is not supported (this daptq reads "
            f"{MANIFEST_VERSION}; export the policy again with `daptq export`)"
        )
    check_signed(manifest, path)
    validate_manifest(manifest, path)
    return manifest


# Upper limits of the manifest's sizes: far above any policy daptq exports, low enough that a forged field
# cannot make the runtime allocate gigabytes (chunk_size 1e9 once grew a process to 23.7 GB).
MANIFEST_LIMITS = {
    "image_size": 1024,
    "vision_blocks": 64,
    "max_language_tokens": 512,
    "state_dim": 1024,
    "action_dim": 64,
    "d_model": 8192,
    "n_layer": 128,
    "n_head": 128,
    "dit_d_model": 8192,
    "dit_n_layer": 128,
    "dit_n_head": 128,
    "chunk_size": 1024,
    "n_action_steps": 1024,
    "num_train_timesteps": 10_000,
    "num_inference_steps": 1000,
    "version": 1000,
}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIM_KINDS = ("translation", "rotation", "gripper", "joint")


def _finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_manifest(manifest: dict[str, Any], path: str | Path) -> None:
    """Every field a reader acts on, with a message naming the field (ValueError)."""

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{path}: manifest field {field!r} {why}")

    model = manifest.get("model")
    if not isinstance(model, dict):
        raise bad("model", "must be an object (the model config)")
    for key, limit in MANIFEST_LIMITS.items():
        value = model.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise bad(f"model.{key}", f"must be an integer in [1, {limit}], got {value!r}")
    c = model
    if c["n_action_steps"] > c["chunk_size"]:
        raise bad(
            "model.n_action_steps", f"must be <= chunk_size={c['chunk_size']}, got {c['n_action_steps']}"
        )
    if c["num_inference_steps"] > c["num_train_timesteps"]:
        raise bad("model.num_inference_steps", f"must be <= num_train_timesteps={c['num_train_timesteps']}")
    if c["image_size"] % 16:
        raise bad("model.image_size", f"must be a multiple of 16, got {c['image_size']}")
    if not isinstance(c.get("camera"), str) or not c["camera"]:
        raise bad("model.camera", f"must be a non-empty string, got {c.get('camera')!r}")
    unknown = set(c) - {*MANIFEST_LIMITS, "camera"}
    if unknown:
        raise bad("model", f"has unknown keys {sorted(unknown)}")
    space = manifest.get("action_space")
    if not isinstance(space, dict):
        raise bad("action_space", f"must be an object, got {type(space).__name__}")
    names, kinds = space.get("names"), space.get("kinds")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise bad("action_space.names", "must be a list of non-empty strings")
    if len(names) != c["action_dim"]:
        raise bad("action_space.names", f"has {len(names)} names for action_dim={c['action_dim']}")
    if not isinstance(kinds, list) or len(kinds) != len(names) or not all(k in _DIM_KINDS for k in kinds):
        raise bad("action_space.kinds", f"must list one of {_DIM_KINDS} per action dimension")
    if space.get("control", "delta-eef") not in ("delta-eef", "joint"):
        raise bad("action_space.control", f"must be 'delta-eef' or 'joint', got {space.get('control')!r}")
    low, high = space.get("low"), space.get("high")
    if not (_finite_number(low) and _finite_number(high) and low < high):
        raise bad("action_space.low/high", f"must be finite numbers with low < high, got {low!r}, {high!r}")
    unknown = set(space) - {"names", "kinds", "control", "low", "high"}
    if unknown:
        raise bad("action_space", f"has unknown keys {sorted(unknown)}")
    stats = manifest.get("state_stats")
    if not isinstance(stats, dict) or set(stats) != {"mean", "std"}:
        raise bad("state_stats", "must be an object with 'mean' and 'std'")
    for key in ("mean", "std"):
        v = stats[key]
        if not isinstance(v, list) or len(v) != c["state_dim"] or not all(_finite_number(x) for x in v):
            raise bad(f"state_stats.{key}", f"must be {c['state_dim']} finite numbers")
    if not all(x > 0 for x in stats["std"]):
        raise bad("state_stats.std", "must be positive")
    digests = manifest.get("sha256")
    expected = {f"{g}.onnx" for g in GRAPHS}
    if not isinstance(digests, dict) or set(digests) != expected:
        raise bad("sha256", f"must give the sha256 of exactly {sorted(expected)}")
    if not all(isinstance(d, str) and _HEX64.match(d) for d in digests.values()):
        raise bad("sha256", "must hold 64-digit lowercase hex digests")
    if manifest.get("w4a8_kernel") not in ("int8", "emulate"):
        raise bad("w4a8_kernel", f"must be 'int8' or 'emulate', got {manifest.get('w4a8_kernel')!r}")
    convs = manifest.get("float_convs")
    if not isinstance(convs, list) or not all(isinstance(n, str) for n in convs):
        raise bad("float_convs", "must be a list of layer names")
    if manifest.get("source") is not None and not isinstance(manifest.get("source"), str):
        raise bad("source", "must be a string or null")
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not set(layers) <= set(GRAPHS):
        raise bad("layers", f"must map graph names {GRAPHS} to layer plans")
    if not all(isinstance(v, list) and all(isinstance(p, dict) for p in v) for v in layers.values()):
        raise bad("layers", "must hold a list of layer plans per graph")
    if manifest.get("opset") != OPSET or manifest.get("ir_version") != IR_VERSION:
        raise bad("opset/ir_version", f"must be {OPSET}/{IR_VERSION} (what this daptq writes and runs)")
    known = {
        "version", "format", "source", "model", "state_stats", "action_space", "w4a8_kernel", "float_convs",
        "layers", "sha256", "opset", "ir_version", "content_sha256",
    }  # fmt: skip
    unknown = set(manifest) - known
    if unknown:
        raise bad("(top level)", f"has unknown keys {sorted(unknown)}")


def export_policy(
    spec: str,
    out: str | Path,
    fmt: str = "onnx",
    w4a8_kernel: W4A8Kernel = "int8",
    overwrite: bool = False,
    float_convs: bool = False,
) -> Path:
    """``daptq export``: load a model spec (``ref:<name>`` or a quantized policy directory) and export it."""
    if fmt != "onnx":
        raise ValueError(f"export format must be 'onnx', got {fmt!r}")
    from daptq.deploy import flow_export  # pi0 / pi0.5 (lerobot:, or their quantized directories)
    from daptq.models.reference import ReferencePolicy
    from daptq.models.registry import load_policy

    if flow_export.is_flow_export(out):
        flow_export.check_flow_out(out, overwrite, [spec])
    else:
        check_export_out(out, overwrite, [spec])  # before loading: never replace the source or a foreign dir
    policy = load_policy(spec)
    if flow_export.is_flow_policy(policy):
        return flow_export.export_flow_policy(
            policy, out, w4a8_kernel=w4a8_kernel, source=spec, overwrite=overwrite, float_convs=float_convs
        )
    if not isinstance(policy, ReferencePolicy):
        raise ValueError(
            f"{spec}: only reference-VLA and lerobot pi0 / pi0.5 policies export to ONNX, got "
            f"{type(policy).__name__}"
        )
    return export_reference_policy(
        policy, out, w4a8_kernel, source=spec, overwrite=overwrite, float_convs=float_convs
    )
