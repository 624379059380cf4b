"""The costs behind the evaluation-throughput profile: what one policy call costs per batch size, how many
batch rows are padding, what a render context and a worker's start-up cost. One process, one thread.

    python benchmarks/eval_costs.py [--batches 1 4 8 16] [--episodes 12] [--out results/eval_costs]

Writes results/eval_costs.json and .md (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from daptq.eval import evaluate, store
from daptq.eval.runner import set_process_defaults

MODEL = "ref:metaworld-mt10"

# A fresh interpreter, timed step by step: what a spawned evaluation worker pays before its first episode.
_STARTUP = """
import time; t0 = time.perf_counter()
from daptq.eval.runner import set_process_defaults; set_process_defaults()
import torch; t1 = time.perf_counter()
from daptq.models.registry import load_policy
p = load_policy("ref:metaworld-mt10"); t2 = time.perf_counter()
from daptq.envs import make_env
e = make_env("reach", image_size=96, camera="corner3"); t3 = time.perf_counter()
print(round(t1 - t0, 2), round(t2 - t1, 2), round(t3 - t2, 2))
"""


def call_cost(policy, batches: list[int], repeats: int) -> dict[int, float]:
    """Seconds per ``predict_chunks`` call at each batch size (fixed slots, one observation repeated)."""
    from daptq.envs import make_env

    env = make_env("reach", image_size=policy.image_size, camera=policy.camera, max_steps=10)
    obs = dict(env.reset(seed=0)[0])
    obs["image"] = np.asarray(obs["image"])
    env.close()
    out = {}
    for b in batches:
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        policy.predict_chunks([obs] * b, gens, slots=b)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            policy.predict_chunks([obs] * b, gens, slots=b)
        out[b] = (time.perf_counter() - start) / repeats
    return out


def stage_costs(policy, batches: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """Seconds per batch row of each stage of a call at each batch size: the vision encoder, the backbone
    (given the vision features) and the DiT's sampling loop. Which stages batching can cut, and by how much:
    the backbone already runs ~50 tokens per row at batch 1, the DiT a chunk of 8."""
    from daptq.envs import make_env

    env = make_env("reach", image_size=policy.image_size, camera=policy.camera, max_steps=10)
    obs = dict(env.reset(seed=0)[0])
    obs["image"] = np.asarray(obs["image"])
    env.close()
    model = policy.model
    out = {}
    for b in batches:
        batch = {k: torch.cat([v] * b) for k, v in policy.observation_to_batch(obs).items()}
        with torch.no_grad():
            features = model.vision(batch["image"])
            given = {**{k: v for k, v in batch.items() if k != "image"}, "vision_features": features}
            z = model.condition(given)
            stages = {
                "vision encoder": (model.vision, batch["image"]),
                "backbone (excl. vision)": (model.condition, given),
                "DiT sampling": (model.sample, z),
            }
            out[b] = {}
            for name, (stage, x) in stages.items():
                stage(x)  # warm-up
                start = time.perf_counter()
                for _ in range(repeats):
                    stage(x)
                out[b][name] = (time.perf_counter() - start) / repeats / b
    return out


def padding_share(tasks: list[str], episodes: int, envs: int, tmp: Path) -> dict[str, float]:
    """Fraction of the batch rows computed that are padding, per task, on the batched path (one worker)."""
    from daptq.models.reference import ReferencePolicy

    original = ReferencePolicy.predict_chunks
    counts: Counter = Counter()

    def counted(self, observations, generators, slots=None, **kw):
        counts["rows"] += len(observations)
        counts["slots"] += slots or len(observations)
        return original(self, observations, generators, slots=slots, **kw)

    out = {}
    ReferencePolicy.predict_chunks = counted
    try:
        for task in tasks:
            counts.clear()
            evaluate(MODEL, MODEL, tasks=[task], episodes=episodes, out=tmp / task, max_steps=100,
                     progress=False, reseed_floor=False, envs_per_worker=envs)  # fmt: skip
            out[task] = 1 - counts["rows"] / counts["slots"]
    finally:
        ReferencePolicy.predict_chunks = original
    return out


def render_context_cost(n: int) -> dict[str, float]:
    """Seconds to build the first env of a task (render context included) and each further one (shared)."""
    from daptq.envs import make_env
    from daptq.envs.render import free_idle_context

    free_idle_context()  # the first env builds its render context, not reuse one left by an earlier env
    times = []
    envs = []
    for _ in range(n):
        start = time.perf_counter()
        envs.append(make_env("pick-place", image_size=96, camera="corner3", max_steps=10))
        times.append(time.perf_counter() - start)
    for env in envs:
        env.close()
    return {"first_env_s": times[0], "further_env_s": float(np.mean(times[1:]))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", default=["reach", "push"])
    parser.add_argument("--episodes", type=int, default=12, help="episodes per task for the padding share")
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--out", default="results/eval_costs")
    args = parser.parse_args(argv)
    set_process_defaults()
    torch.set_num_threads(1)
    startup = subprocess.run([sys.executable, "-c", _STARTUP], capture_output=True, text=True, check=True)
    imports, load, env = (float(x) for x in startup.stdout.split()[-3:])
    from daptq.models.registry import load_policy

    policy = load_policy(MODEL)
    calls = call_cost(policy, args.batches, args.repeats)
    stages = stage_costs(policy, args.batches, args.repeats)
    contexts = render_context_cost(4)
    with tempfile.TemporaryDirectory(prefix="daptq-costs-") as tmp:
        padding = padding_share(args.tasks, args.episodes, args.envs, Path(tmp))
    result = {
        "benchmark": "costs behind the evaluation-throughput profile (reference VLA, one thread)",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": vars(args),
        "worker_startup_s": {"import torch": imports, "load policy (encoders incl.)": load, "first env": env},
        "call_s_by_batch": {str(b): round(s, 4) for b, s in calls.items()},
        "call_s_per_row_by_batch": {str(b): round(s / b, 4) for b, s in calls.items()},
        "stage_s_per_row_by_batch": {
            str(b): {k: round(v, 5) for k, v in st.items()} for b, st in stages.items()
        },
        "env_construction_s": {k: round(v, 3) for k, v in contexts.items()},
        "padding_share": {t: round(v, 3) for t, v in padding.items()},
    }
    md = [
        "# Evaluation costs",
        "",
        f"`{result['command']}` (one process, one thread).",
        "",
        "| batch | s / call | s / row | vision encoder ms / row | backbone ms / row | DiT ms / row |",
        "|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {b} | {calls[b]:.3f} | {calls[b] / b:.3f} | "
            + " | ".join(f"{1000 * v:.2f}" for v in stages[b].values())
            + " |"
            for b in args.batches
        ),
        "",
        "Worker start-up in a fresh interpreter (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["worker_startup_s"].items()),
        "",
        f"Env construction (pick-place, 96 px): first {contexts['first_env_s']:.2f} s (render context "
        f"built), further {contexts['further_env_s']:.2f} s each (context shared).",
        "",
        f"Padding rows at --envs-per-worker {args.envs}, {args.episodes} episodes per task: "
        + ", ".join(f"{t} {100 * v:.1f}%" for t, v in padding.items()),
        "",
    ]
    out = Path(args.out)
    store.atomic_write_json(out.with_suffix(".json"), result)
    store.atomic_write_bytes(out.with_suffix(".md"), "\n".join(md).encode("utf-8"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
