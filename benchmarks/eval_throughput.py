"""Throughput of paired closed-loop evaluation with the reference VLA: today's path against batching + cache.

Measured in one run on the same (task, seed) list, all with 2 workers (the benchmark process, which loads
the policy once before any timing, and one spawned process):

- baseline: ``--envs-per-worker 1 --no-reference-cache`` (the one-env path, every rollout computed);
- first method: ``--envs-per-worker N`` with an empty reference cache (the reference is computed, batched,
  and cached);
- second method: the same again against the now cached reference (no reference rollout at all);
- both new paths once per ``--envs`` value;
- all rows once per round, ``--repeats`` interleaved rounds (this machine's speed drifts by up to a quarter
  over minutes, so a row measured once, minutes after the baseline, says little): each row reports its median
  round, and the speed-up of every round against that round's baseline is kept beside it.

The candidate is the reference VLA itself (``ref:metaworld-mt10`` against ``ref:metaworld-mt10``): a
candidate's cost per call is that of the network it runs, which for an FP candidate is the reference's
(fake-quantized candidates cost more, which favours batching further). The reseed floor is off in all
rows (``--reseed-floor`` turns it on in the new paths only), so every row does the same paired work as
today's path. Then one process profiles where a paired episode's time goes (physics, render, vision
encoder, backbone, DiT sampling, the rest: Python and the metrics) on the baseline path and the batched
paths (the first ``--envs`` value), measures each stage's cost per batch row at batch 1 and each ``--envs``
value, and from both estimates the ceiling of what batching and the cache can give inside episodes
(``attainable_speedups``: where the target ratios are out of reach on a machine, it says so). Writes
results/eval_throughput.json and .md.

    python benchmarks/eval_throughput.py [--tasks reach push] [--episodes 8] [--max-steps 60] [--envs 4 8]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from daptq.eval import evaluate, store

MODEL = "ref:metaworld-mt10"
BASELINE = "baseline (one env, no cache)"


def _median_round(runs: list[dict]) -> dict:
    """The round with the median wall time (the lower of the two middle ones for an even count), with
    every round's wall time beside it."""
    row = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
    return {**row, "wall_s_rounds": [r["wall_s"] for r in runs]}


def _run(out: Path, args, workers: int, envs: int, cache: Path | None, floor: bool) -> dict:
    start = time.perf_counter()
    evaluate(
        MODEL,
        MODEL,
        tasks=args.tasks,
        episodes=args.episodes,
        workers=workers,
        out=out,
        max_steps=args.max_steps,
        progress=False,
        reference_cache=cache,
        reseed_floor=floor,
        envs_per_worker=envs,
    )
    wall = time.perf_counter() - start
    records = store.read_records(out)
    return {
        "episodes": len(records),
        "wall_s": round(wall, 2),
        "paired_episodes_per_s": round(len(records) / wall, 4),
        # Excluding start-up (policy loading, worker spawn, env construction): time inside episodes.
        "paired_episodes_per_s_in_episodes": round(
            len(records) / (sum(r["wall_s"] for r in records) / workers), 4
        ),
        "simulated_steps": sum(r["simulated_steps"] for r in records),
        "reference_cached": sum(bool(r["reference_cached"]) for r in records),
        "drift_max_mean": sum(r["drift_max"] for r in records) / len(records),
    }


