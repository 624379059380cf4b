"""ONNX export of lerobot's flow-matching VLAs (pi0 / pi0.5) and their ONNX Runtime sampler.

A (fake-)quantized or float pi0 / pi0.5 network becomes two graphs (``daptq.models.lerobot_vla.export_graph``
holds the family's side):

- ``prefix.onnx``: (images, image_masks, lang_tokens, lang_masks) -> (keys, values, prefix_pad), the
  PaliGemma pass that leaves every layer's KV cache, run once per call;
- ``step.onnx`` (``loop="steps"``, the default): one Euler step's expert, (keys, values, prefix_pad, state,
  x_t, t) -> velocity, which the runtime calls ``num_steps`` times (x <- x + dt v, t from 1 to 0); or
  ``sampler.onnx`` (``loop="unrolled"``): the whole loop unrolled in one graph, (..., noise) -> actions.

Why ``steps`` is the default (measured, ``benchmarks/family_speed.py``, docs/deployment.md): the two run the
same kernels and their latency is the same within noise at realistic width, while the one-step graph is
``num_steps`` times smaller to build and export, serves any number of steps, and lets a caller stop early.

Quantized layers are lowered exactly as for the reference VLA (``daptq.deploy.lowering``): 4-bit weights
as ``MatMulNBits`` (int8 activations inside the kernel with ``w4a8_kernel="int8"``, accuracy_level 4; or
daptq's per-token rounding emulated, fp32, with ``"emulate"``), W8A8 as ``MatMulInteger``. Graphs are IR 10,
opset 17 (+ com.microsoft 1), as ``daptq.deploy.export`` writes them. ``manifest.json`` (format
``daptq-onnx-flow``, written last, checksummed) records the config, the loop, the per-layer plan and every
graph's sha256; ``FlowOnnxSampler`` refuses an edited manifest or graph and inputs of the wrong shape or type,
naming them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from daptq.atomic import atomic_write_bytes, atomic_write_json, recover_directory, write_directory
from daptq.deploy.export import IR_VERSION, OPSET, check_convs, export_onnx
from daptq.deploy.lowering import LayerPlan, W4A8Kernel, lower_model_
from daptq.integrity import check_daptq_directory, check_signed, signed
from daptq.models.adapter import PolicyInfo
from daptq.models.lerobot_vla import export_graph as eg
from daptq.models.policy import ChunkedPolicy
from daptq.strict_parse import loads_json_strict

MANIFEST = "manifest.json"
FLOW_FORMAT = "daptq-onnx-flow"
FLOW_VERSION = 1
LOOPS = ("steps", "unrolled")
LOOP_GRAPH = {"steps": "step", "unrolled": "sampler"}
TOKENIZER_DIR = "tokenizer"  # the prompt tokenizer's files (closed loop: FlowOnnxPolicy)
FLOW_FILES = (MANIFEST, "prefix.onnx", "step.onnx", "sampler.onnx", TOKENIZER_DIR)
PREFIX_MODULE = "paligemma_with_expert.paligemma."  # layers under it run in prefix.onnx, the rest per step


def _model_of(policy_or_model: Any) -> nn.Module:
    return policy_or_model.model if hasattr(policy_or_model, "adapter") else policy_or_model


def export_flow_graphs(
    model: nn.Module,
    loop: str = "steps",
    w4a8_kernel: W4A8Kernel = "int8",
    float_convs: bool = False,
) -> tuple[dict[str, Any], list[LayerPlan]]:
    """The prefix graph and the step (or unrolled sampler) graph of a pi0 / pi0.5 network (left untouched:
    a lowered copy is exported) and the plan of every lowered layer."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {list(LOOPS)}, got {loop!r}")
    config = eg.check_exportable(model)
    check_convs(model, float_convs)
    lowered = copy.deepcopy(model).eval()
    plans = lower_model_(lowered, w4a8_kernel)
    ex = eg.example_inputs(config)
    prefix = eg.PrefixGraph(lowered)
    with torch.no_grad():
        keys, values, pad = prefix(*(ex[n] for n in eg.PREFIX_INPUTS))
    cache = {"keys": keys, "values": values, "prefix_pad": pad}
    graphs = {
        "prefix": export_onnx(
            prefix,
            tuple(ex[n] for n in eg.PREFIX_INPUTS),
            eg.PREFIX_INPUTS,
            eg.PREFIX_OUTPUTS,
            eg.dynamic_axes(eg.PREFIX_INPUTS + eg.PREFIX_OUTPUTS),
        )
    }
    if loop == "steps":
        inputs = {**cache, "state": ex["state"], "x_t": ex["noise"], "t": ex["t"]}
        graphs["step"] = export_onnx(
            eg.StepGraph(lowered),
            tuple(inputs[n] for n in eg.STEP_INPUTS),
            eg.STEP_INPUTS,
            ("velocity",),
            eg.dynamic_axes((*eg.STEP_INPUTS, "velocity")),
        )
    else:
        inputs = {**cache, "state": ex["state"], "noise": ex["noise"]}
        graphs["sampler"] = export_onnx(
            eg.SamplerGraph(lowered, config.num_steps),
            tuple(inputs[n] for n in eg.SAMPLER_INPUTS),
            eg.SAMPLER_INPUTS,
            ("actions",),
            eg.dynamic_axes((*eg.SAMPLER_INPUTS, "actions")),
        )
    return graphs, plans


