"""`daptq bench`: latency per policy call and per action, peak memory and weight bytes of the policies a user
names, measured in one run with ratios to the first row.

Every row runs in its own worker process (so its peak resident memory is its own) and the parent drives
them round-robin: each round asks every worker for a few timed calls in turn, so a noisy neighbour slows all
rows alike and ratios stay meaningful. Per executed action is a call divided by ``n_action_steps`` (the
policy re-plans every that many actions).

Each spec is measured as given (any spec ``daptq eval`` takes): ``ref:<name>`` and ``toy:...`` as one ``fp``
row, a directory written by ``daptq quantize`` as an ``as-evaluated`` row (the fake-quant model ``daptq
eval`` runs) and a ``packed`` row (``to_deployable_``: layers with a packed CPU kernel converted, the rest
kept fake-quant; left out, with a note, when no layer has one), an ``onnx:DIR`` export as one ``onnx`` row.
One call there is ``predict_chunks`` on one observation at batch 1, what ``daptq eval`` calls (for the
reference VLA: backbone + 10 DDIM denoiser steps; the instruction's language features are cached, as in
closed loop). So ``daptq bench ref:metaworld-mt10 runs/daptq-w4a8 onnx:runs/daptq-w4a8-onnx`` compares the
FP model, the user's quantized policy and its export.

``--variants`` instead measures daptq's own recipes of a base model (``ref:<name>`` or ``cogact-d2048``, the
reference architecture at CogACT's width with random weights: latency does not depend on weight values),
one call being ``predict_chunk`` on a prepared batch, ratios to the same model's first variant:

- ``torch-fp32``, ``torch-bf16`` (CPU autocast), ``torch-w4a8-fake`` (the fake-quant model daptq evaluates);
- ``torch-w4-packed`` (daptq's int4 weight-only tinygemm kernels, bf16 activations: W4A8 has no PyTorch CPU
  kernel) eager, and ``torch-w4-packed-compile`` (``torch.compile`` of the same, if ``--compile``);
- ``ort-fp32`` and ``ort-w4a8`` (``daptq export``: MatMulNBits int4 weights, int8 activations);
- ``ort-w4a8-pc``: RTN W4A8 with per-channel weights on the same layers, exported as u8s8 ``MatMulInteger``
  (exact, MLAS' int8 rate; per-group scales do not factor out of one integer GEMM).

Other specs are measured as given in that mode too. Results go to JSON and a Markdown table. Bad options, an
unknown or unsupported spec and a worker that fails are a ``BenchError`` (a ``ValueError``: ``daptq bench``
prints it as an ``error:`` line, with the failing worker's last stderr lines, and exits 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq.quant import ActivationSpec, QuantSpec, Recipe, Rule, WeightSpec, w4a8

PROTOCOL = "@@bench "
BASE_VARIANTS = (
    "torch-fp32",
    "torch-bf16",
    "torch-w4a8-fake",
    "torch-w4-packed",
    "torch-w4-packed-compile",
    "ort-fp32",
    "ort-w4a8",
    "ort-w4a8-pc",
)
SPEC_VARIANTS = ("fp", "as-given", "as-evaluated", "packed", "onnx")  # what a spec measured as given becomes
GROUP_SIZES = (128, 64, 32)
SYNTHETIC = {  # random-weight models of the reference architecture (latency does not depend on weights)
    "toy-vla": dict(
        image_size=32, d_model=64, n_layer=2, n_head=4, dit_d_model=64, dit_n_layer=1, dit_n_head=4
    ),
    "cogact-d2048": dict(d_model=2048, n_layer=4, n_head=16, dit_d_model=768, dit_n_layer=4, dit_n_head=12),
}


SUPPORTED_SPECS = (
    "ref:<name> (a bundled reference VLA), toy or toy:<key>=<value>,... (the toy policy), a directory "
    "written by `daptq quantize`, onnx:<dir> written by `daptq export`, any other registered source "
    "(<source>:..., see daptq.sources), or a synthetic random-weight model "
    f"({', '.join(SYNTHETIC)})"
)


class BenchError(ValueError):
    """A bad option, an unsupported spec or a failing worker: one clear line, no table."""


# ---- checking what is asked (in the parent, before any worker starts) ----------------------------------
def spec_kind(spec: str) -> str:
    """'synthetic', 'reference', 'toy', 'quantized' or 'onnx' for a spec bench can measure; BenchError naming
    what is supported otherwise. Cheap: reads configs and manifests, loads no model."""
    if not isinstance(spec, str) or not spec.strip():
        raise BenchError(
            f"model spec must be a non-empty string, got {spec!r}; bench takes {SUPPORTED_SPECS}"
        )
    if spec in SYNTHETIC:
        return "synthetic"
    if spec.startswith("ref:"):
        from daptq.models.reference import CHECKPOINTS_DIR

        name = spec[len("ref:") :]
        if not name or "/" in name or name.startswith(".") or not (CHECKPOINTS_DIR / name).is_dir():
            available = sorted(p.name for p in CHECKPOINTS_DIR.iterdir() if p.is_dir())
            raise BenchError(f"no bundled reference VLA {spec!r} (available: {', '.join(available)})")
        return "reference"
    if spec == "toy" or spec.startswith("toy:"):
        from daptq.models.toy import parse_toy_spec

        try:
            parse_toy_spec(spec)
        except ValueError as err:
            raise BenchError(f"bad toy spec {spec!r}: {err}") from None
        return "toy"
    if spec.startswith("onnx:"):
        from daptq.deploy.export import read_manifest

        try:
            read_manifest(spec[len("onnx:") :])
        except (OSError, ValueError) as err:
            raise BenchError(f"cannot bench {spec!r}: {err}") from None
        return "onnx"
    from daptq.sources import available_sources

    prefix = spec.split(":", 1)[0] if ":" in spec else None
    if prefix in available_sources():  # cogact:, lerobot:, torch:, a user's: checked when its worker loads it
        return "source"
    path = Path(spec)
    if path.is_dir():
        from daptq.models.quantized import read_quantized_policy_config

        try:
            read_quantized_policy_config(path)
        except (OSError, ValueError) as err:
            raise BenchError(f"cannot bench {spec!r}: {err}") from None
        return "quantized"
    what = "a file" if path.is_file() else "not an existing directory"
    if prefix is not None and len(prefix) > 1:
        what = f"unknown source {prefix!r}; registered: {', '.join(available_sources())}"
    raise BenchError(
        f"cannot bench {spec!r} ({what}); bench takes what `daptq eval` takes: {SUPPORTED_SPECS}"
    )


def plan_rows(models: Sequence[str], variants: Sequence[str] | None) -> list[tuple[str, str]]:
    """(spec, variant) of every row, in order; ``variants`` None: each spec as given."""
    if not models:
        raise BenchError("no model spec given")
    if variants is not None:
        unknown = sorted(set(variants) - set(BASE_VARIANTS))
        if unknown or not variants:
            raise BenchError(f"unknown bench variant(s) {unknown}; known: {list(BASE_VARIANTS)}")
    rows = []
    for spec in models:
        kind = spec_kind(spec)
        if variants is not None and kind in ("synthetic", "reference"):
            rows += [(spec, v) for v in variants]
        elif kind == "quantized":
            rows += [(spec, "as-evaluated"), (spec, "packed")]
        else:
            rows.append((spec, {"onnx": "onnx", "source": "as-given"}.get(kind, "fp")))
    if len(set(rows)) != len(rows):
        raise BenchError(f"a spec is named twice: {[spec for spec in models if models.count(spec) > 1][0]!r}")
    return rows


def check_options(
    rounds: int, calls_per_round: int, warmup: int, threads: int, group_size: int, cache
) -> None:
    thread_counts = [threads] if isinstance(threads, int) else list(threads)
    if not thread_counts or len(set(thread_counts)) != len(thread_counts):
        raise BenchError(f"--threads must name distinct counts, got {threads!r}")
    for name, value, low in (
        ("--rounds", rounds, 1),
        ("--calls", calls_per_round, 1),
        ("--warmup", warmup, 0),
        *(("--threads", t, 1) for t in thread_counts),
        ("--group-size", group_size, 1),
    ):
        if type(value) is not int or value < low:
            raise BenchError(f"{name} must be an integer >= {low}, got {value!r}")
    cache = Path(cache)
    for parent in (cache, *cache.parents):
        if parent.exists() and not parent.is_dir():
            raise BenchError(f"--cache {cache}: {parent} is not a directory")


# ---- recipes ----------------------------------------------------------------------------------------------
def reference_w4a8_recipe(model: Any = None, group_size: int = 128, spec: QuantSpec | None = None) -> Recipe:
    """W4A8 RTN over the reference VLA's backbone, language projection and action head.

    The frozen encoders stay float (the paper's setting), and so do the layers no group fits (``state_proj``
    and ``head.action_in``: K=4; ``vision_proj``: K=112). Given ``model``, each layer gets the largest group
    of (``group_size``, 64, 32) that divides its input width (the DiT's K=192 takes 64); without it, one
    ``group_size`` for all.
    """
    if model is None:
        spec = spec or w4a8(group_size)
        return Recipe(
            (
                Rule("blocks.*", spec),
                Rule("language_proj", spec, "exact"),
                Rule("head.*", spec),
                Rule("head.action_in", None, "exact"),
            )
        )
    from daptq.quant import quantizable_names

    rules = []
    for name in quantizable_names(model):
        in_scope = name.startswith(("blocks.", "head.")) or name == "language_proj"
        if not in_scope or name == "head.action_in":
            continue
        k = model.get_submodule(name).weight[0].numel()
        g = next((g for g in (group_size, *GROUP_SIZES) if g <= group_size and k % g == 0), None)
        if g is not None:
            base = spec or w4a8(g)
            weight = type(base.weight)(**{**base.weight.to_dict(), "group_size": g})
            rules.append(Rule(name, QuantSpec(weight, base.activation), "exact"))
    return Recipe(tuple(rules))


def per_channel_w4a8_recipe(model: Any = None, group_size: int = 128) -> Recipe:
    """``reference_w4a8_recipe``'s layers with per-channel symmetric W4 weights (int8 per-token activations):
    what the u8s8 ``MatMulInteger`` kernel runs exactly. The same layers, so only the weight grid differs."""
    spec = QuantSpec(WeightSpec(4), ActivationSpec(8))
    rules = reference_w4a8_recipe(model, group_size).rules
    return Recipe(tuple(Rule(r.target, spec if r.spec else None, r.match) for r in rules))


def weight_only_w4(recipe: Recipe) -> Recipe:
    """The same layers and groups without activation quantization (what the packed int4 kernel runs)."""
    return Recipe(tuple(Rule(r.target, QuantSpec(r.spec.weight), r.match) for r in recipe.rules if r.spec))


# ---- building a variant (in the worker) -------------------------------------------------------------------
def base_policy(model: str):
    """A float ReferencePolicy: a bundled ``ref:`` model or a synthetic CogACT-width one."""
    import torch

    from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig
    from daptq.models.registry import load_policy

    if model in SYNTHETIC:
        torch.manual_seed(0)
        net = ReferenceVLA(ReferenceVLAConfig(**SYNTHETIC[model]))
        with torch.no_grad():
            for p in net.head.parameters():  # adaLN-Zero zeros would be a degenerate (but equal-cost) head
                p.normal_(0, 0.02)
        return ReferencePolicy(net)
    return load_policy(model)


def _observation(policy) -> dict[str, Any]:
    """One observation of the kind ``policy`` sees (an image only if it declares an image shape)."""
    rng = np.random.default_rng(0)
    obs: dict[str, Any] = {
        "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32),
        "instruction": "pick up the puck and place it at the goal",
    }
    shape = _image_shape(policy)
    if shape is not None:
        obs["image"] = rng.integers(0, 255, shape, dtype=np.uint8)
    return obs


def _image_shape(policy) -> tuple[int, ...] | None:
    """(H, W, 3), or (V, H, W, 3) for V cameras: from the config, else from what the policy tells the
    evaluator (``info()``); None for a state-only policy."""
    shape = getattr(getattr(policy, "config", None), "image_shape", None)
    if shape is not None:
        return tuple(shape)
    info = policy.info() if hasattr(policy, "info") else None
    if info is None or not info.image_size:
        return None
    size, views = int(info.image_size), len(str(info.camera or "corner3").split(","))
    return (size, size, 3) if views == 1 else (views, size, size, 3)


def _action_steps(policy) -> int:
    """Actions executed per call: the reference VLA's ``n_action_steps``; the toy executes its whole chunk."""
    steps = getattr(getattr(policy, "config", None), "n_action_steps", None)
    return int(steps or getattr(policy, "chunk_size", 1))


def _onnx_info(directory: Path) -> dict[str, Any]:
    from daptq.deploy.export import read_manifest

    manifest = read_manifest(directory)
    layers = [p for g in manifest["layers"].values() for p in g]
    nbits = [p for p in layers if p["kernel"] == "matmul_nbits"]
    u8s8 = [p for p in layers if p["kernel"] == "matmul_integer_u8s8"]  # ort-w4a8-pc: codes stored int8
    return {
        "weights_stored_bytes": sum(f.stat().st_size for f in directory.glob("*.onnx")),
        "w4_layers": len(nbits),
        "u8s8_layers": len(u8s8),
        "w4_deployed_bytes": sum(p["stored_bytes"] for p in nbits + u8s8),
        "w4_ideal_bytes": sum(p["ideal_bytes"] for p in nbits + u8s8),
        "w4_bf16_bytes": sum(p["out_features"] * p["fan_in"] * 2 for p in nbits + u8s8),
        "accuracy_levels": sorted({p["accuracy_level"] for p in nbits}),
        "deploy_decisions": [
            {"layer": p["name"], "kernel": p["kernel"], "reason": p["decision"]}
            for g in manifest["layers"].values()
            for p in g
            if p.get("decision")
        ],
    }


class NothingToMeasure(Exception):
    """A ``packed`` row of a policy none of whose layers has a packed kernel (the parent drops the row)."""


def torch_weight_bytes(module) -> int:
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total


def export_dir(cache: Path, model: str, variant: str) -> Path:
    return cache / f"{model.replace(':', '_').replace('/', '_')}-{variant}"


def roofline_path(cache: Path, model: str) -> Path:
    return export_dir(cache, model, "roofline").with_suffix(".json")


def analyse_exports(
    model: str, cache: Path, thread_counts: Sequence[int], cost: bool, profile: bool
) -> dict[str, Any]:
    """For each ORT variant of a base model: what one call executes (``roofline.policy_call_cost``) and, with
    ``profile``, where its time goes at each thread count and how the graph optimization levels compare
    (``roofline.profile_breakdown``, ``roofline.compare_optimization_levels``). Written beside the exports."""
    import torch

    from daptq.deploy import roofline
    from daptq.deploy.runtime import OnnxPolicy

    out: dict[str, Any] = {}
    for variant in ("ort-fp32", "ort-w4a8"):
        directory = export_dir(cache, model, variant)
        entry: dict[str, Any] = {}
        policy = OnnxPolicy(directory, threads=thread_counts[0])
        batch = policy.observation_to_batch(_observation(policy))

        def call(policy=policy, batch=batch) -> None:
            policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0))

        if cost:
            entry["cost"] = roofline.policy_call_cost(policy, call).to_json()
        if profile:
            entry["profile"] = {}
            for t in thread_counts:
                policy.threads = t
                policy.sessions = policy._sessions(t)
                entry["profile"][str(t)] = roofline.profile_breakdown(policy, call)
            if variant == "ort-w4a8":
                entry["optimization_levels_ms"] = roofline.compare_optimization_levels(
                    directory, thread_counts[0], _observation(policy)
                )
        del policy
        out[variant] = entry
    from daptq.atomic import atomic_write_json

    atomic_write_json(roofline_path(cache, model), out)
    return out


