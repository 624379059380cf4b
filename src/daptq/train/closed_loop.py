"""A quick closed-loop check of a trained reference VLA: a few episodes per task, success rate per task.

This is the trainer's sanity check, not the evaluation (``daptq eval`` does paired rollouts with intervals).
By default it uses validation seeds, so tuning on it never touches the evaluation seeds.

    python -m daptq.train.closed_loop --model src/daptq/checkpoints/metaworld-mt10 --episodes 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from daptq.atomic import atomic_write_bytes
from daptq.models.reference import ReferencePolicy, load_reference


def run_episode(policy: ReferencePolicy, env, seed: int, policy_seed: int) -> dict:
    """One episode with the evaluator's rollout (``daptq.eval.rollout.run_episode``), as a small record."""
    from daptq.eval.rollout import run_episode as rollout

    result = rollout(env, policy, seed, policy_seed=policy_seed)
    return {"seed": seed, "success": result.success, "steps": result.steps}


def check(
    policy: ReferencePolicy,
    tasks: Sequence[str],
    episodes: int,
    split: str = "val",
    max_steps: int | None = None,
    verbose: bool = True,
    out: str | Path | None = None,
) -> dict[str, dict]:
    """Success rate and mean episode length per task on ``episodes`` seeds of ``split``.

    With ``out``, the results so far are written (atomically) after every task, so a killed run keeps them.
    """
    from daptq.envs import make_env, seed_range

    results = {}
    for task in tasks:
        env = make_env(
            task, image_size=policy.config.image_size, camera=policy.config.camera, max_steps=max_steps
        )
        start = time.monotonic()
        eps = [run_episode(policy, env, s, policy_seed=i) for i, s in enumerate(seed_range(split, episodes))]
        env.close()
        rate = float(np.mean([e["success"] for e in eps]))
        results[task] = {
            "success_rate": rate,
            "mean_steps": float(np.mean([e["steps"] for e in eps])),
            "episodes": eps,
            "seconds": round(time.monotonic() - start, 1),
        }
        if verbose:
            print(
                f"{task:22s} success {rate:5.0%}  mean steps {results[task]['mean_steps']:6.1f}", flush=True
            )
        if out:
            write_results(out, results)
    return results


def write_results(path: str | Path, results: dict[str, dict]) -> None:
    mean = float(np.mean([r["success_rate"] for r in results.values()]))
    text = json.dumps({"mean_success": mean, "tasks": results}, indent=2) + "\n"
    atomic_write_bytes(Path(path), text.encode())


def main(argv: Sequence[str] | None = None) -> None:
    from daptq.envs import MT10

    p = argparse.ArgumentParser(prog="python -m daptq.train.closed_loop", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or ref:<name>")
    p.add_argument("--tasks", nargs="+", default=list(MT10))
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--split", default="val", help="seed split (default val: never the evaluation seeds)")
    p.add_argument("--max-steps", type=int, default=None, help="default: the task's step limit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from daptq.eval.runner import set_process_defaults

    set_process_defaults()
    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    torch.set_num_threads(args.threads)
    results = check(
        load_reference(args.model), args.tasks, args.episodes, args.split, args.max_steps, out=args.out
    )
    mean = float(np.mean([r["success_rate"] for r in results.values()]))
    print(f"{'mean':22s} success {mean:5.0%}")


if __name__ == "__main__":
    main()
