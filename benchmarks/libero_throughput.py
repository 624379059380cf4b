"""LIBERO evaluation throughput with original vs decimated render meshes, where the time goes, and whether the
decimated meshes are faithful.

For each task and each of LIBERO's official init states 0..N-1, one episode runs twice on the same env: once
rendering the agentview image with the scene's original meshes, once with ``daptq.envs.render_meshes``'
decimated visual meshes. The actor is daptq's scripted expert (``daptq.envs.libero_expert``) with DART noise,
and the image is rendered every ``--replan-every`` steps (what a chunked policy reads: the reference VLA
re-plans every 4 actions). Per step it times, in process CPU seconds and wall seconds:

- physics: ``env.step`` (robosuite's OSC controller + 25 MuJoCo substeps + observables);
- render: one agentview render (per render call);
- expert: the scripted expert's action (the state machine; a VLA's call is taken from
  ``results/policy_latency.json``, measured on Meta-World's reference VLA, for the projection below).

Faithfulness: (a) physics does not see the render meshes, so both passes of an episode must end in the same
simulator state and the same success (checked, bit for bit); (b) at every render point of the decimated pass
the original image is rendered too (not timed) and compared: mean absolute pixel difference, share of pixels
off by more than 16/255, PSNR and SSIM (Gaussian window, sigma 1.5).

    nice -n 10 python benchmarks/libero_throughput.py --init-states 2 --out results/libero_throughput
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from daptq.atomic import atomic_write_json, atomic_write_text

NOISE_SALT = 0x11BE20  # as benchmarks/libero_experts.py: the same noise on the same init state
DEFAULT_TASKS = ("spatial-0", "spatial-4", "object-0", "object-5")


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of two uint8 RGB images, Gaussian window, averaged over channels."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda z: gaussian_filter(z, sigma, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean())
    return float(np.mean(out))


def image_diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float((d.astype(np.float64) ** 2).mean())
    return {
        "mae": float(d.mean()),
        "frac_over_16": float((d.max(axis=-1) > 16).mean()),
        "psnr": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse)),
        "ssim": ssim(a, b),
    }


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.process_time() - c, time.perf_counter() - w


def run_pass(env, task, episode_id, renderer, reference, args) -> dict:
    """One episode; renders with ``renderer`` every ``replan_every`` steps (timed) and, when ``reference`` is
    given, also with it (untimed) to compare the images."""
    from daptq.envs.libero_expert import LiberoExpert

    expert = LiberoExpert(task)
    rng = np.random.default_rng([episode_id, NOISE_SALT])
    data = env.sim.data._data
    # MuJoCo warm-starts each step's solver from the previous one, across resets too; clear it so that the two
    # passes of an episode start from the same bits and can be compared bit for bit.
    data.qacc_warmstart[:] = 0
    env.reset(seed=episode_id)
    cost = {k: [0.0, 0.0] for k in ("physics", "render", "expert")}
    renders, diffs, step = 0, [], 0
    while True:
        if step % args.replan_every == 0:
            image, c, w = timed(renderer.render, data)
            cost["render"][0] += c
            cost["render"][1] += w
            renders += 1
            if reference is not None:
                diffs.append(image_diff(reference.render(data), image))
        action, c, w = timed(expert.act, env)
        cost["expert"][0] += c
        cost["expert"][1] += w
        noisy = np.clip(action + rng.normal(0.0, args.noise_std, action.shape), -1.0, 1.0)
        (_, _, terminated, truncated, info), c, w = timed(env.step, noisy)
        cost["physics"][0] += c
        cost["physics"][1] += w
        step += 1
        if terminated or truncated:
            break
    state = np.concatenate([data.qpos, data.qvel]).astype(np.float64)
    row = {
        "task": task,
        "episode_id": int(episode_id),
        "success": bool(info["success"]),
        "steps": int(env.steps),
        "renders": renders,
        "final_state_sha256": hashlib.sha256(state.tobytes()).hexdigest(),
        "physics_cpu_ms": 1000 * cost["physics"][0] / env.steps,
        "physics_wall_ms": 1000 * cost["physics"][1] / env.steps,
        "expert_cpu_ms": 1000 * cost["expert"][0] / env.steps,
        "expert_wall_ms": 1000 * cost["expert"][1] / env.steps,
        "render_cpu_ms": 1000 * cost["render"][0] / renders,
        "render_wall_ms": 1000 * cost["render"][1] / renders,
    }
    if diffs:
        row["image_diff"] = {k: [d[k] for d in diffs] for k in diffs[0]}
    return row


def summarize(rows: list[dict], builds: dict, args: argparse.Namespace, command: str) -> tuple[dict, str]:
    policy_ms = None
    latency = Path("results/policy_latency.json")
    if latency.exists():
        lat = json.loads(latency.read_text())
        policy_ms = _replan_ms(lat)
    k = args.replan_every
    modes = {}
    for mode in ("original", "decimated"):
        mine = [r for r in rows if r["mode"] == mode]
        med = lambda key, m=mine: float(np.median([r[key] for r in m]))  # noqa: E731
        steps = sum(r["steps"] for r in mine)
        phys, rend, expert = med("physics_cpu_ms"), med("render_cpu_ms"), med("expert_cpu_ms")
        per_step = phys + rend / k + expert
        mean_len = steps / len(mine)
        entry = {
            "episodes": len(mine),
            "successes": sum(r["success"] for r in mine),
            "steps": steps,
            "cpu_ms_per_step": {
                "physics": phys,
                "render_per_call": rend,
                "render": rend / k,
                "expert": expert,
            },
            "wall_ms_per_step": {
                "physics": med("physics_wall_ms"),
                "render_per_call": med("render_wall_ms"),
                "expert": med("expert_wall_ms"),
            },
            "expert_steps_per_s": 1000 / per_step,
            "expert_episodes_per_min": 60_000 / (per_step * mean_len),
            "mean_episode_steps": mean_len,
        }
        if policy_ms is not None:
            vla_step = phys + (rend + policy_ms) / k
            entry["vla_projection"] = {
                "policy_ms_per_call": policy_ms,
                "ms_per_step": vla_step,
                "steps_per_s": 1000 / vla_step,
                "episodes_per_min": 60_000 / (vla_step * mean_len),
                "share": {
                    "physics": phys / vla_step,
                    "render": rend / k / vla_step,
                    "policy": policy_ms / k / vla_step,
                },  # fmt: skip
            }
        modes[mode] = entry
    by_key = {}
    for r in rows:
        by_key.setdefault((r["task"], r["episode_id"]), {})[r["mode"]] = r
    pairs = [p for p in by_key.values() if len(p) == 2]
    same_state = sum(
        p["original"]["final_state_sha256"] == p["decimated"]["final_state_sha256"] for p in pairs
    )
    same_success = sum(p["original"]["success"] == p["decimated"]["success"] for p in pairs)
    diffs = {}
    for key in ("mae", "frac_over_16", "psnr", "ssim"):
        vals = np.concatenate([r["image_diff"][key] for r in rows if "image_diff" in r])
        diffs[key] = {"mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max()),
                      "p5": float(np.percentile(vals, 5)), "p95": float(np.percentile(vals, 95)),
                      "images": int(len(vals))}  # fmt: skip
    per_task = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        t = [r for r in rows if r["task"] == task]
        d = np.concatenate([r["image_diff"]["ssim"] for r in t if "image_diff" in r])
        per_task[task] = {
            "success_original": sum(r["success"] for r in t if r["mode"] == "original"),
            "success_decimated": sum(r["success"] for r in t if r["mode"] == "decimated"),
            "episodes": sum(r["mode"] == "original" for r in t),
            "ssim_mean": float(d.mean()),
            "ssim_min": float(d.min()),
            "render_cpu_ms_original": float(
                np.median([r["render_cpu_ms"] for r in t if r["mode"] == "original"])
            ),
            "render_cpu_ms_decimated": float(
                np.median([r["render_cpu_ms"] for r in t if r["mode"] == "decimated"])
            ),
            **builds.get(task, {}),
        }
    result = {
        "command": command,
        "image_size": args.image_size,
        "replan_every": k,
        "noise_std": args.noise_std,
        "max_faces": args.max_faces,
        "keep_fraction": args.keep_fraction,
        "faithfulness": {
            "episode_pairs": len(pairs),
            "same_final_state": same_state,
            "same_success": same_success,
            "image_diff": diffs,
        },
        "modes": modes,
        "per_task": per_task,
    }
    o, d = modes["original"], modes["decimated"]
    oc, dc = o["cpu_ms_per_step"], d["cpu_ms_per_step"]
    lines = [
        "# LIBERO evaluation throughput: original vs decimated render meshes",
        "",
        f"`{command}`",
        "",
        f"Tasks {', '.join(per_task)}; LIBERO's official init states 0..{args.init_states - 1}; the scripted "
        f"expert with DART noise {args.noise_std}; one {args.image_size} px agentview render every {k} steps "
        f"(a chunked policy's re-plan). Medians over episodes of process CPU ms (one process on a shared "
        f"2-core machine; wall times in the JSON). Decimation: visual-only meshes above {args.max_faces} "
        f"faces, to max({args.max_faces}, {args.keep_fraction} x their faces).",
        "",
        "| | original meshes | decimated meshes |",
        "|---|---|---|",
        f"| physics + OSC controller, ms/step | {oc['physics']:.1f} | {dc['physics']:.1f} |",
        f"| one render, ms | {oc['render_per_call']:.1f} | {dc['render_per_call']:.1f} |",
        f"| render, ms/step (1 in {k}) | {oc['render']:.1f} | {dc['render']:.1f} |",
        f"| scripted expert, ms/step | {oc['expert']:.2f} | {dc['expert']:.2f} |",
        f"| expert rollouts: steps/s | {o['expert_steps_per_s']:.1f} | {d['expert_steps_per_s']:.1f} |",
        f"| expert rollouts: episodes/min | {o['expert_episodes_per_min']:.2f} | "
        f"{d['expert_episodes_per_min']:.2f} |",
    ]
    if policy_ms is not None:
        ov, dv = o["vla_projection"], d["vla_projection"]
        lines += [
            f"| VLA eval (+{policy_ms:.1f} ms policy call per re-plan): steps/s | {ov['steps_per_s']:.1f} | "
            f"{dv['steps_per_s']:.1f} |",
            f"| VLA eval: episodes/min | {ov['episodes_per_min']:.2f} | {dv['episodes_per_min']:.2f} |",
            "| VLA eval: share physics / render / policy | "
            + " / ".join(f"{100 * ov['share'][x]:.0f}%" for x in ("physics", "render", "policy"))
            + " | "
            + " / ".join(f"{100 * dv['share'][x]:.0f}%" for x in ("physics", "render", "policy"))
            + " |",
        ]
    fd = diffs
    lines += [
        "",
        f"Faithfulness. (a) Physics: {same_state}/{len(pairs)} episode pairs end in bit-identical simulator "
        f"states, {same_success}/{len(pairs)} with the same success (the render meshes are a separate "
        "model). "
        f"(b) The policy's images, {fd['ssim']['images']} renders compared on the same states: SSIM mean "
        f"{fd['ssim']['mean']:.4f} (min {fd['ssim']['min']:.4f}), mean absolute difference "
        f"{fd['mae']['mean']:.2f}/255 (max {fd['mae']['max']:.2f}), pixels off by more than 16/255: "
        f"{100 * fd['frac_over_16']['mean']:.2f}% (max {100 * fd['frac_over_16']['max']:.2f}%), PSNR mean "
        f"{fd['psnr']['mean']:.1f} dB.",
        "",
        "| task | episodes | expert success original / decimated | SSIM mean (min) | render ms original -> "
        "decimated | mesh vertices drawn, original -> decimated |",
        "|---|---|---|---|---|---|",
    ]
    for task, t in per_task.items():
        lines.append(
            f"| {task} | {t['episodes']} | {t['success_original']} / {t['success_decimated']} | "
            f"{t['ssim_mean']:.4f} ({t['ssim_min']:.4f}) | {t['render_cpu_ms_original']:.1f} -> "
            f"{t['render_cpu_ms_decimated']:.1f} | {t.get('drawn_vertices', 0):,} -> "
            f"{t.get('render_drawn_vertices', 0):,} |"
        )
    if policy_ms is not None:
        lines += [
            "",
            f"The VLA rows add the re-plan latency of `results/policy_latency.json` ({policy_ms:.1f} ms, "
            "Meta-World's reference VLA, 1 thread) to the measured physics and render costs: a projection, "
            "not a LIBERO policy measurement.",
        ]
    return result, "\n".join(lines) + "\n"


def _replan_ms(latency: dict) -> float | None:
    """The mean re-plan latency in ``results/policy_latency.json`` (whatever its nesting)."""
    stack = [latency]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("replan", "re-plan") and isinstance(value, dict) and "mean_ms" in value:
                    return float(value["mean_ms"])
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS))
    p.add_argument("--init-states", type=int, default=2)
    p.add_argument("--replan-every", type=int, default=4)
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--max-faces", type=int, default=None, help="default: DecimationOptions().max_faces")
    p.add_argument("--keep-fraction", type=float, default=None, help="default: DecimationOptions()'s")
    p.add_argument("--out", default="results/libero_throughput")
    args = p.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    from daptq.envs.render import OffscreenRenderer
    from daptq.envs.render_meshes import DecimatedRenderer, DecimationOptions
    from daptq.envs.suite import get_suite

    default = DecimationOptions()
    options = DecimationOptions(
        max_faces=default.max_faces if args.max_faces is None else args.max_faces,
        keep_fraction=default.keep_fraction if args.keep_fraction is None else args.keep_fraction,
    )
    args.max_faces, args.keep_fraction = options.max_faces, options.keep_fraction
    suite = get_suite("libero")
    tasks = suite.check_tasks(args.tasks)
    command = (
        f"nice -n 10 python benchmarks/libero_throughput.py --tasks {' '.join(tasks)} --init-states "
        f"{args.init_states} --replan-every {args.replan_every} --max-faces {args.max_faces} --keep-fraction "
        f"{args.keep_fraction} --out {args.out}"
    )
    rows, builds = [], {}
    for task in tasks:
        env = suite.make_env(task, image_size=args.image_size, lazy_images=True)
        env.reset(seed=suite.episode_ids("eval", 1)[0])
        model = env.sim.model._model
        original = OffscreenRenderer(model, args.image_size, env.camera)
        xml = env.robosuite_env.model.get_xml()
        decimated, c, w = timed(DecimatedRenderer, xml, model, args.image_size, env.camera, options)
        builds[task] = {**decimated.summary, "render_model_build_wall_s": w, "render_model_build_cpu_s": c}
        for episode_id in suite.episode_ids("eval", args.init_states):
            for mode, renderer, reference in (
                ("original", original, None),
                ("decimated", decimated, original),
            ):
                row = run_pass(env, task, episode_id, renderer, reference, args)
                row["mode"] = mode
                rows.append(row)
                print(
                    f"{task} {episode_id} {mode}: success={row['success']} steps={row['steps']} "
                    f"physics={row['physics_cpu_ms']:.1f} render={row['render_cpu_ms']:.1f} ms",
                    flush=True,
                )
        decimated.close()
        original.close()
        env.close()
    result, markdown = summarize(rows, builds, args, command)
    result["episodes"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
