"""Success of an evaluation run's reach (or pick-place) episodes, binned by the height of the episode's goal.

Goals are not stored in a run, but a (task, seed) pair fixes them: each seed is reset once to read
``_target_pos``. Writes ``results/success_by_goal_height.json`` and ``.md``.

    python benchmarks/success_by_goal_height.py --run results/fp-mt10 --task reach
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from daptq.atomic import atomic_write_bytes

EDGES = (0.0, 0.10, 0.15, 0.20, 0.25, 0.31)  # metres; Meta-World's floating goals lie in [0.05, 0.30]


def goal_heights(task: str, seeds: list[int]) -> dict[int, float]:
    from daptq.envs import make_env

    env = make_env(task, image_size=16)
    try:
        heights = {}
        for seed in seeds:
            env.reset(seed=seed)
            heights[seed] = float(env.unwrapped_metaworld._target_pos[2])
        return heights
    finally:
        env.close()


def bin_success(records: list[dict], heights: dict[int, float]) -> list[dict]:
    rows = []
    for lo, hi in zip(EDGES, EDGES[1:], strict=False):
        chosen = [r for r in records if lo <= heights[r["seed"]] < hi]
        rows.append(
            {
                "goal_z_m": [lo, hi],
                "episodes": len(chosen),
                "successes": sum(bool(r["success"]) for r in chosen),
                "mean_steps": float(np.mean([r["steps"] for r in chosen])) if chosen else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="evaluation run directory (with episodes.jsonl)")
    p.add_argument("--task", default="reach", choices=["reach", "pick-place"])
    p.add_argument("--out", default="results/success_by_goal_height")
    args = p.parse_args(argv)
    path = Path(args.run) / "episodes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no episodes.jsonl in {args.run}")
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["task"] == args.task]
    if not records:
        raise ValueError(f"run {args.run} has no {args.task} episodes")
    rows = bin_success(records, goal_heights(args.task, sorted({r["seed"] for r in records})))
    result = {"run": str(args.run), "task": args.task, "bins": rows}
    out = Path(args.out)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    lines = [
        f"# {args.task} success by goal height ({args.run})",
        "",
        "| goal z (m) | episodes | success | mean steps |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lo, hi = row["goal_z_m"]
        steps = f"{row['mean_steps']:.0f}" if row["mean_steps"] is not None else "-"
        lines.append(f"| {lo:.2f}-{hi:.2f} | {row['episodes']} | {row['successes']} | {steps} |")
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
