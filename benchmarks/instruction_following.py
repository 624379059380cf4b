"""Does the policy follow the instruction or just the scene? Swapped instructions on the shared scene.

Reach, push and pick-place share one Meta-World scene (a puck and a green goal marker). Each episode here sets
the scene up for one task (its seeded object and goal positions, its step limit) but gives the policy another
task's instruction, then checks both tasks' success criteria on the trajectory, with Meta-World's thresholds:
reach = gripper within 5 cm of the goal, push = puck within 5 cm of it, pick-place = puck within 7 cm of it.

Only pairs where the instructed task is physically possible in the other scene are run: a push goal lies on
the table, reach and pick-place goals are in the air, so "push" is never asked in an air-goal scene.

    python benchmarks/instruction_following.py --model ref:metaworld-mt10 --episodes 25 --workers 2

Writes results/instruction_following.json and results/instruction_following.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

# (scene task, instructed task): the instructed task can be completed in the scene task's set-up.
PAIRS: tuple[tuple[str, str], ...] = (
    ("push", "reach"),
    ("pick-place", "reach"),
    ("reach", "pick-place"),
    ("push", "pick-place"),
)
SEED_OFFSET = 50_000  # inside the eval split, away from the seeds the main evaluation uses


def task_done(env, task: str) -> bool:
    """Meta-World's success criterion of ``task`` evaluated on the current state of a shared-scene env."""
    from daptq.envs.metaworld_env import SHARED_SCENE_SUCCESS

    return env.goal_distance(task) <= SHARED_SCENE_SUCCESS[task][1]


def run_pair_episode(model: str, scene: str, instructed: str, seed: int) -> dict:
    from daptq.envs import DEFAULT_MAX_STEPS, TASKS, make_env
    from daptq.models.registry import load_policy

    policy = _cached_policy(model, load_policy)
    steps = max(DEFAULT_MAX_STEPS[scene], DEFAULT_MAX_STEPS[instructed])
    env = make_env(
        scene,
        instruction=TASKS[instructed],
        max_steps=steps,
        terminate_on_success=False,
        image_size=getattr(policy, "image_size", 96),
        camera=getattr(policy, "camera", "corner3"),
    )
    try:
        obs, _ = env.reset(seed=seed)
        policy.reset(seed=seed)
        did_instructed = did_scene = False
        closest = env.goal_distance(instructed)
        step = 0
        for step in range(steps):  # noqa: B007 (read after the loop)
            obs, _, _, truncated, _ = env.step(policy.select_action(obs))
            closest = min(closest, env.goal_distance(instructed))
            did_instructed = did_instructed or task_done(env, instructed)
            did_scene = did_scene or task_done(env, scene)
            if did_instructed or truncated:
                break
    finally:
        env.close()
    return {
        "scene": scene,
        "instructed": instructed,
        "seed": seed,
        "instructed_done": did_instructed,
        "scene_task_done": did_scene,
        "instructed_closest_m": closest,
        "steps": step + 1,
    }


_POLICIES: dict = {}


def _cached_policy(model: str, load_policy):
    if model not in _POLICIES:
        _POLICIES[model] = load_policy(model)
    return _POLICIES[model]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ref:metaworld-mt10")
    parser.add_argument("--episodes", type=int, default=25, help="episodes per (scene, instruction) pair")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    from daptq.envs import SEED_SPLITS
    from daptq.eval.metrics import wilson_interval
    from daptq.eval.store import atomic_write_bytes, atomic_write_json

    seed0 = SEED_SPLITS["eval"] + SEED_OFFSET
    jobs = [(args.model, s, i, seed0 + k) for s, i in PAIRS for k in range(args.episodes)]
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker) as pool:
        records = pool.starmap(run_pair_episode, jobs)
    wall = time.time() - t0

    rows = []
    for scene, instructed in PAIRS:
        recs = [r for r in records if r["scene"] == scene and r["instructed"] == instructed]
        n = len(recs)
        k_ins = sum(r["instructed_done"] for r in recs)
        k_scene = sum(r["scene_task_done"] for r in recs)
        rows.append(
            {
                "scene": scene,
                "instructed": instructed,
                "episodes": n,
                "instructed_rate": k_ins / n,
                "instructed_ci95": wilson_interval(k_ins, n),
                "scene_task_rate": k_scene / n,
                "scene_task_ci95": wilson_interval(k_scene, n),
                "instructed_closest_median_m": float(np.median([r["instructed_closest_m"] for r in recs])),
            }
        )
    n_all = len(records)
    k_all = sum(r["instructed_done"] for r in records)
    overall = {
        "episodes": n_all,
        "instructed_rate": k_all / n_all,
        "instructed_ci95": wilson_interval(k_all, n_all),
    }
    result = {
        "model": args.model,
        "seed_start": seed0,
        "wall_s": wall,
        "pairs": rows,
        "overall": overall,
        "episodes": records,
    }

    lines = [
        "# Instruction following on the shared reach/push/pick-place scene",
        "",
        f"`python benchmarks/instruction_following.py --model {args.model} --episodes {args.episodes} "
        f"--workers {args.workers}` (seeds {seed0}..{seed0 + args.episodes - 1} per pair, {wall:.0f} s)",
        "",
        "| scene set up for | instruction | episodes | did the instructed task % [95% CI] "
        "| did the scene's task % [95% CI] | instructed task's point, median closest approach (cm) |",
        "|---|---|---:|---|---|---:|",
    ]
    for r in rows:
        lo, hi = r["instructed_ci95"]
        slo, shi = r["scene_task_ci95"]
        lines.append(
            f"| {r['scene']} | {r['instructed']} | {r['episodes']} | {100 * r['instructed_rate']:.0f} "
            f"[{100 * lo:.0f}, {100 * hi:.0f}] | {100 * r['scene_task_rate']:.0f} "
            f"[{100 * slo:.0f}, {100 * shi:.0f}] | {100 * r['instructed_closest_median_m']:.1f} |"
        )
    lo, hi = overall["instructed_ci95"]
    lines.append(
        f"| **all** | | {n_all} | **{100 * overall['instructed_rate']:.0f}** [{100 * lo:.0f}, "
        f"{100 * hi:.0f}] | | |"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "instruction_following.json", result)
    atomic_write_bytes(out / "instruction_following.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