def prepare_exports(
    model: str, cache: Path, group_size: int, threads: int = 1, per_channel: bool = False
) -> dict[str, Path]:
    """Export the ORT variants of a base model (in this process; run it in a subprocess), ``ort-w4a8-pc``
    too if ``per_channel``. The W4A8 exports keep each layer's integer kernel only where it measured faster
    than fp32 at ``threads`` (the manifest says why, per layer)."""
    from daptq.deploy.export import export_reference_policy
    from daptq.quant import quantize_

    out = {}
    for variant in ("ort-fp32", "ort-w4a8") + (("ort-w4a8-pc",) if per_channel else ()):
        policy = base_policy(model)
        if variant == "ort-w4a8":
            quantize_(policy.model, reference_w4a8_recipe(policy.model, group_size))
        elif variant == "ort-w4a8-pc":
            quantize_(policy.model, per_channel_w4a8_recipe(policy.model, group_size))
        out[variant] = export_reference_policy(
            policy,
            export_dir(cache, model, variant),
            source=model,
            overwrite=True,
            cost_model=None if variant == "ort-fp32" else "measure",  # integer kernels where they pay
            threads=threads,
        )
        del policy
    return out


def build_spec_row(spec: str, variant: str, threads: int):
    """(callable running one policy call, info dict) for a spec measured as given: ``predict_chunks`` on one
    observation, as ``daptq eval`` calls it."""
    import torch

    from daptq.models.registry import load_policy

    info: dict[str, Any] = {"model": spec, "variant": variant}
    if variant == "onnx":
        policy = load_policy(spec, onnx_threads=threads)
        info.update(_onnx_info(Path(spec[len("onnx:") :])))
    else:
        policy = base_policy(spec) if spec in SYNTHETIC else load_policy(spec)
        net = policy.model
        quantized = [m for m in net.modules() if hasattr(m, "spec") and hasattr(m, "qweight")]
        if variant == "packed":
            from daptq.quant import to_deployable_
            from daptq.quant.kernels import measure_cost_model, record_layer_rows

            obs = _observation(policy)
            rows = record_layer_rows(
                net, lambda: policy.predict_chunks([obs], [torch.Generator().manual_seed(0)])
            )
            costs = measure_cost_model(net, rows, "bfloat16")  # does each packed kernel pay, here?
            report = to_deployable_(net, compute_dtype="bfloat16", cost_model=costs, rows=rows)
            info["deploy_decisions"] = [
                {"layer": r.name, "kernel": r.kernel, "reason": r.reason} for r in report.rows
            ]
            if not report.converted:
                raise NothingToMeasure(
                    f"none of its {len(report.rows)} quantized layers has a packed PyTorch CPU kernel "
                    "(int4/int8 weight-only or W8A8; W4A8 has none: its onnx export runs W4A8 kernels)"
                )
            info["packed_layers"] = f"{len(report.packed)}/{len(report.rows)} (cost model)"
            for m in net.modules():  # the float weight is no longer needed once packed
                if hasattr(m, "qweight") and hasattr(m, "packed_weight"):
                    m.qweight = None
        elif quantized:
            info["quantized_layers"] = len(quantized)
        info["weights_stored_bytes"] = torch_weight_bytes(net)
    info["n_action_steps"] = _action_steps(policy)
    observation = _observation(policy)

    def call() -> None:
        with torch.no_grad():
            policy.predict_chunks([observation], [torch.Generator().manual_seed(0)])

    return call, info


