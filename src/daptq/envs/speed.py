"""Measure environment throughput (simulate + render) with daptq's fast renderer and with the defaults.

``python -m daptq.envs.speed --task pick-place --steps 200`` prints steps/s for: the fast settings used by
``make_env`` (no shadows, reflections or multisampling), MuJoCo's default render settings at the same size,
and Meta-World's own ``render_mode="rgb_array"`` path (gymnasium renderer, 480x480).
"""

from __future__ import annotations

from daptq.envs import use_headless_rendering

use_headless_rendering()  # simulator modules only: MUJOCO_GL must be set before MuJoCo is imported

import argparse  # noqa: E402
import time  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from daptq.envs import make_env  # noqa: E402
from daptq.envs.render import OffscreenRenderer  # noqa: E402


def _time_steps(env, render, steps: int, seed: int) -> float:
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(steps):
        env._mw.step(rng.uniform(-1, 1, 4))
        render()
    return steps / (time.perf_counter() - start)


def measure(task: str, image_size: int, camera: str, steps: int, seed: int = 0) -> dict[str, float]:
    """Steps/s of Meta-World stepping plus one render per step, for three render settings."""
    results = {}
    env = make_env(task, image_size=image_size, camera=camera, max_steps=500)
    try:
        results[f"fast {image_size}px"] = _time_steps(env, env.render, steps, seed)
        slow = OffscreenRenderer(env._mw.model, image_size, camera, fast=False)
        results[f"mujoco defaults {image_size}px"] = _time_steps(
            env, lambda: slow.render(env._mw.data), steps, seed
        )
        slow.close()
    finally:
        env.close()
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    mw = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-v3-goal-observable"](seed=seed, render_mode="rgb_array")
    mw.mujoco_renderer.camera_id = mujoco.mj_name2id(mw.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    mw.reset()
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(steps):
        mw.step(rng.uniform(-1, 1, 4))
        mw.render()
    results["metaworld default render 480px"] = steps / (time.perf_counter() - start)
    mw.close()
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="daptq data speed", description=__doc__.split("\n")[0])
    from daptq.cli_args import cameras, image_size_int, int_in
    from daptq.envs.tasks import task_name

    p.add_argument("--task", type=task_name, default="pick-place")
    p.add_argument("--image-size", type=image_size_int, default=96)
    p.add_argument("--camera", type=cameras, default="corner3")
    p.add_argument("--steps", type=int_in(1, 1_000_000), default=200)
    args = p.parse_args(argv)
    for name, rate in measure(args.task, args.image_size, args.camera, args.steps).items():
        print(f"{name:34s} {rate:7.1f} steps/s")


if __name__ == "__main__":
    main()
