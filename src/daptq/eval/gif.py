"""A short rollout GIF of one episode of a run: candidate left, FP reference right (when the run is paired).

Frames are not stored during evaluation (they would dominate the run directory); the episode is re-run from
the run's config, which reproduces it exactly because rollouts are deterministic given (task, seed).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from daptq.eval import store
from daptq.eval.rollout import run_episode


def _views_stacked(image: np.ndarray) -> np.ndarray:
    """One frame for an observation image: (H, W, 3) as it is, the views of (V, H, W, 3) one above another."""
    return image if image.ndim == 3 else np.concatenate(list(image), axis=0)


def render_rollout_gif(
    run_dir: str | os.PathLike, task: str, seed: int, out: str | os.PathLike | None = None, fps: int = 10
) -> Path:
    """Re-run episode (task, seed) of ``run_dir`` with images and write a GIF (default: in the run dir)."""
    import imageio.v3 as iio

    from daptq.eval.runner import run_suite
    from daptq.models.registry import load_policy

    config = store.read_config(run_dir)
    run = config["run"]
    if task not in run["tasks"]:
        raise ValueError(f"task {task!r} is not part of run {run_dir} (tasks: {', '.join(run['tasks'])})")
    if not run["seed_start"] <= seed < run["seed_start"] + run["episodes"]:
        raise ValueError(
            f"seed {seed} is outside run {run_dir}'s seeds {run['seed_start']}..+{run['episodes']}"
        )
    suite = run_suite(run)  # the run's suite (Meta-World for runs from before suites)
    env = suite.make_env(
        task, image_size=run["image_size"], camera=run["camera"], max_steps=run["max_steps"][task]
    )
    try:
        cand = run_episode(env, load_policy(run["candidate"]), seed, record_frames=True)
        videos = [cand.frames]
        if run["reference"] is not None:
            videos.append(run_episode(env, load_policy(run["reference"]), seed, record_frames=True).frames)
    finally:
        env.close()
    length = max(len(v) for v in videos)
    frames = [
        np.concatenate([_views_stacked(v[min(i, len(v) - 1)]) for v in videos], axis=1) for i in range(length)
    ]
    out = Path(out) if out is not None else Path(run_dir) / f"rollout_{store.episode_key(task, seed)}.gif"
    buf = io.BytesIO()
    iio.imwrite(buf, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
    store.atomic_write_bytes(out, buf.getvalue())
    return out
