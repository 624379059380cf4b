"""`daptq bench`: latency per policy call and per action, peak memory and weight bytes of policy variants.

Every variant runs in its own worker process (so its peak resident memory is its own) and the parent
drives them round-robin: each round asks every worker for a few timed calls in turn, so a noisy neighbour
slows all variants alike and ratios stay meaningful. One call is ``predict_chunk`` on one observation at
batch 1 (backbone + 10 DDIM denoiser steps; the instruction's language features are cached, as in closed
loop); per executed action is a call divided by ``n_action_steps`` (the policy re-plans every that many
actions).

Variants of a base model (``ref:<name>`` or ``cogact-d2048``, the reference architecture at CogACT's width
with random weights: latency does not depend on weight values):

- ``torch-fp32``, ``torch-bf16`` (CPU autocast), ``torch-w4a8-fake`` (the fake-quant model daptq evaluates);
- ``torch-w4-packed`` (daptq's int4 weight-only tinygemm kernels, bf16 activations: W4A8 has no PyTorch CPU
  kernel) eager, and ``torch-w4-packed-compile`` (``torch.compile`` of the same, if ``--compile``);
- ``ort-fp32`` and ``ort-w4a8`` (``daptq export``: MatMulNBits int4 weights, int8 activations).

An ``onnx:OUT`` model is measured as given. Results go to JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq.quant import QuantSpec, Recipe, Rule, w4a8

PROTOCOL = "@@bench "
BASE_VARIANTS = (
    "torch-fp32",
    "torch-bf16",
    "torch-w4a8-fake",
    "torch-w4-packed",
    "torch-w4-packed-compile",
    "ort-fp32",
    "ort-w4a8",
)
GROUP_SIZES = (128, 64, 32)
SYNTHETIC = {  # random-weight models of the reference architecture (latency does not depend on weights)
    "toy-vla": dict(
        image_size=32, d_model=64, n_layer=2, n_head=4, dit_d_model=64, dit_n_layer=1, dit_n_head=4
    ),
    "cogact-d2048": dict(d_model=2048, n_layer=4, n_head=16, dit_d_model=768, dit_n_layer=4, dit_n_head=12),
}


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
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 255, policy.config.image_shape, dtype=np.uint8),
        "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32),
        "instruction": "pick up the puck and place it at the goal",
    }


def torch_weight_bytes(module) -> int:
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total


def export_dir(cache: Path, model: str, variant: str) -> Path:
    return cache / f"{model.replace(':', '_').replace('/', '_')}-{variant}"


def prepare_exports(model: str, cache: Path, group_size: int) -> dict[str, Path]:
    """Export the ORT variants of a base model (in this process; run it in a subprocess)."""
    from daptq.deploy.export import export_reference_policy
    from daptq.quant import quantize_

    out = {}
    for variant in ("ort-fp32", "ort-w4a8"):
        policy = base_policy(model)
        if variant == "ort-w4a8":
            quantize_(policy.model, reference_w4a8_recipe(policy.model, group_size))
        out[variant] = export_reference_policy(
            policy, export_dir(cache, model, variant), source=model, overwrite=True
        )
        del policy
    return out


def build_variant(model: str, variant: str, cache: Path, group_size: int, threads: int):
    """(callable running one policy call, info dict) for one variant."""
    import torch

    torch.set_num_threads(threads)
    info: dict[str, Any] = {"model": model, "variant": variant}
    if variant.startswith("ort-") or model.startswith("onnx:"):
        from daptq.deploy.export import read_manifest
        from daptq.deploy.runtime import OnnxPolicy

        directory = Path(model[5:]) if model.startswith("onnx:") else export_dir(cache, model, variant)
        policy = OnnxPolicy(directory, threads=threads)
        manifest = read_manifest(directory)
        info["weights_stored_bytes"] = sum(f.stat().st_size for f in directory.glob("*.onnx"))
        nbits = [p for g in manifest["layers"].values() for p in g if p["kernel"] == "matmul_nbits"]
        info["w4_layers"] = len(nbits)
        info["w4_deployed_bytes"] = sum(p["stored_bytes"] for p in nbits)
        info["w4_ideal_bytes"] = sum(p["ideal_bytes"] for p in nbits)
        info["w4_bf16_bytes"] = sum(p["out_features"] * p["fan_in"] * 2 for p in nbits)
        info["accuracy_levels"] = sorted({p["accuracy_level"] for p in nbits})
        batch = policy.observation_to_batch(_observation(policy))
    else:
        from daptq.quant import quantize_, to_deployable_

        policy = base_policy(model)
        net = policy.model
        if variant == "torch-w4a8-fake":
            quantize_(net, reference_w4a8_recipe(net, group_size))
        elif variant.startswith("torch-w4-packed"):
            quantize_(net, weight_only_w4(reference_w4a8_recipe(net, group_size)))
            report = to_deployable_(net, compute_dtype="bfloat16")
            info["packed_layers"] = len(report.converted)
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
    except Exception as e:  # reported to the parent, which records the variant as failed
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
class Worker:
    def __init__(self, model: str, variant: str, cache: Path, group_size: int, threads: int, warmup: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "daptq.deploy.bench", "--worker", "--model", model, "--variant", variant]
        cmd += ["--cache", str(cache), "--group-size", str(group_size), "--threads", str(threads)]
        cmd += ["--warmup", str(warmup)]
        self.model, self.variant = model, variant
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.times: list[float] = []
        self.info: dict[str, Any] = {}
        self.error: str | None = None

    def read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
        return {"error": f"worker exited (rc={self.proc.wait()})"}

    def wait_ready(self) -> None:
        msg = self.read()
        if "error" in msg:
            self.error = msg["error"]
        else:
            self.info = msg["ready"]

    def run(self, n: int) -> None:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        msg = self.read()
        if "error" in msg:
            self.error = msg["error"]
        else:
            self.times += msg["times"]

    def close(self) -> None:
        if self.error is None:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.flush()
            self.info["peak_rss_bytes"] = self.read().get("peak_rss_bytes")
        self.proc.wait()


def run_bench(
    models: Sequence[str],
    variants: Sequence[str] = BASE_VARIANTS,
    rounds: int = 5,
    calls_per_round: int = 2,
    warmup: int = 2,
    threads: int = 1,
    group_size: int = 128,
    cache: Path = Path("runs/bench_cache"),
) -> dict[str, Any]:
    """Measure every (model, variant); models are benched one after the other, variants round-robin."""
    unknown = sorted(set(variants) - set(BASE_VARIANTS))
    if unknown:
        raise ValueError(f"unknown bench variant(s) {unknown}; known: {list(BASE_VARIANTS)}")
    results = []
    for model in models:
        chosen = ["onnx"] if model.startswith("onnx:") else list(variants)
        if any(v.startswith("ort-") for v in chosen) and not model.startswith("onnx:"):
            subprocess.run(
                [sys.executable, "-m", "daptq.deploy.bench", "--prepare", "--model", model]
                + ["--cache", str(cache), "--group-size", str(group_size)],
                check=True,
                stderr=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"},
            )
        workers = []
        for v in chosen:  # started one at a time so their building does not overlap
            w = Worker(model, v, cache, group_size, threads, warmup)
            w.wait_ready()
            workers.append(w)
        for _ in range(rounds):
            for w in workers:
                if w.error is None:
                    w.run(calls_per_round)
        for w in workers:
            w.close()
        results += [_summarize(w) for w in workers]
    _add_ratios(results)
    return {
        "threads": threads,
        "rounds": rounds,
        "calls_per_round": calls_per_round,
        "group_size": group_size,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": _versions(),
        "results": results,
    }


def _summarize(w: Worker) -> dict[str, Any]:
    row: dict[str, Any] = {"model": w.model, "variant": w.variant, **w.info}
    if w.error is not None:
        row["error"] = w.error
        return row
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


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if r["model"] == row["model"] and r["variant"] == "torch-fp32" and "error" not in r
            ),
            None,
        )
        if ref is None or "error" in row:
            continue
        row["call_p50_vs_fp32"] = row["call_p50_ms"] / ref["call_p50_ms"]
        if row.get("peak_rss_bytes") and ref.get("peak_rss_bytes"):
            row["peak_rss_vs_fp32"] = row["peak_rss_bytes"] / ref["peak_rss_bytes"]
        if row.get("w4_deployed_bytes"):
            row["w4_deployed_vs_bf16"] = row["w4_deployed_bytes"] / row["w4_bf16_bytes"]


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def to_markdown(report: dict[str, Any]) -> str:
    mib = 1 << 20
    lines = [
        f"Threads: {report['threads']} (torch and ONNX Runtime intra-op); {report['rounds']} rounds x "
        f"{report['calls_per_round']} calls per variant, round-robin; "
        f"W4 groups of up to {report['group_size']}.",
        "",
        "| model | variant | call p50 ms | call p90 ms | action p50 ms | vs fp32 | peak RSS MiB | vs fp32 "
        "| weights stored MiB | W4 deployed / bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        w4 = f"{r['w4_deployed_vs_bf16']:.3f}" if "w4_deployed_vs_bf16" in r else ""
        rss = r.get("peak_rss_bytes") or 0
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['call_p50_ms']:.1f} | {r['call_p90_ms']:.1f} | "
            f"{r['action_p50_ms']:.2f} | {r.get('call_p50_vs_fp32', float('nan')):.2f}x | {rss / mib:.0f} | "
            f"{r.get('peak_rss_vs_fp32', float('nan')):.2f}x | {r['weights_stored_bytes'] / mib:.1f} | {w4} |"
        )
    return "\n".join(lines) + "\n"


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
    args = p.parse_args(argv)
    if args.prepare:
        import torch

        torch.set_num_threads(args.threads)
        prepare_exports(args.model, Path(args.cache), args.group_size)
        return 0
    return worker_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
