"""Throughput of paired closed-loop evaluation with 1 and 2 worker processes.

Runs the same paired evaluation (toy candidate with weight noise vs the toy FP reference, so the policy costs
almost nothing and the simulator + renderer dominate, as they do for small VLAs on CPU) once per worker count
and reports episodes/s and env steps/s over the whole call, start-up (env construction, worker spawn)
included. Writes results/eval_throughput.json and .md.

    python benchmarks/eval_throughput.py [--episodes 4] [--max-steps 50] [--tasks reach push]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from daptq.eval import evaluate, store


def measure(workers: int, tasks: list[str], episodes: int, max_steps: int, image_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="daptq-bench-") as tmp:
        start = time.perf_counter()
        evaluate(
            "toy:weight_noise=0.1",
            "toy",
            tasks=tasks,
            episodes=episodes,
            workers=workers,
            out=Path(tmp) / "run",
            max_steps=max_steps,
            image_size=image_size,
            progress=False,
        )
        wall = time.perf_counter() - start
        records = store.read_records(Path(tmp) / "run")
    env_steps = sum(r["env_steps"] for r in records)
    busy = sum(r["wall_s"] for r in records)  # time inside episodes, summed over workers
    return {
        "workers": workers,
        "episodes": len(records),
        "env_steps": env_steps,
        "wall_s": round(wall, 2),
        "episodes_per_s": round(len(records) / wall, 3),
        "env_steps_per_s": round(env_steps / wall, 1),
        "env_steps_per_s_in_episodes_per_worker": round(env_steps / busy, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["reach", "push"])
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", default="results/eval_throughput")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    load_start = os.getloadavg()[0]
    rows = [measure(w, args.tasks, args.episodes, args.max_steps, args.image_size) for w in (1, 2)]
    result = {
        "benchmark": "paired closed-loop evaluation throughput (toy policy, Meta-World, rendering on)",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": os.getloadavg()[0],
        },
        "rows": rows,
        "speedup_2_vs_1_workers": round(rows[1]["episodes_per_s"] / rows[0]["episodes_per_s"], 2),
    }
    out = Path(args.out)
    store.atomic_write_json(out.with_suffix(".json"), result)
    cpus = result["machine"]["cpus"]
    load_end = result["machine"]["load_avg_1m_end"]
    # A load average above ~0.5 before the benchmark's own work means something else was running.
    busy = "other jobs shared the machine" if load_start > 0.5 else "the machine was otherwise idle"
    md = [
        "# Evaluation throughput",
        "",
        f"`{result['command']}` on {cpus} CPUs (1-min load average {load_start:.1f} at "
        f"the start, {load_end:.1f} at the end: {busy}). "
        "Paired episodes (candidate + reference rollout + shadow reference), "
        f"{args.max_steps} steps max, {args.image_size} px images, "
        f"tasks {', '.join(args.tasks)}.",
        "",
        "| workers | episodes | env steps | wall (s) | episodes/s | env steps/s "
        "| env steps/s per worker in episodes |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['workers']} | {r['episodes']} | {r['env_steps']} | {r['wall_s']} | {r['episodes_per_s']} "
            f"| {r['env_steps_per_s']} | {r['env_steps_per_s_in_episodes_per_worker']} |"
            for r in rows
        ),
        "",
        f"Speed-up of 2 workers over 1: {result['speedup_2_vs_1_workers']}x (start-up included).",
        "",
    ]
    store.atomic_write_bytes(out.with_suffix(".md"), "\n".join(md).encode("utf-8"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