class _Profile:
    """Wall time inside a few functions of the rollout, by wrapping them (one process, one thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)  # also "label within outer" for nested calls
        self._active: list[str] = []
        self._undo: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            outer = list(self._active)
            self._active.append(label)
            try:
                return original(*a, **kw)
            finally:
                self._active.pop()
                dt = time.perf_counter() - t
                self.seconds[label] += dt
                for o in outer:
                    self.seconds[f"{label} within {o}"] += dt

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def profile(args, tmp: Path, envs: int, cache: Path | None, label: str) -> dict:
    from daptq.envs.metaworld_env import MetaWorldEnv
    from daptq.models.encoders import VisionEncoder
    from daptq.models.reference import ReferenceVLA

    prof = _Profile()
    prof.wrap(MetaWorldEnv, "step", "env")
    prof.wrap(MetaWorldEnv, "reset", "env")
    prof.wrap(MetaWorldEnv, "render", "render")
    prof.wrap(VisionEncoder, "forward", "vision encoder")
    prof.wrap(ReferenceVLA, "condition", "backbone incl. vision")
    prof.wrap(ReferenceVLA, "sample", "DiT sampling")
    try:
        start = time.perf_counter()
        evaluate(
            MODEL,
            MODEL,
            tasks=args.tasks[:1],
            episodes=args.profile_episodes,
            workers=1,
            out=tmp / f"profile-{label}",
            max_steps=args.max_steps,
            progress=False,
            reference_cache=cache,
            reseed_floor=False,
            envs_per_worker=envs,
        )
        wall = time.perf_counter() - start
    finally:
        prof.restore()
    s = prof.seconds
    records = store.read_records(tmp / f"profile-{label}")
    busy = sum(r["wall_s"] for r in records)  # inside episodes (policy load and env construction excluded)
    parts = {
        # The evaluator's envs render lazily (when a policy reads the image), outside env.step / reset.
        "physics (env step/reset)": s["env"],
        "render": s["render"],
        "vision encoder": s["vision encoder"],
        # The vision encoder runs inside ``condition`` unless a candidate and its shadow share its features.
        "backbone (excl. vision)": (
            s["backbone incl. vision"] - s["vision encoder within backbone incl. vision"]
        ),
        "DiT sampling": s["DiT sampling"],
    }
    parts["Python, metrics, rest"] = busy - sum(parts.values())
    n = len(records)
    return {
        "path": label,
        "episodes": n,
        "wall_s_incl_startup": round(wall, 2),
        "seconds_per_paired_episode": round(busy / n, 3),
        "share": {k: round(v / busy, 3) for k, v in parts.items()},
        "seconds_per_episode": {k: round(v / n, 3) for k, v in parts.items()},
    }


def attainable_speedups(baseline: dict, stages: dict[int, dict[str, float]], n: int) -> dict[str, float]:
    """The speed-ups inside episodes that batching at ``n`` and the cache could give at most, from the
    baseline's profile and the per-row stage costs at batch 1 and ``n`` (``eval_costs.stage_costs``).

    Per re-plan the baseline runs three batch-1 calls (candidate, shadow, reference) and simulates two
    rollouts. The cold path runs the same calls at batch ``n``, the candidate's and shadow's sharing one
    vision pass (2 of 3 vision passes), and simulates the same; the cached path runs only the candidate's
    and the shadow's (1 of 3 vision passes, 2 of 3 backbone and DiT passes) and simulates half (its
    Python work halved too). Full batches, no start-up, no padding: a ceiling, not a forecast (estimated
    from one task's profile, so measured rows on other tasks can land a little above it)."""
    per = baseline["seconds_per_episode"]
    gain = {k: stages[n][k] / stages[1][k] for k in stages[1]}
    env = per["physics (env step/reset)"] + per["render"] + per["Python, metrics, rest"]
    vision, backbone, dit = (
        per[k] * gain[k] for k in ("vision encoder", "backbone (excl. vision)", "DiT sampling")
    )
    total = sum(per.values())
    cold = env + vision * 2 / 3 + backbone + dit
    cached = env / 2 + vision / 3 + (backbone + dit) * 2 / 3
    return {"cold cache": round(total / cold, 2), "cached reference": round(total / cached, 2)}


def stage_costs(policy, batches: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """``eval_costs.stage_costs``, loaded from the sibling file (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eval_costs", Path(__file__).resolve().parent / "eval_costs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.stage_costs(policy, batches, repeats)


def _warm_up() -> None:
    """Load the policy once before timing, so every row finds this process in the same state (the first
    load imports transformers and the encoders: seconds that would otherwise fall on the first row only)."""
    from daptq.eval.runner import set_process_defaults
    from daptq.models.registry import load_policy

    set_process_defaults()
    load_policy(MODEL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["reach", "push"])
    parser.add_argument("--episodes", type=int, default=8, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument(
        "--envs", type=int, nargs="+", default=[4], help="--envs-per-worker of the new paths (one pair each)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved rounds of all rows; each reports its median"
    )
    parser.add_argument("--profile-episodes", type=int, default=4, help="episodes of the profile (one task)")
    parser.add_argument("--reseed-floor", action="store_true", help="compute the floor in the new paths")
    parser.add_argument("--out", default="results/eval_throughput")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="daptq-bench-") as tmp_name:
        tmp = Path(tmp_name)
        w = args.workers
        _warm_up()
        rounds: dict[str, list[dict]] = defaultdict(list)
        for r in range(args.repeats):  # interleaved, so a slow spell of the machine hits every row alike
            rounds[BASELINE].append(_run(tmp / f"base-{r}", args, w, 1, None, False))
            for n in args.envs:
                cache = tmp / f"cache-{n}-{r}"  # cold again in every round
                rounds[f"first method (batched x{n}, cold cache)"].append(
                    _run(tmp / f"first-{n}-{r}", args, w, n, cache, args.reseed_floor)
                )
                rounds[f"second method (batched x{n}, cached reference)"].append(
                    _run(tmp / f"second-{n}-{r}", args, w, n, cache, args.reseed_floor)
                )
        rows = {name: _median_round(runs) for name, runs in rounds.items()}
        per_round = {
            name: [round(b["wall_s"] / x["wall_s"], 2) for b, x in zip(rounds[BASELINE], runs, strict=True)]
            for name, runs in rounds.items()
        }
        n = args.envs[0]
        profiles = [
            profile(args, tmp, 1, None, "baseline: one env, no cache"),
            profile(args, tmp, n, tmp / "pcache", f"batched x{n}, cold cache"),
            profile(args, tmp, n, tmp / "pcache", f"batched x{n}, cached reference"),
        ]
        from daptq.models.registry import load_policy

        stages = stage_costs(load_policy(MODEL), sorted({1, *args.envs}), repeats=20)
        bounds = {f"x{m}": attainable_speedups(profiles[0], stages, m) for m in args.envs}
    base = rows[BASELINE]["paired_episodes_per_s"]
    ratios = {k: round(v["paired_episodes_per_s"] / base, 2) for k, v in rows.items()}
    base_in = rows[BASELINE]["paired_episodes_per_s_in_episodes"]
    ratios_in = {k: round(v["paired_episodes_per_s_in_episodes"] / base_in, 2) for k, v in rows.items()}
    result = {
        "benchmark": "paired closed-loop evaluation throughput (reference VLA vs itself, Meta-World)",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": os.getloadavg()[0],
        },
        "rows": rows,
        "speedup_vs_baseline": ratios,
        "speedup_vs_baseline_per_round": per_round,
        "speedup_vs_baseline_in_episodes": ratios_in,
        "profile": profiles,
        "stage_s_per_row_by_batch": {
            str(b): {k: round(v, 5) for k, v in st.items()} for b, st in stages.items()
        },
        "attainable_speedup_in_episodes": bounds,
    }
    out = Path(args.out)
    store.atomic_write_json(out.with_suffix(".json"), result)
    md = _markdown(result, args)
    store.atomic_write_bytes(out.with_suffix(".md"), md.encode("utf-8"))
    print(md)


def _markdown(result: dict, args) -> str:
    m = result["machine"]
    md = [
        "# Evaluation throughput",
        "",
        f"`{result['command']}` on {m['cpus']} CPUs (1-min load average {m['load_avg_1m_start']:.1f} at the "
        f"start, {m['load_avg_1m_end']:.1f} at the end). "
        f"`{MODEL}` paired against itself, {args.workers} workers, tasks {', '.join(args.tasks)}, "
        f"{args.episodes} episodes each, {args.max_steps} steps max, 96 px; reseed floor "
        f"{'on' if args.reseed_floor else 'off'} in the new paths.",
        "",
        f"Each row is the median of {args.repeats} interleaved round(s) (every round runs every row once); "
        "the speed-up per round divides that round's baseline wall time by the row's.",
        "",
        "| path | episodes | wall (s, start-up incl.) | wall per round (s) | paired episodes/s | speed-up "
        "| speed-up per round | speed-up in episodes (start-up excl.) | env steps simulated "
        "| episodes with cached reference | FP-vs-FP drift max (m) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        rounds = " / ".join(f"{w:g}" for w in r["wall_s_rounds"])
        per_round = " / ".join(f"{x:g}x" for x in result["speedup_vs_baseline_per_round"][name])
        md.append(
            f"| {name} | {r['episodes']} | {r['wall_s']} | {rounds} | {r['paired_episodes_per_s']} "
            f"| {result['speedup_vs_baseline'][name]}x | {per_round} "
            f"| {result['speedup_vs_baseline_in_episodes'][name]}x "
            f"| {r['simulated_steps']} | {r['reference_cached']} "
            f"| {r['drift_max_mean']:.3g} |"
        )
    parts = list(result["profile"][0]["share"])
    md += [
        "",
        f"Profile (one process, one thread, {args.profile_episodes} paired episodes of {args.tasks[0]}): "
        "seconds per paired episode and where they go.",
        "",
        "| path | s / paired episode | " + " | ".join(parts) + " |",
        "|---|---|" + "---|" * len(parts),
    ]
    for p in result["profile"]:
        cells = [f"{p['seconds_per_episode'][k]:.2f} s ({100 * p['share'][k]:.0f}%)" for k in parts]
        md.append(f"| {p['path']} | {p['seconds_per_paired_episode']} | " + " | ".join(cells) + " |")
    stages = result["stage_s_per_row_by_batch"]
    names = list(stages["1"])
    md += [
        "",
        "Per-row cost of each stage of a policy call (ms, one thread, same process):",
        "",
        "| batch | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
        *(f"| {b} | " + " | ".join(f"{1000 * st[k]:.2f}" for k in names) + " |" for b, st in stages.items()),
        "",
        "Ceiling of what batching and the cache can give inside episodes, estimated from the baseline's "
        "profile and these per-row costs (full batches, no start-up, no padding; `attainable_speedups`; one "
        "task's profile and timings taken minutes apart, so it moves between runs as the rows do): "
        + "; ".join(
            f"{m}: {b['cold cache']}x cold, {b['cached reference']}x cached"
            for m, b in result["attainable_speedup_in_episodes"].items()
        )
        + ".",
        "",
    ]
    return "\n".join(md)


if __name__ == "__main__":
    main()