def build_variant(model: str, variant: str, cache: Path, group_size: int, threads: int):
    """(callable running one policy call, info dict) for one row."""
    import torch

    torch.set_num_threads(threads)
    if variant in SPEC_VARIANTS:
        return build_spec_row(model, variant, threads)
    info: dict[str, Any] = {"model": model, "variant": variant}
    if variant.startswith("ort-"):
        from daptq.deploy.runtime import OnnxPolicy

        directory = export_dir(cache, model, variant)
        policy = OnnxPolicy(directory, threads=threads)
        info.update(_onnx_info(directory))
        batch = policy.observation_to_batch(_observation(policy))
    else:
        from daptq.quant import quantize_, to_deployable_

        policy = base_policy(model)
        net = policy.model
        if variant == "torch-w4a8-fake":
            quantize_(net, reference_w4a8_recipe(net, group_size))
        elif variant.startswith("torch-w4-packed"):
            from daptq.quant.kernels import measure_cost_model, record_layer_rows

            quantize_(net, weight_only_w4(reference_w4a8_recipe(net, group_size)))
            batch = policy.observation_to_batch(_observation(policy))
            rows = record_layer_rows(net, lambda: policy.predict_chunk(batch, torch.Generator()))
            costs = measure_cost_model(net, rows, "bfloat16")  # does each packed kernel pay, here?
            report = to_deployable_(net, compute_dtype="bfloat16", cost_model=costs, rows=rows)
            info["packed_layers"] = f"{len(report.packed)}/{len(report.rows)} (cost model)"
            info["deploy_decisions"] = [
                {"layer": r.name, "kernel": r.kernel, "reason": r.reason} for r in report.rows
            ]
            for m in net.modules():  # the float weight is no longer needed once packed
                if hasattr(m, "qweight") and hasattr(m, "packed_weight"):
                    m.qweight = None
        batch = policy.observation_to_batch(_observation(policy))
        info["weights_stored_bytes"] = torch_weight_bytes(net)
        if variant.endswith("-compile"):
            net.condition = torch.compile(net.condition, dynamic=False)
            net.head = torch.compile(net.head, dynamic=False)
    autocast = variant == "torch-bf16"
    info["n_action_steps"] = policy.config.n_action_steps

    def call() -> None:
        import torch

        gen = torch.Generator().manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            policy.predict_chunk(batch, generator=gen)

    return call, info


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). ``getrusage``'s ru_maxrss survives exec, so a worker
    started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best available


