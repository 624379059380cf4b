"""Where the scripted experts leave the point that Meta-World scores: Meta-World's own experts against daptq's
aim-corrected ones (``daptq.envs.expert``), noise-free and with the 0.2-std demonstration noise.

For each (task, seed) the expert runs until the first success and ``--hold`` steps more. Reported per task
and expert: success rate, the scored point's distance to the goal at the first success and at the end, and
Meta-World's success radius, and how far above the scored point the hand ends. Reach scores the
fingertip centre (``tcp_center``), push and pick-place the puck. Writes ``results/expert_aim.json``
and ``.md``.

    python benchmarks/expert_aim.py --episodes 20
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from daptq.atomic import atomic_write_bytes

SEED_START = 1_000_000  # the evaluation seeds: these experts never made training data on them


def hand_height_above_scored_point(env) -> float:
    mw = env.unwrapped_metaworld
    scored = mw.tcp_center if env.task == "reach" else mw._get_pos_objects()
    return float(env.metaworld_obs[2] - scored[2])


def run_expert(env, expert, seed: int, noise_std: float, hold: int, max_steps: int) -> dict:
    env.reset(seed=seed)
    goal_z = float(env.unwrapped_metaworld._target_pos[2])
    rng = np.random.default_rng(seed)
    first = at_first = None
    for t in range(max_steps):
        action = expert.act(env)
        if noise_std:
            action = np.clip(action + rng.normal(0.0, noise_std, 4).astype(np.float32), -1.0, 1.0)
        _, _, _, _, info = env.step(action)
        if info["success"] and first is None:
            first, at_first = t, env.goal_distance()
        if first is not None and t >= first + hold:
            break
    return {
        "seed": seed,
        "goal_z_m": goal_z,
        "success": first is not None,
        "dist_at_first_success_m": at_first,
        "final_dist_m": env.goal_distance(),
        "final_hand_above_scored_point_m": hand_height_above_scored_point(env),
    }


def main(argv: list[str] | None = None) -> None:
    from daptq.envs import make_env
    from daptq.envs.expert import ExpertPolicy
    from daptq.envs.metaworld_env import SHARED_SCENE_SUCCESS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tasks = ["reach", "push", "pick-place"]
    p.add_argument("--tasks", nargs="+", default=tasks, choices=tasks)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--hold", type=int, default=15, help="steps run after the first success")
    p.add_argument("--out", default="results/expert_aim")
    args = p.parse_args(argv)
    if args.episodes <= 0 or args.hold < 0:
        raise ValueError("--episodes must be positive and --hold non-negative")

    rows = []
    for task in args.tasks:
        env = make_env(task, image_size=16, max_steps=500)
        try:
            for corrected in (False, True):
                expert = ExpertPolicy(task, aim_corrected=corrected)
                for noise in (0.0, 0.2):
                    seeds = range(SEED_START, SEED_START + args.episodes)
                    eps = [run_expert(env, expert, seed, noise, args.hold, 500) for seed in seeds]
                    ok = [e for e in eps if e["success"]]
                    rows.append(
                        {
                            "task": task,
                            "expert": "daptq (aim-corrected)" if corrected else "Meta-World",
                            "noise_std": noise,
                            "episodes": len(eps),
                            "success_rate": len(ok) / len(eps),
                            "median_dist_at_first_success_m": float(
                                np.median([e["dist_at_first_success_m"] for e in ok])
                            )
                            if ok
                            else None,
                            "median_final_dist_m": float(np.median([e["final_dist_m"] for e in eps])),
                            "median_final_hand_above_scored_point_m": float(
                                np.median([e["final_hand_above_scored_point_m"] for e in eps])
                            ),
                            "success_radius_m": SHARED_SCENE_SUCCESS[task][1],
                            "per_episode": eps,
                        }
                    )
        finally:
            env.close()

    out = Path(args.out)
    result = {"episodes": args.episodes, "hold_steps": args.hold, "seed_start": SEED_START, "rows": rows}
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    lines = [
        f"# Where the experts leave the scored point ({args.episodes} seeds, {args.hold} steps held)",
        "",
        "| task | expert | noise std | success | median distance at first success (cm) "
        "| median final distance (cm) | success radius (cm) | hand above scored point at the end (cm) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        first = r["median_dist_at_first_success_m"]
        lines.append(
            f"| {r['task']} | {r['expert']} | {r['noise_std']} | {r['success_rate']:.0%} | "
            f"{'-' if first is None else f'{100 * first:.1f}'} | {100 * r['median_final_dist_m']:.1f} | "
            f"{100 * r['success_radius_m']:.0f} | {100 * r['median_final_hand_above_scored_point_m']:.1f} |"
        )
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
