"""select_action latency of the reference VLA on CPU: re-planning calls vs queued calls, and per action.

With action chunking (K=8 predicted, 4 executed) only every 4th call runs the model (vision encoder, backbone,
10 DDIM steps of the DiT); the others pop the queue. Writes results/policy_latency.json and .md.

    python benchmarks/policy_latency.py --model ref:metaworld-mt10 --calls 200 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from daptq.atomic import atomic_write_bytes
from daptq.models.reference import (
    ReferencePolicy,
    ReferenceVLA,
    ReferenceVLAConfig,
    load_reference_checkpoint,
    load_reference_policy,
)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def load(spec: str) -> ReferencePolicy:
    if (
        spec == "random-init"
    ):  # latency does not depend on the weights; lets the benchmark run without training
        return ReferencePolicy(ReferenceVLA(ReferenceVLAConfig()))
    if spec.startswith("ref:"):
        return load_reference_policy(spec[4:])
    return load_reference_checkpoint(spec)


def measure(policy: ReferencePolicy, calls: int, warmup: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obs = {
        "image": rng.integers(0, 256, policy.config.image_shape, dtype=np.uint8),
        "state": np.array([0.0, 0.6, 0.2, 1.0], dtype=np.float32),
        "instruction": "push the puck to the red goal marker",
    }
    policy.reset(seed=seed)
    for _ in range(warmup):
        policy.select_action(obs)
    policy.reset(seed=seed)
    replan, queued = [], []
    for _ in range(calls):
        will_replan = not policy._queue  # the queue is empty exactly when this call must re-plan
        t0 = time.perf_counter()
        policy.select_action(obs)
        (replan if will_replan else queued).append(time.perf_counter() - t0)
    total = sum(replan) + sum(queued)

    def summary(x: list[float]) -> dict:
        ms = np.array(x) * 1e3
        return {
            "calls": len(x),
            "mean_ms": float(ms.mean()),
            "p50_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)),
        }

    return {
        "replan": summary(replan),
        "queued": summary(queued),
        "per_executed_action_ms": total / calls * 1e3,
        "actions_per_second": calls / total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="ref:metaworld-mt10", help="ref:<name>, a checkpoint dir, or random-init"
    )
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/policy_latency")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy = load(args.model)
    result = {
        "model": args.model,
        "threads": args.threads,
        "chunk_size": policy.config.chunk_size,
        "n_action_steps": policy.config.n_action_steps,
        "num_inference_steps": policy.config.num_inference_steps,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        **measure(policy, args.calls),
    }
    out = Path(args.out)
    _atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    r, q = result["replan"], result["queued"]
    md = (
        f"# select_action latency ({args.model}, {args.threads} CPU thread(s), torch {torch.__version__})\n\n"
        f"Chunk {result['chunk_size']}, execute {result['n_action_steps']}, "
        f"{result['num_inference_steps']} DDIM steps; {args.calls} calls.\n\n"
        "| call | calls | mean ms | p50 ms | p90 ms |\n|---|---|---|---|---|\n"
        f"| re-plan | {r['calls']} | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} |\n"
        f"| queued | {q['calls']} | {q['mean_ms']:.3f} | {q['p50_ms']:.3f} | {q['p90_ms']:.3f} |\n\n"
        f"Per executed action: {result['per_executed_action_ms']:.2f} ms "
        f"({result['actions_per_second']:.1f} actions/s).\n"
    )
    _atomic_write_text(out.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