def worker_main(args: argparse.Namespace) -> int:
    """Build one variant, warm it up, then answer 'N' with N call timings and 'exit' with the peak RSS."""
    try:
        call, info = build_variant(args.model, args.variant, Path(args.cache), args.group_size, args.threads)
        for _ in range(args.warmup):
            call()
    except NothingToMeasure as e:
        print(PROTOCOL + json.dumps({"skip": str(e)}), flush=True)
        return 0
    except Exception as e:  # reported to the parent, which stops the run with it (traceback on stderr)
        import traceback

        traceback.print_exc()
        print(PROTOCOL + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(PROTOCOL + json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "exit":
            break
        times = []
        for _ in range(int(cmd)):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print(PROTOCOL + json.dumps({"times": times}), flush=True)
    print(PROTOCOL + json.dumps({"peak_rss_bytes": peak_rss_bytes()}), flush=True)
    return 0


# ---- the parent -------------------------------------------------------------------------------------------
def _worker_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}


def _tail(stream, lines: int = 12) -> str:
    stream.seek(0)
    text = stream.read().decode("utf-8", "replace").strip().splitlines()
    return "\n".join(text[-lines:])


class Worker:
    """One row's process; its stderr goes to a temporary file, quoted if it fails."""

    def __init__(self, model: str, variant: str, cache: Path, group_size: int, threads: int, warmup: int):
        cmd = [sys.executable, "-m", "daptq.deploy.bench", "--worker", "--model", model, "--variant", variant]
        cmd += ["--cache", str(cache), "--group-size", str(group_size), "--threads", str(threads)]
        cmd += ["--warmup", str(warmup)]
        self.model, self.variant = model, variant
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=_worker_env(threads),
        )
        self.times: list[float] = []
        self.info: dict[str, Any] = {}
        self.skipped: str | None = None

    def fail(self, message: str, reported: bool = False) -> BenchError:
        """The error that stops the run: the worker's own message; where it was raised (the last frame of
        its traceback) if it reported one, else the end of its stderr (it died)."""
        self.proc.kill()
        self.proc.wait()
        tail = _tail(self.stderr)
        where = f"bench of {self.model} ({self.variant}) failed: {message}"
        if reported:
            frames = [line.strip() for line in tail.splitlines() if line.lstrip().startswith('File "')]
            return BenchError(where + (f" (raised at {frames[-1]})" if frames else ""))
        return BenchError(where + (f"\nits stderr ends with:\n{tail}" if tail else ""))

    def read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                msg = json.loads(line[len(PROTOCOL) :])
                if "error" in msg:
                    raise self.fail(msg["error"], reported=True)
                return msg
        raise self.fail(f"its worker process exited (rc={self.proc.wait()})")

    def wait_ready(self) -> None:
        msg = self.read()
        if "skip" in msg:
            self.skipped = msg["skip"]
            self.proc.wait()
        else:
            self.info = msg["ready"]

    def run(self, n: int) -> None:
        try:
            self.proc.stdin.write(f"{n}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self.fail(f"its worker process exited (rc={self.proc.wait()})") from None
        self.times += self.read()["times"]

    def close(self) -> None:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        self.info["peak_rss_bytes"] = self.read().get("peak_rss_bytes")
        self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _subprocess(args: list[str], threads: int, what: str) -> str:
    """Run ``python -m daptq.deploy.bench ARGS`` (its memory is not a worker's); its stdout, or a BenchError
    with the end of its stderr."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run(
            [sys.executable, "-m", "daptq.deploy.bench", *args],
            stderr=err,
            stdout=subprocess.PIPE,
            text=True,
            env=_worker_env(threads),
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"{what} failed (rc={proc.returncode}); its stderr ends with:\n{_tail(err)}")
        return proc.stdout


def _prepare(model: str, cache: Path, group_size: int, threads: int, per_channel: bool = False) -> None:
    """Export the ORT variants of a base model in a subprocess (its memory is not a worker's)."""
    _subprocess(
        ["--prepare", "--model", model, "--cache", str(cache), "--group-size", str(group_size)]
        + ["--threads", str(threads)]
        + (["--per-channel"] if per_channel else []),
        threads,
        f"exporting the ort- variants of {model} into {cache}",
    )


def _analyse(model: str, cache: Path, thread_counts: Sequence[int], cost: bool, profile: bool) -> dict:
    args = ["--analyse", "--model", model, "--cache", str(cache), "--threads", str(thread_counts[0])]
    args += ["--thread-counts", ",".join(map(str, thread_counts))]
    args += (["--cost"] if cost else []) + (["--profile"] if profile else [])
    _subprocess(args, thread_counts[0], f"counting and profiling the ort- variants of {model}")
    return json.loads(roofline_path(cache, model).read_text())


def _rates(threads: int) -> dict[str, Any]:
    out = _subprocess(["--rates", "--model", "-", "--threads", str(threads)], threads, "measuring rates")
    return json.loads(out.strip().splitlines()[-1])


def _measure(
    rows: Sequence[tuple[str, str]], cache: Path, group_size: int, threads: int, warmup: int, rounds: int,
    calls_per_round: int, notes: list[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """Every row at ``threads``, round-robin, each in its own worker process."""
    workers: list[Worker] = []
    try:
        for model, variant in rows:  # started one at a time so their building does not overlap
            w = Worker(model, variant, cache, group_size, threads, warmup)
            workers.append(w)
            w.wait_ready()
            if w.skipped:
                notes.append(f"{model} packed: not measured, {w.skipped}")
        measured = [w for w in workers if not w.skipped]
        for _ in range(rounds):
            for w in measured:
                w.run(calls_per_round)
        for w in measured:
            w.close()
    finally:
        for w in workers:
            w.kill()
    return [{**_summarize(w), "threads": threads} for w in measured]


# the cost each variant's roofline is counted on, and whether its int8 operations run at the fp32 rate
ROOFLINE_OF = {
    "torch-fp32": ("ort-fp32", False),
    "torch-bf16": ("ort-fp32", False),
    "torch-w4a8-fake": ("ort-fp32", False),
    "torch-w4-packed": ("ort-w4a8", True),
    "torch-w4-packed-compile": ("ort-w4a8", True),
    "ort-fp32": ("ort-fp32", False),
    "ort-w4a8": ("ort-w4a8", False),
}


def attach_roofline(row: dict[str, Any], costs: dict[str, Any], rates: dict[str, Any]) -> None:
    """Add the row's roofline (``roofline.roofline_row``) from its model's counted costs and the rates at its
    thread count; for the W4A8 kernel also the bound at that kernel's own large-GEMM rate."""
    from daptq.deploy.roofline import Cost, Rates, roofline_row

    source, int8_as_fp32 = ROOFLINE_OF.get(row["variant"], (None, False))
    if source is None or "cost" not in costs.get(source, {}):
        return
    cost, r = Cost.from_json(costs[source]["cost"]), Rates.from_dict(rates)
    row["roofline"] = roofline_row(row["call_p50_ms"] / 1e3, cost, r, int8_as_fp32)
    if row["variant"] == "ort-w4a8":
        kernel = Rates(r.fp32_flops, r.w4a8_kernel_ops, r.w4a8_kernel_ops, r.bandwidth_bytes, r.threads)
        row["roofline"]["bound_at_kernel_rate_ms"] = roofline_row(1.0, cost, kernel)["bound_ms"]


def run_bench(
    models: Sequence[str],
    variants: Sequence[str] | None = None,
    rounds: int = 5,
    calls_per_round: int = 2,
    warmup: int = 2,
    threads: int | Sequence[int] = 1,
    group_size: int = 128,
    cache: Path = Path("runs/bench_cache"),
    roofline: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    """Measure every row (``plan_rows``) round-robin in one run; ratios to the first row (``variants``:
    to each model's first variant, each model's rows round-robin on their own) at the same thread count.
    Several ``threads``: all rows at each count in turn. ``roofline`` (``--variants`` only): this
    machine's rates measured in the same run and each row's bound (``daptq.deploy.roofline``); ``profile``:
    where each ORT variant's call goes, per op type. Raises
    BenchError before any work for bad options or specs, and for a worker that fails (the others are
    stopped)."""
    check_options(rounds, calls_per_round, warmup, threads, group_size, cache)
    thread_counts = [threads] if isinstance(threads, int) else list(threads)
    rows = plan_rows(models, variants)
    if (roofline or profile) and variants is None:
        raise BenchError("--roofline and --profile need --variants (daptq's own recipes of a base model)")
    cache = Path(cache)
    notes: list[str] = []
    analysed: dict[str, Any] = {}
    exported = dict.fromkeys(m for m, v in rows if v.startswith("ort-") or roofline or profile)
    for model in exported:
        per_channel = (model, "ort-w4a8-pc") in rows
        _prepare(model, cache, group_size, thread_counts[0], per_channel)
        if roofline or profile:
            analysed[model] = _analyse(model, cache, thread_counts, roofline, profile)
    rates = {t: _rates(t) for t in thread_counts} if roofline else {}
    # With --variants the ratios are per model: one model's rows at a time (memory: one model's workers).
    phases = (
        [[r for r in rows if r[0] == m] for m in dict.fromkeys(m for m, _ in rows)] if variants else [rows]
    )
    results = []
    for t in thread_counts:
        for phase in phases:
            results += _measure(phase, cache, group_size, t, warmup, rounds, calls_per_round, notes)
    baseline = "per-model" if variants is not None else "first"
    _add_ratios(results, baseline)
    for row in results:
        if roofline:
            attach_roofline(row, analysed.get(row["model"], {}), rates[row["threads"]])
    report = {
        "threads": thread_counts[0] if len(thread_counts) == 1 else thread_counts,
        "rounds": rounds,
        "calls_per_round": calls_per_round,
        "group_size": group_size,
        "baseline": baseline,
        "notes": notes,
        "host": _host(),
        "versions": _versions(),
        "results": results,
    }
    if roofline:
        report["rates"] = {str(t): r for t, r in rates.items()}
    if profile:
        report["profiles"] = {
            m: {v: {k: e[k] for k in ("profile", "optimization_levels_ms") if k in e} for v, e in a.items()}
            for m, a in analysed.items()
        }
    return report


def _host() -> dict[str, Any]:
    """The machine and how loaded it was when the report was written (1/5/15-minute load averages)."""
    host = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        host["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            host["cpu"] = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            host["simd"] = sorted(
                flags & {"avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}
            )
            break
    return host


def _summarize(w: Worker) -> dict[str, Any]:
    row: dict[str, Any] = {"model": w.model, "variant": w.variant, **w.info}
    t = np.asarray(w.times) * 1e3
    steps = w.info.get("n_action_steps", 1)
    row.update(
        calls=len(t),
        call_p50_ms=float(np.percentile(t, 50)),
        call_p90_ms=float(np.percentile(t, 90)),
        action_p50_ms=float(np.percentile(t, 50)) / steps,
        action_p90_ms=float(np.percentile(t, 90)) / steps,
    )
    return row


def _add_ratios(rows: list[dict[str, Any]], baseline: str = "first") -> None:
    """Each row against the run's first row (``first``) or its model's first row (``per-model``), at the
    row's own thread count."""
    for row in rows:
        same = [r for r in rows if r.get("threads") == row.get("threads")]
        ref = same[0] if baseline == "first" else next(r for r in same if r["model"] == row["model"])
        row["baseline"] = f"{ref['model']} {ref['variant']}"
        row["call_p50_vs_baseline"] = row["call_p50_ms"] / ref["call_p50_ms"]
        if row.get("peak_rss_bytes") and ref.get("peak_rss_bytes"):
            row["peak_rss_vs_baseline"] = row["peak_rss_bytes"] / ref["peak_rss_bytes"]
        if row.get("w4_deployed_bytes"):
            row["w4_deployed_vs_bf16"] = row["w4_deployed_bytes"] / row["w4_bf16_bytes"]


def _versions() -> dict[str, str]:
    import torch

    from daptq.deploy.runtime import onnxruntime_module  # imported with its telemetry off

    return {"torch": torch.__version__, "onnxruntime": onnxruntime_module().__version__}


def to_markdown(report: dict[str, Any]) -> str:
    mib = 1 << 20
    rows = report["results"]
    base = "its model's first row" if report.get("baseline") == "per-model" else "the first row"
    lines = [
        f"Threads: {report['threads']} (torch and ONNX Runtime intra-op); load average "
        f"{report.get('host', {}).get('loadavg', 'n/a')}; {report['rounds']} rounds x "
        f"{report['calls_per_round']} calls per row, round-robin, each row in its own process; ratios "
        f"to {base}"
        + (f" ({rows[0]['baseline']})." if rows and report.get("baseline") != "per-model" else "."),
        "",
        "| model | variant | threads | call p50 ms | call p90 ms | action p50 ms | call vs base | peak RSS "
        "MiB | RSS vs base | weights stored MiB | W4 deployed / bf16 | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        w4 = f"{r['w4_deployed_vs_bf16']:.3f}" if "w4_deployed_vs_bf16" in r else ""
        rss = r.get("peak_rss_bytes") or 0
        note = ""
        if "packed_layers" in r:
            note = f"{r['packed_layers']} layers packed"
        elif "quantized_layers" in r:
            note = f"{r['quantized_layers']} fake-quant layers"
        elif r.get("u8s8_layers"):
            note = f"{r['u8s8_layers']} u8s8 MatMulInteger layers (int8-stored codes)"
        elif "w4_layers" in r:
            note = f"{r['w4_layers']} MatMulNBits layers"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r.get('threads', report['threads'])} | "
            f"{r['call_p50_ms']:.1f} | {r['call_p90_ms']:.1f} | "
            f"{r['action_p50_ms']:.2f} | {r.get('call_p50_vs_baseline', float('nan')):.2f}x | "
            f"{rss / mib:.0f} | {r.get('peak_rss_vs_baseline', float('nan')):.2f}x | "
            f"{r['weights_stored_bytes'] / mib:.1f} | {w4} | {note} |"
        )
    lines += [""] + [f"Note: {n}" for n in report.get("notes", [])] if report.get("notes") else []
    lines += roofline_markdown(report) + profile_markdown(report) + decisions_markdown(report)
    return "\n".join(lines) + "\n"


def decisions_markdown(report: dict[str, Any]) -> list[str]:
    """Per layer, whether the packed kernel paid (the cost model's decision, measured in the worker)."""
    lines: list[str] = []
    seen = set()
    for r in report["results"]:
        if not r.get("deploy_decisions") or (r["model"], r["variant"]) in seen:
            continue
        seen.add((r["model"], r["variant"]))
        lines += [
            "",
            f"Per-layer decisions of {r['model']} {r['variant']} ({r.get('threads')} thread(s)):",
            "",
        ]
        lines += ["| layer | kernel | why |", "|---|---|---|"]
        lines += [
            f"| {d['layer']} | {d['kernel'] or 'fake-quant'} | {d['reason']} |" for d in r["deploy_decisions"]
        ]
    return lines


def roofline_markdown(report: dict[str, Any]) -> list[str]:
    """The rates measured in the run and each row's time beside its bound."""
    if not report.get("rates"):
        return []
    lines = ["", "Rates measured in this run (best of 5; GEMM 128x2048x2048):", ""]
    lines += [
        "| threads | fp32 GFLOP/s | int8 GOP/s (MatMulInteger u8s8) | W4A8 MatMulNBits GOP/s | copy GB/s |"
    ]
    lines += ["|---:|---:|---:|---:|---:|"]
    for t, r in report["rates"].items():
        lines.append(
            f"| {t} | {r['fp32_flops'] / 1e9:.1f} | {r['int8_ops'] / 1e9:.1f} | "
            f"{r['w4a8_kernel_ops'] / 1e9:.1f} | {r['bandwidth_bytes'] / 1e9:.1f} |"
        )
    lines += [
        "",
        "Roofline per call: sum over executed nodes of max(ops / rate, weight bytes / bandwidth); "
        "% of bound = bound / measured (100%: what this CPU allows).",
        "",
        "| model | variant | threads | call p50 ms | GFLOP fp32 | GOP int8 | weight MB read | bound ms "
        "(compute / memory) | % of bound | bound at MatMulNBits' rate ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        f = r.get("roofline")
        if not f:
            continue
        kernel = f"{f['bound_at_kernel_rate_ms']:.1f}" if "bound_at_kernel_rate_ms" in f else ""
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['threads']} | {r['call_p50_ms']:.1f} | "
            f"{f['cost_fp32_flops'] / 1e9:.2f} | {f['cost_int8_ops'] / 1e9:.2f} | "
            f"{f['cost_weight_bytes'] / 1e6:.1f} | {f['bound_ms']:.1f} ({f['bound_compute_ms']:.1f} / "
            f"{f['bound_memory_ms']:.1f}) | {100 * f['of_bound']:.0f}% | {kernel} |"
        )
    return lines


def profile_markdown(report: dict[str, Any], top: int = 8) -> list[str]:
    """Where each profiled ORT call goes: its largest op types, the sessions' own overhead and Python."""
    lines: list[str] = []
    for model, variants in report.get("profiles", {}).items():
        for variant, entry in variants.items():
            for threads, prof in entry.get("profile", {}).items():
                call = prof["call_ms"]
                ops = sorted(prof["by_op_ms"].items(), key=lambda kv: -kv[1])
                rest = sum(v for _, v in ops[top:])
                parts = [f"{k} {v:.1f} ({100 * v / call:.0f}%)" for k, v in ops[:top]]
                parts.append(f"other ops {rest:.1f} ({100 * rest / call:.0f}%)")
                overhead = sum(prof["session_overhead_ms"].values())
                parts.append(f"session overhead outside nodes {overhead:.1f} ({100 * overhead / call:.0f}%)")
                parts.append(f"Python (DDIM loop, conversions) {prof['python_ms']:.1f}")
                head = f"Profile of {model} {variant}, {threads} thread(s), {call:.1f} ms per profiled call"
                lines += ["", head + " (ms per call): " + "; ".join(parts) + "."]
            levels = entry.get("optimization_levels_ms")
            if levels:
                shown = ", ".join(f"{k} {v:.1f}" for k, v in levels.items())
                lines += ["", f"{model} {variant} ms per call by ORT graph optimization level: {shown}."]
    return lines


def write_report(report: dict[str, Any], out: Path) -> None:
    from daptq.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out.with_suffix(".md"), to_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daptq.deploy.bench")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--model", required=True)
    p.add_argument("--variant")
    p.add_argument("--cache", default="runs/bench_cache")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--analyse", action="store_true")
    p.add_argument("--thread-counts", default="1")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rates", action="store_true")
    p.add_argument("--per-channel", action="store_true")
    args = p.parse_args(argv)
    if args.prepare or args.analyse or args.rates:
        import torch

        torch.set_num_threads(args.threads)
    if args.prepare:
        prepare_exports(args.model, Path(args.cache), args.group_size, args.threads, args.per_channel)
        return 0
    if args.analyse:
        counts = [int(t) for t in args.thread_counts.split(",")]
        analyse_exports(args.model, Path(args.cache), counts, args.cost, args.profile)
        return 0
    if args.rates:
        from daptq.deploy.roofline import measure_rates

        print(json.dumps(measure_rates(args.threads).to_dict()), flush=True)
        return 0
    return worker_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
