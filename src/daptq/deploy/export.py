"""Export a (fake-)quantized reference VLA as ONNX Runtime graphs that run daptq's own codes and scales.

Three graphs, written with the TorchScript exporter (``dynamo=False``; the dynamo exporter needs onnxscript)
after every fake-quant layer was swapped for its lowered module (``daptq.deploy.lowering``):

- ``language.onnx``: MiniLM (input_ids, attention_mask) -> token features; the runtime calls it once per
  instruction and caches the result, as the PyTorch policy does.
- ``condition.onnx``: (image uint8, state, language_features, language_mask) -> z: EfficientNet convs,
  the projections and the backbone.
- ``denoiser.onnx``: (noisy chunk, t, z) -> epsilon: the DiT action head.

``manifest.json`` (written last) records the model config, the per-layer plan (kernel, accuracy level,
bytes), the runtime's threading default and a sha256 of every graph; a reader refuses a mismatch.
onnx 1.23 stamps IR version 14, which ONNX Runtime 1.31 rejects, so graphs are written as IR 10.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from daptq.atomic import atomic_write_bytes, atomic_write_json
from daptq.deploy.lowering import LayerPlan, W4A8Kernel, lower_model_
from daptq.quant import QuantConv2d

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
GRAPHS = ("language", "condition", "denoiser")
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
    model: nn.Module, w4a8_kernel: W4A8Kernel = "int8", float_convs: bool = False
) -> tuple[dict[str, onnx.ModelProto], list]:
    """The three graphs of a ReferenceVLA (left untouched: a lowered copy is exported) and the layer plans.

    ``float_convs``: see ``check_convs`` (quantized convs are an error unless allowed)."""
    check_convs(model, float_convs)
    lowered = copy.deepcopy(model).eval()
    plans = lower_model_(lowered, w4a8_kernel)
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
) -> Path:
    """Write ``OUT/{language,condition,denoiser}.onnx`` + ``manifest.json`` for a ReferencePolicy.

    The directory is assembled in a temporary sibling and renamed into place, so ``OUT`` is either absent
    or complete. Load it with ``daptq.deploy.OnnxPolicy(OUT)`` or the model spec ``onnx:OUT``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    model = policy.model
    graphs, plans = export_graphs(model, w4a8_kernel, float_convs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the export is an ordinary directory
    try:
        digests = {}
        for name, graph in graphs.items():
            data = graph.SerializeToString()
            atomic_write_bytes(tmp / f"{name}.onnx", data)
            digests[f"{name}.onnx"] = hashlib.sha256(data).hexdigest()
        manifest = {
            "version": MANIFEST_VERSION,
            "format": "daptq-onnx",
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
        atomic_write_json(tmp / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a directory written by `daptq export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if manifest.get("format") != "daptq-onnx" or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: not a daptq-onnx manifest of version {MANIFEST_VERSION}")
    return manifest


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
    from daptq.models.reference import ReferencePolicy
    from daptq.models.registry import load_policy

    policy = load_policy(spec)
    if not isinstance(policy, ReferencePolicy):
        raise ValueError(f"{spec}: only reference-VLA policies export to ONNX, got {type(policy).__name__}")
    return export_reference_policy(
        policy, out, w4a8_kernel, source=spec, overwrite=overwrite, float_convs=float_convs
    )
