"""Seconds per policy call of the deployed (ONNX Runtime) policy against the fake-quant policy it came from.

One process, round-robin over the variants, so every ratio is within one run on the same (shared) machine.
The ONNX variants differ only in their session threads: ``threads=1`` (what ``daptq eval`` builds now),
and 2 threads with ONNX Runtime's spin-waiting pool, which is what ``daptq eval --workers 1`` built before
(``OnnxPolicy`` took torch's thread count at load time: 2 on this machine). Also times the batched
``predict_chunks`` of ``--envs-per-worker 4`` against 4 single-row calls, and the load of each policy.

    nice -n 10 python benchmarks/deploy_policy_speed.py --quantized runs/rtn-w4a8 --onnx runs/rtn-w4a8-onnx \
        --out results/deploy_policy_speed
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from daptq.atomic import atomic_write_bytes, atomic_write_json


def spinning_sessions(policy, threads: int) -> None:
    """Rebuild ``policy``'s sessions as the old default built them: ``threads`` intra-op, spinning on."""
    import onnxruntime as ort

    from daptq.deploy.export import GRAPHS

    for name in GRAPHS:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        data = policy._read_checked(name)
        policy.sessions[name] = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def observation(size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32),
        "instruction": "push the puck to the goal",
    }


def chunk_seconds(policy, obs: dict, calls: int) -> list[float]:
    """Seconds per re-planning ``select_action`` (the calls that run the graphs; the others pop a queue)."""
    out = []
    steps = policy.config.n_action_steps
    for i in range(calls):
        policy.reset(seed=i)
        start = time.perf_counter()
        policy.select_action(obs)
        out.append(time.perf_counter() - start)
        for _ in range(steps - 1):
            policy.select_action(obs)
    return out


def batched_seconds(policy, obs: dict, calls: int, batch: int) -> list[float]:
    out = []
    for i in range(calls):
        gens = [torch.Generator().manual_seed(i * batch + j) for j in range(batch)]
        start = time.perf_counter()
        policy.predict_chunks([obs] * batch, gens, slots=batch)
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantized", required=True, help="the `daptq quantize` directory (the fake-quant twin)")
    p.add_argument("--onnx", required=True, help="its `daptq export` directory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=5, help="re-planning calls per variant per round")
    p.add_argument("--batch", type=int, default=4, help="batch of predict_chunks (--envs-per-worker)")
    p.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # as an evaluation worker
    from daptq.deploy.runtime import OnnxPolicy
    from daptq.models.registry import load_policy

    loads, policies = {}, {}
    start = time.perf_counter()
    policies["fake-quant twin (torch, 1 thread)"] = load_policy(args.quantized)
    loads["fake-quant twin (torch, 1 thread)"] = time.perf_counter() - start
    start = time.perf_counter()
    policies["onnx threads=1 (now)"] = OnnxPolicy(args.onnx, threads=1)
    loads["onnx threads=1 (now)"] = time.perf_counter() - start
    before = OnnxPolicy(args.onnx, threads=1)
    spinning_sessions(before, 2)
    policies["onnx threads=2, spinning (before, --workers 1)"] = before
    obs = observation(before.image_size, 0)

    single = {name: [] for name in policies}
    batched = {name: [] for name in policies}
    for _ in range(args.rounds):
        for name, policy in policies.items():
            single[name] += chunk_seconds(policy, obs, args.calls)
            batched[name] += batched_seconds(policy, obs, max(1, args.calls // 2), args.batch)
    base = "fake-quant twin (torch, 1 thread)"
    rows = []
    for name in policies:
        s, b = statistics.median(single[name]), statistics.median(batched[name])
        rows.append(
            {
                "variant": name,
                "chunk_p50_s": s,
                "action_p50_s": s / policies[name].config.n_action_steps,
                "vs_twin": s / statistics.median(single[base]),
                f"batch{args.batch}_p50_s": b,
                f"batch{args.batch}_per_row_vs_single": b / args.batch / s,
                "load_s": loads.get(name),
            }
        )
    result = {
        "command": "python benchmarks/deploy_policy_speed.py "
        f"--quantized {args.quantized} --onnx {args.onnx} --rounds {args.rounds} --calls {args.calls} "
        f"--batch {args.batch} --out {args.out}",
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch_threads": 1,
        "python": platform.python_version(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    lines = [
        f"`{result['command']}` (load average {result['load_average'][0]:.1f} on {result['cpus']} CPUs; "
        "chunk = one re-planning select_action, batch 1)",
        "",
        f"| variant | chunk p50 ms | per action ms | vs twin | batch {args.batch} ms | per row vs batch 1 "
        "| load s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        load = "" if r["load_s"] is None else f"{r['load_s']:.1f}"
        lines.append(
            f"| {r['variant']} | {1000 * r['chunk_p50_s']:.1f} | {1000 * r['action_p50_s']:.1f} | "
            f"{r['vs_twin']:.2f}x | {1000 * r[f'batch{args.batch}_p50_s']:.1f} | "
            f"{r[f'batch{args.batch}_per_row_vs_single']:.2f}x | {load} |"
        )
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
