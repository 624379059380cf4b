"""The demo's settings, chosen on the validation split: run ``daptq demo``'s pipeline on ``val`` seeds.

The demo (src/daptq/demo.py) must show a significant difference at the episodes it can afford in < 10 min.
This runs its full settings on the validation seeds (never the eval seeds the demo reports on) and writes the
table to ``results/demo_choice/`` so the choice of tasks, budget and episode count is on record.

    python benchmarks/demo_choice.py --episodes 20 --out runs/demo-choice
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

from daptq.demo import FULL, TABLE_NAME, run_demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=FULL.episodes)
    p.add_argument("--tasks", nargs="+", default=list(FULL.tasks or ()))
    p.add_argument("--budget-bits", type=float, default=FULL.budget_bits)
    p.add_argument("--out", default="runs/demo-choice")
    p.add_argument("--results", default="results/demo_choice")
    args = p.parse_args(argv)
    settings = dataclasses.replace(
        FULL, seed_split="val", episodes=args.episodes, tasks=tuple(args.tasks), budget_bits=args.budget_bits
    )
    summary = run_demo(args.out, settings, progress=False)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(args.out) / TABLE_NAME, results / TABLE_NAME)
    shutil.copy(Path(args.out) / "demo_summary.json", results / "demo_summary.json")
    print(f"total {summary['total_s']:.0f} s; table in {results / TABLE_NAME}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
