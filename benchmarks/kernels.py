"""Latency of one linear layer: fp32, bf16, int8 dynamic (W8A8), int8 weight-only, int4 weight-only (W4 g128).

Everything is measured in one process with a fixed thread count: warm-up calls, then the median of repeated
timings (each timing averages enough calls to last >= ~20 ms), taken round-robin across variants. Ratios to
fp32 are what matter; absolute numbers move with whatever else runs on the machine. Writes
results/kernels.json and results/kernels.md atomically.

    python benchmarks/kernels.py [--threads 1] [--repeats 15] [--compile] [--skip-slow]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from daptq.quant import (
    ActivationSpec,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    QuantLinear,
    QuantSpec,
    WeightSpec,
    ideal_weight_bytes,
)
from daptq.quant._util import atomic_write_text

SHAPES = ((4096, 4096), (512, 512))
BATCHES = (1, 64)
W4_G128 = QuantSpec(WeightSpec(4, granularity="per_group", group_size=128))
W8A8 = QuantSpec(WeightSpec(8), ActivationSpec(8))
W8 = QuantSpec(WeightSpec(8))


def build_variants(in_f: int, out_f: int) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """name -> (module, input dtype). All variants share one random fp32 layer."""
    torch.manual_seed(0)
    fp32 = nn.Linear(in_f, out_f).eval()
    bf16 = nn.Linear(in_f, out_f).to(torch.bfloat16).eval()
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    int8_dyn = Int8DynamicLinear.from_quant(QuantLinear.from_float(fp32, W8A8))
    w8 = QuantLinear.from_float(fp32, W8)
    w4 = QuantLinear.from_float(fp32, W4_G128)
    return {
        "fp32": (fp32, torch.float32),
        "bf16": (bf16, torch.bfloat16),
        "int8_dynamic (W8A8, _int_mm)": (int8_dyn, torch.float32),
        "int8_weight_only (bf16 act)": (Int8WeightOnlyLinear.from_quant(w8, "bfloat16"), torch.bfloat16),
        "int8_weight_only (fp32 act)": (Int8WeightOnlyLinear.from_quant(w8, "float32"), torch.float32),
        "int4_weight_only g128 (bf16 act)": (Int4WeightOnlyLinear.from_quant(w4, "bfloat16"), torch.bfloat16),
        "int4_weight_only g128 (fp32 act)": (Int4WeightOnlyLinear.from_quant(w4, "float32"), torch.float32),
    }


@torch.inference_mode()
def time_interleaved(
    calls: dict[str, tuple[nn.Module, torch.Tensor]], repeats: int, min_sample_s: float = 0.02
) -> dict[str, float]:
    """Median seconds per call for each variant, sampled round-robin so load from other processes on a shared
    machine hits every variant alike (ratios stay meaningful even when absolute times drift)."""
    inner, reps = {}, {}
    for name, (fn, x) in calls.items():
        for _ in range(3):  # warm-up
            fn(x)
        t0 = time.perf_counter()
        fn(x)
        one = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, int(min_sample_s / one))
        reps[name] = min(repeats, 3) if one > 0.5 else repeats  # seconds-per-call kernels: a few samples
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name, (fn, x) in calls.items():
            if r >= reps[name]:
                continue
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn(x)
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def run(threads: int, repeats: int, use_compile: bool, skip_slow: bool = False) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for in_f, out_f in SHAPES:
        variants = build_variants(in_f, out_f)
        if skip_slow:
            variants = {k: v for k, v in variants.items() if "weight_only" not in k or "fp32 act" not in k}
        if use_compile:
            torch._dynamo.config.recompile_limit = 64  # a graph per variant x batch, one process
            for name in list(variants):
                mod, dt = variants[name]
                try:
                    compiled = torch.compile(mod, dynamic=False)
                    with torch.inference_mode():  # same grad mode as the timed calls: no recompilation later
                        compiled(torch.randn(1, in_f, dtype=dt))
                    variants[name + " +compile"] = (compiled, dt)
                except Exception as e:  # record why compile is unavailable instead of hiding it
                    print(f"torch.compile failed for {name}: {type(e).__name__}: {str(e)[:200]}")
        for batch in BATCHES:
            calls = {name: (mod, torch.randn(batch, in_f, dtype=dt)) for name, (mod, dt) in variants.items()}
            seconds = time_interleaved(calls, repeats)
            base = seconds["fp32"]
            for name, sec in seconds.items():
                rows.append(
                    {
                        "shape": f"{out_f}x{in_f}",
                        "batch": batch,
                        "variant": name,
                        "latency_us": sec * 1e6,
                        "ratio_to_fp32": sec / base,
                    }
                )
                print(f"{out_f}x{in_f} b={batch:<3d} {name:<40s} {sec * 1e6:10.1f} us  x{sec / base:.2f}")
    n = 4096 * 4096
    w4 = ideal_weight_bytes(4096, 4096, W4_G128.weight)
    packed = Int4WeightOnlyLinear.from_quant(QuantLinear.from_float(nn.Linear(4096, 4096), W4_G128))
    bytes_info = {
        "fp16_weight_bytes": n * 2,
        "w4_g128_ideal_bytes": w4,
        "w4_g128_ideal_ratio_to_fp16": w4 / (n * 2),
        "w4_g128_tinygemm_stored_bytes": packed.weight_storage_bytes(),
        "w4_g128_tinygemm_ratio_to_fp16": packed.weight_storage_bytes() / (n * 2),
    }
    return {
        "torch": torch.__version__,
        "threads": threads,
        "compile": use_compile,
        "repeats": repeats,
        "cpu": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
        "bytes": bytes_info,
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"# Linear-layer kernel latency (torch {result['torch']}, {result['threads']} threads, "
        f"median of {result['repeats']}, {result['time']})",
        "",
        "| shape (out x in) | batch | variant | latency (us) | ratio to fp32 |",
        "|---|---:|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['latency_us']:.1f} "
            f"| {r['ratio_to_fp32']:.2f} |"
        )
    b = result["bytes"]
    lines += [
        "",
        "| 4096x4096 weight bytes | bytes | ratio to fp16 |",
        "|---|---:|---:|",
        f"| fp16 | {b['fp16_weight_bytes']} | 1.000 |",
        f"| W4 g128 ideal (codes + bf16 scales) | {b['w4_g128_ideal_bytes']} "
        f"| {b['w4_g128_ideal_ratio_to_fp16']:.4f} |",
        f"| W4 g128 tinygemm packed (codes + bf16 scale&zero) | {b['w4_g128_tinygemm_stored_bytes']} "
        f"| {b['w4_g128_tinygemm_ratio_to_fp16']:.4f} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument(
        "--skip-slow",
        action="store_true",
        help="skip the fp32-activation weight-only kernels (seconds per call)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = parser.parse_args()
    result = run(args.threads, args.repeats, args.compile, args.skip_slow)
    md = to_markdown(result)
    print(md)
    atomic_write_text(args.out / "kernels.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / "kernels.md", md)


if __name__ == "__main__":
    main()