def _layer_plans(plans: Sequence[LayerPlan], loop: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"prefix": [], LOOP_GRAPH[loop]: []}
    for p in plans:
        out["prefix" if p.name.startswith(PREFIX_MODULE) else LOOP_GRAPH[loop]].append(p.to_dict())
    return out


def check_flow_out(out: str | Path, overwrite: bool, sources: Sequence[str] = ()) -> None:
    """Raise unless ``out`` may receive a flow export: absent, empty, or (with ``overwrite``) an earlier flow
    export; never one of the ``sources``."""
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
        FLOW_FORMAT,
        FLOW_FILES,
        "an ONNX export",
        "; --overwrite replaces only a directory written by `daptq export`",
    )


def export_flow_policy(
    policy: Any,
    out: str | Path,
    loop: str = "steps",
    w4a8_kernel: W4A8Kernel = "int8",
    source: str | None = None,
    overwrite: bool = False,
    float_convs: bool = False,
) -> Path:
    """Write ``OUT/prefix.onnx``, ``OUT/step.onnx`` (or ``sampler.onnx``) and ``manifest.json`` for a pi0 /
    pi0.5 ``LeRobotVLAPolicy`` (or its network). Assembled in a hidden sibling and renamed into place, so
    ``OUT`` is absent or complete. Run it with ``FlowOnnxSampler(OUT)``."""
    out = Path(out)
    check_flow_out(out, overwrite, [] if source is None else [source])
    model = _model_of(policy)
    graphs, plans = export_flow_graphs(model, loop, w4a8_kernel, float_convs)
    from daptq.deploy.export import quantized_convs

    adapter = getattr(policy, "adapter", None)
    closed_loop = adapter is not None and adapter.tokenizer is not None and adapter.statistics is not None

    def build(tmp: Path) -> None:
        digests = {}
        for name, graph in graphs.items():
            data = graph.SerializeToString()
            atomic_write_bytes(tmp / f"{name}.onnx", data)
            digests[f"{name}.onnx"] = hashlib.sha256(data).hexdigest()
        extra: dict[str, Any] = {}
        if closed_loop:  # what FlowOnnxPolicy needs besides the graphs: prompt tokenizer, statistics
            adapter.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            extra["policy"] = {
                "n_action_steps": int(getattr(policy, "n_action_steps", model.config.n_action_steps)),
                "statistics": adapter.statistics.to_dict(),
                "tokenizer_sha256": _tree_digests(tmp / TOKENIZER_DIR),
            }
        manifest = {
            "version": FLOW_VERSION,
            "format": FLOW_FORMAT,
            "source": source,
            "model": model.config.to_dict(),
            "loop": loop,
            "w4a8_kernel": w4a8_kernel,
            "float_convs": quantized_convs(model),
            "layers": _layer_plans(plans, loop),
            "sha256": digests,
            "opset": OPSET,
            "ir_version": IR_VERSION,
            **extra,
        }
        validate_flow_manifest(manifest, tmp / MANIFEST)
        atomic_write_json(tmp / MANIFEST, signed(manifest))  # last

    return write_directory(
        out, build, lambda t: check_flow_out(t, overwrite, [] if source is None else [source])
    )


