"""Success of daptq's scripted LIBERO experts (``daptq.envs.libero_expert``) per task, with DART noise, and
what a LIBERO env step costs here.

Each task runs from LIBERO's official init states 0..N-1 (the eval split's first N episode ids) with the
demonstration noise added to the executed action (the clean action is the label); an episode succeeds when
LIBERO's BDDL goal holds within the task's step limit (220 Spatial / 280 Object). Per step it times physics
(robosuite's OSC controller + 25 MuJoCo substeps + observables) and, on the first step of each episode, one
agentview render at ``--image-size``, in process CPU seconds (the machine is shared, so wall time is not
reliable) and wall seconds. Progress goes to ``OUT.jsonl`` one episode a line; ``OUT.json`` and ``OUT.md``
are written at the end.

    nice python benchmarks/libero_experts.py --init-states 10 --out results/libero_experts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from daptq.atomic import atomic_write_json, atomic_write_text

NOISE_SALT = 0x11BE20


def run_episode(env, expert, episode_id: int, noise_std: float, time_render: bool) -> dict:
    rng = np.random.default_rng([episode_id, NOISE_SALT])
    obs, info = env.reset(seed=episode_id)
    physics_cpu = physics_wall = 0.0
    render = None
    if time_render:
        w, c = time.perf_counter(), time.process_time()
        obs["image"]  # noqa: B018 (the lazy image renders on first read)
        render = (time.process_time() - c, time.perf_counter() - w)
    phases = []
    while True:
        action = expert.act(env)
        if not phases or phases[-1] != expert.phase:
            phases.append(expert.phase)
        noisy = np.clip(action + rng.normal(0.0, noise_std, action.shape), -1.0, 1.0)
        w, c = time.perf_counter(), time.process_time()
        obs, _, terminated, truncated, info = env.step(noisy)
        physics_cpu += time.process_time() - c
        physics_wall += time.perf_counter() - w
        if terminated or truncated:
            break
    return {
        "task": env.task,
        "episode_id": int(episode_id),
        "success": bool(info["success"]),
        "steps": int(env.steps),
        "retries": int(expert.retries),
        "phases": phases,
        "physics_cpu_ms": 1000 * physics_cpu / env.steps,
        "physics_wall_ms": 1000 * physics_wall / env.steps,
        "render_cpu_ms": None if render is None else 1000 * render[0],
        "render_wall_ms": None if render is None else 1000 * render[1],
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(rows: list[dict], args: argparse.Namespace, command: str) -> tuple[dict, str]:
    from daptq.envs.suite import get_suite

    suite = get_suite("libero")
    per_task = {}
    for task in suite.tasks:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        k = sum(r["success"] for r in mine)
        ok_steps = [r["steps"] for r in mine if r["success"]]
        per_task[task] = {
            "instruction": suite.tasks[task],
            "episodes": len(mine),
            "successes": k,
            "success_rate": k / len(mine),
            "wilson95": wilson(k, len(mine)),
            "median_steps_success": float(np.median(ok_steps)) if ok_steps else None,
            "max_steps_success": max(ok_steps) if ok_steps else None,
            "step_limit": suite.max_steps[task],
            "retries": sum(r["retries"] for r in mine),
        }
    med = lambda key: float(np.median([r[key] for r in rows if r[key] is not None]))  # noqa: E731
    total = sum(t["successes"] for t in per_task.values())
    n = sum(t["episodes"] for t in per_task.values())
    result = {
        "command": command,
        "noise_std": args.noise_std,
        "init_states": args.init_states,
        "image_size": args.image_size,
        "overall": {"episodes": n, "successes": total, "success_rate": total / max(n, 1)},
        "cost_ms_median": {
            "physics_cpu": med("physics_cpu_ms"),
            "physics_wall": med("physics_wall_ms"),
            "render_cpu": med("render_cpu_ms"),
            "render_wall": med("render_wall_ms"),
        },
        "per_task": per_task,
    }
    lines = [
        "# LIBERO scripted experts: success per task",
        "",
        f"`{command}`",
        "",
        f"Official init states from 0 (up to {args.init_states} per task; the episodes column says how many "
        f"ran), DART noise std {args.noise_std} on the "
        f"executed action (the clean action is the label); LIBERO's step limits. Overall: {total}/{n} "
        f"({100 * total / max(n, 1):.1f}%).",
        "",
        "| task | instruction | success | 95% interval | median steps (success) | max | limit | retries |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, t in per_task.items():
        lo, hi = t["wilson95"]
        lines.append(
            f"| {task} | {t['instruction']} | {t['successes']}/{t['episodes']} "
            f"| {100 * lo:.0f}-{100 * hi:.0f}% | {t['median_steps_success']} | {t['max_steps_success']} "
            f"| {t['step_limit']} | {t['retries']} |"
        )
    c = result["cost_ms_median"]
    lines += [
        "",
        f"Cost per env step (median over episodes, one process on a shared 2-core machine): physics "
        f"{c['physics_cpu']:.0f} ms CPU ({c['physics_wall']:.0f} ms wall); "
        f"one {args.image_size} px agentview render {c['render_cpu']:.0f} ms CPU "
        f"({c['render_wall']:.0f} ms wall).",
        "",
    ]
    return result, "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=None, help="task names or libero_spatial / libero_object")
    p.add_argument("--init-states", type=int, default=10)
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--out", default="results/libero_experts")
    p.add_argument(
        "--summarize", action="store_true", help="write OUT.json/.md from OUT.jsonl's episodes only"
    )
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    from daptq.envs.libero_expert import LiberoExpert
    from daptq.envs.libero_suite import EVAL_START
    from daptq.envs.suite import get_suite

    suite = get_suite("libero")
    tasks = suite.check_tasks(args.tasks)
    command = "python benchmarks/libero_experts.py " + " ".join(
        [f"--init-states {args.init_states}", f"--noise-std {args.noise_std}", f"--out {args.out}"]
        + ([f"--tasks {' '.join(args.tasks)}"] if args.tasks else [])
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in progress.read_text().splitlines()] if progress.exists() else []
    done = {(r["task"], r["episode_id"]) for r in rows}
    for task in [] if args.summarize else tasks:
        ids = [i for i in suite.episode_ids("eval", args.init_states) if (task, i) not in done]
        if not ids:
            continue
        env = suite.make_env(task, image_size=args.image_size, lazy_images=True)
        expert = LiberoExpert(task)
        for episode_id in ids:
            row = run_episode(env, expert, episode_id, args.noise_std, time_render=True)
            rows.append(row)
            with open(progress, "a") as f:
                f.write(json.dumps(row) + "\n")
            index = episode_id - EVAL_START
            print(f"{task} {index}: success={row['success']} steps={row['steps']}", flush=True)
        env.close()
    last = EVAL_START + args.init_states
    rows = [r for r in rows if r["task"] in tasks and r["episode_id"] < last]
    result, markdown = summarize(rows, args, command)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