def _tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def is_flow_export(directory: str | Path) -> bool:
    """Whether ``directory`` holds a manifest of this format (cheap; nothing is validated)."""
    path = Path(directory) / MANIFEST
    try:
        return FLOW_FORMAT in path.read_text(encoding="utf-8")[:4096]
    except (OSError, UnicodeDecodeError):
        return False


def read_flow_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a flow export, its checksum verified and its fields validated."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a directory written by `daptq export`")
    try:
        manifest = loads_json_strict(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FLOW_FORMAT:
        raise ValueError(f"{path}: not a {FLOW_FORMAT} manifest")
    if manifest.get("version") != FLOW_VERSION:
        raise ValueError(
            f"{path}: manifest version {manifest.get('version')!r} is not supported (this daptq reads "
            f"{FLOW_VERSION}; export the policy again)"
        )
    check_signed(manifest, path)
    validate_flow_manifest(manifest, path)
    return manifest


def validate_flow_manifest(manifest: Mapping[str, Any], path: str | Path) -> None:
    """Every field the sampler acts on, with a message naming the field (ValueError)."""

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{path}: manifest field {field!r} {why}")

    try:
        config = eg.config_from_dict(manifest.get("model") or {})
    except (TypeError, ValueError) as e:
        raise bad("model", f"is not a lerobot VLA config ({e})") from None
    if config.type not in eg.EXPORTABLE_TYPES:
        raise bad("model.type", f"must be one of {list(eg.EXPORTABLE_TYPES)}, got {config.type!r}")
    if not 1 <= config.num_steps <= 1000 or not 1 <= config.chunk_size <= 1024:
        raise bad("model", "num_steps must be in [1, 1000] and chunk_size in [1, 1024]")
    loop = manifest.get("loop")
    if loop not in LOOPS:
        raise bad("loop", f"must be one of {list(LOOPS)}, got {loop!r}")
    expected = {"prefix.onnx", f"{LOOP_GRAPH[loop]}.onnx"}
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or set(digests) != expected:
        raise bad("sha256", f"must give the sha256 of exactly {sorted(expected)}")
    if not all(isinstance(d, str) and len(d) == 64 for d in digests.values()):
        raise bad("sha256", "must hold 64-digit hex digests")
    if manifest.get("w4a8_kernel") not in ("int8", "emulate"):
        raise bad("w4a8_kernel", f"must be 'int8' or 'emulate', got {manifest.get('w4a8_kernel')!r}")
    if manifest.get("opset") != OPSET or manifest.get("ir_version") != IR_VERSION:
        raise bad("opset/ir_version", f"must be {OPSET}/{IR_VERSION}")
    known = {
        "version", "format", "source", "model", "loop", "w4a8_kernel", "float_convs", "layers", "sha256",
        "opset", "ir_version", "content_sha256", "policy",
    }  # fmt: skip
    unknown = set(manifest) - known
    if unknown:
        raise bad("(top level)", f"has unknown keys {sorted(unknown)}")
    policy = manifest.get("policy")
    if policy is not None:
        if not isinstance(policy, dict) or set(policy) != {
            "n_action_steps",
            "statistics",
            "tokenizer_sha256",
        }:
            raise bad("policy", "must hold n_action_steps, statistics and tokenizer_sha256")
        steps = policy["n_action_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= config.chunk_size:
            raise bad(
                "policy.n_action_steps", f"must be an integer in [1, {config.chunk_size}], got {steps!r}"
            )
        stats = policy["statistics"]
        if not isinstance(stats, dict) or not isinstance(stats.get("stats"), dict):
            raise bad("policy.statistics", "must be an object with 'modes' and 'stats'")
        if not isinstance(stats.get("modes"), dict):
            raise bad("policy.statistics.modes", "must be an object")
        tok = policy["tokenizer_sha256"]
        if not isinstance(tok, dict) or not tok or not all(isinstance(v, str) for v in tok.values()):
            raise bad("policy.tokenizer_sha256", "must map the tokenizer's files to their sha256")


class FlowOnnxSampler:
    """A flow export on ONNX Runtime: the prefix once, then the Euler loop (``num_steps`` calls of the step
    graph, or the unrolled sampler), from the same noise the PyTorch adapter draws."""

    def __init__(self, directory: str | Path, threads: int = 1) -> None:
        from daptq.deploy.runtime import check_threads, make_session

        self.directory = Path(directory)
        self.manifest = read_flow_manifest(self.directory)
        self.config = eg.config_from_dict(self.manifest["model"])
        self.loop = self.manifest["loop"]
        self.threads = check_threads(threads)
        self.sessions = {
            name: make_session(self._read_checked(name), self.threads)
            for name in ("prefix", LOOP_GRAPH[self.loop])
        }
        # pi0.5 reads the state through the prompt only, so its step graph has no ``state`` input
        self._inputs = {n: {i.name for i in s.get_inputs()} for n, s in self.sessions.items()}

    def _read_checked(self, name: str) -> bytes:
        path = self.directory / f"{name}.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory}: {path.name} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["sha256"][path.name]:
            raise ValueError(f"{path}: sha256 does not match the manifest; the export is corrupt or edited")
        return data

    def _checked_inputs(self, batch: Mapping[str, Any], noise: Any) -> dict[str, np.ndarray]:
        """The model inputs as the graphs take them; a ValueError naming any missing or mis-shaped one."""
        c = self.config
        missing = [k for k in (*eg.PREFIX_INPUTS, "state") if k not in batch]
        if missing:
            raise ValueError(
                f"flow ONNX sampler: batch is missing {missing} (has {sorted(batch)}); build it with the "
                "adapter's model_inputs()"
            )
        arr = {k: np.asarray(torch.as_tensor(batch[k]).detach().cpu()) for k in (*eg.PREFIX_INPUTS, "state")}
        arr["noise"] = np.asarray(torch.as_tensor(noise).detach().cpu())
        b = arr["images"].shape[0] if arr["images"].ndim else -1
        cams = max(1, len(c.camera_keys))
        want = {
            "images": ((b, cams, 3, c.image_size, c.image_size), np.float32),
            "image_masks": ((b, cams), np.bool_),
            "lang_tokens": ((b, None), np.int64),
            "lang_masks": ((b, None), np.bool_),
            "state": ((b, c.max_state_dim), np.float32),
            "noise": ((b, c.chunk_size, c.max_action_dim), np.float32),
        }
        for name, (shape, dtype) in want.items():
            a = arr[name]
            ok = a.ndim == len(shape) and all(
                s is None or s == d for s, d in zip(shape, a.shape, strict=True)
            )
            if name == "lang_masks" and ok:
                ok = a.shape == arr["lang_tokens"].shape
            if not ok or b < 1:
                expect = "x".join("L" if s is None else str(s) for s in shape)
                raise ValueError(
                    f"flow ONNX sampler: input {name!r} has shape {tuple(a.shape)}, expected ({expect}) "
                    f"for this {c.type} export ({self.directory})"
                )
            if dtype is np.float32 and not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"flow ONNX sampler: input {name!r} must be floating, got {a.dtype}")
            if dtype is not np.float32 and a.dtype != dtype and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(
                    f"flow ONNX sampler: input {name!r} must be {np.dtype(dtype)}, got {a.dtype}"
                )
            arr[name] = a.astype(dtype, copy=False)
            if dtype is np.float32 and not np.isfinite(arr[name]).all():
                raise ValueError(f"flow ONNX sampler: input {name!r} holds NaN or infinite values")
        return arr

    def sample(self, batch: Mapping[str, Any], noise: Any) -> np.ndarray:
        """The normalized chunk (B, K, max_action_dim) from ``noise``, as ``sample_actions`` gives it."""
        a = self._checked_inputs(batch, noise)
        keys, values, pad = self.sessions["prefix"].run(None, {n: a[n] for n in eg.PREFIX_INPUTS})
        cache = {"keys": keys, "values": values, "prefix_pad": pad, "state": a["state"]}
        graph = LOOP_GRAPH[self.loop]
        cache = {k: v for k, v in cache.items() if k in self._inputs[graph]}
        if self.loop == "unrolled":
            return self.sessions["sampler"].run(None, {**cache, "noise": a["noise"]})[0]
        steps = self.config.num_steps
        dt = np.float32(-1.0 / steps)
        x = a["noise"]
        step = self.sessions["step"]
        for i in range(steps):
            t = np.full((x.shape[0],), 1.0 + i * (-1.0 / steps), dtype=np.float32)
            x = x + dt * step.run(None, {**cache, "x_t": x, "t": t})[0]
        return x

    def predict_chunk(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The chunk (B, K, action_dim) from noise drawn as ``LeRobotVLAAdapter.sample`` draws it (same
        generator, same numbers)."""
        c = self.config
        b = int(torch.as_tensor(batch["images"]).shape[0]) if "images" in batch else 0
        noise = torch.randn((b, c.chunk_size, c.max_action_dim), generator=generator)
        return torch.from_numpy(self.sample(batch, noise))[..., : c.action_dim]


def is_flow_policy(policy: Any) -> bool:
    """Whether ``daptq export`` sends ``policy`` here: a lerobot VLA policy (SmolVLA is then refused with
    its reason by ``export_flow_graphs``)."""
    from daptq.models.lerobot_vla.policy import LeRobotVLAPolicy

    return isinstance(policy, LeRobotVLAPolicy)


class FlowOnnxPolicy(ChunkedPolicy):
    """A flow export as a closed-loop policy (``onnx:DIR``): the prompt, image and state preprocessing of
    ``LeRobotVLAPolicy`` (same tokenizer, statistics and resizing), the chunk from ``FlowOnnxSampler`` with
    the noise the PyTorch policy draws from the same generator, un-normalized with the same statistics."""

    def __init__(self, directory: str | Path, threads: int = 1) -> None:
        from daptq.models.lerobot_vla.adapter import LeRobotVLAAdapter, action_space_for
        from daptq.models.lerobot_vla.checkpoint import Statistics
        from daptq.models.lerobot_vla.policy import load_tokenizer

        self.sampler = FlowOnnxSampler(directory, threads)
        self.directory, self.manifest, self.config = (
            self.sampler.directory,
            self.sampler.manifest,
            self.sampler.config,
        )
        block = self.manifest.get("policy")
        if block is None:
            raise ValueError(
                f"{self.directory}: exported from a bare network (no tokenizer or statistics); export the "
                "policy (`daptq export lerobot:PATH` or its quantized directory) to run it in closed loop"
            )
        tok_dir = self.directory / TOKENIZER_DIR
        if _tree_digests(tok_dir) != block["tokenizer_sha256"]:
            raise ValueError(f"{tok_dir}: tokenizer files do not match the manifest; the export is edited")
        raw = block["statistics"]
        self.statistics = Statistics(
            {f: {k: torch.tensor(v) for k, v in s.items()} for f, s in raw["stats"].items()},
            dict(raw["modes"]),
            str(self.directory / MANIFEST),
        )
        # preprocessing only: the adapter's model_inputs reads the config, tokenizer and statistics
        self._inputs = LeRobotVLAAdapter(_ConfigOnly(self.config), load_tokenizer(tok_dir), self.statistics)
        super().__init__(action_space_for(self.config), block["n_action_steps"])
        self.threads = self.sampler.threads

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def predict_chunk(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.sampler.predict_chunk(batch, generator)

    def chunk_for_observation(self, observation: Mapping[str, Any], generator: torch.Generator) -> np.ndarray:
        for key in ("image", "instruction", "state"):
            if key not in observation:
                raise ValueError(f"observation is missing {key!r} (has {sorted(observation)})")
        batch = self._inputs.model_inputs(
            np.asarray(observation["image"])[None],
            [observation["instruction"]],
            np.asarray(observation["state"])[None],
        )
        chunk = self.sampler.predict_chunk(batch, generator)[0]
        return self.statistics.unnormalize(chunk.float(), "action", "ACTION").numpy()

    def info(self) -> PolicyInfo:
        """Its digest covers the manifest, which holds the sha256 of every graph and tokenizer file."""
        manifest = json.dumps(self.manifest, sort_keys=True, default=repr).encode()
        return PolicyInfo(
            digest=hashlib.sha256(manifest).hexdigest(),
            image_size=self.config.image_size,
            recipe={"deployment": "onnx", "loop": self.sampler.loop, "threads": self.threads},
        )


class _ConfigOnly:
    """Stands in for the network where only its ``config`` is read (preprocessing)."""

    def __init__(self, config: Any) -> None:
        self.config = config
