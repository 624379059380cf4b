"""Does a second allocation calibrated on the states a first quantized model reaches reduce drift?

Quantizes ``ref:metaworld-mt10`` with DA-PTQ at ``--setting`` (the presets of
``benchmarks/methods_closed_loop.py``) on the expert calibration set: the first model,
``ROOT/q/first-<setting>``. Rolls it out closed loop on the calibration seeds and quantizes again on those
states, labelled with the FP model's actions (``daptq.data.rollout_calibration``): the second allocation,
``ROOT/q/rollouts-<setting>-mix<F>``. Evaluates both paired against FP on the *validation* seeds (choices are
made there, never on the evaluation seeds) and compares them episode for episode: success (Wilson intervals,
McNemar second vs first), end-effector drift (paired bootstrap interval of second - first) beside the FP
reseed floor. Directories and runs that exist are reused (runs resumed). Writes
``results/requantize_on_rollouts_<setting>.{json,md}``.

The measurement (long: two quantizations, 8 rollout episodes per task, 2 x 150 paired episodes):

    python benchmarks/requantize_on_rollouts.py --setting avg2.5 --tasks reach push pick-place \\
        --episodes 50 --rollout-episodes 8 --rollout-mix 0.5 --workers 2 --root runs/requant

``--toy`` is a smoke run in seconds (the toy state-only policy, GPTQ W3, 2 short episodes on reach, the first
model calibrated on FP rollouts so no calibration cache is generated); it checks the pipeline, not the claim.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

from daptq.atomic import atomic_write_text

REFERENCE = "ref:metaworld-mt10"


def _presets():
    path = Path(__file__).resolve().parent / "methods_closed_loop.py"
    spec = importlib.util.spec_from_file_location("methods_closed_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(args):
    if args.toy:
        from daptq.methods.workflow import config_from_options

        return config_from_options("gptq", w_bits=3, group_size=8)
    return _presets().method_config("daptq", args.setting)


def _records(run: Path) -> dict[tuple[str, int], dict]:
    lines = (run / "episodes.jsonl").read_text().splitlines()
    return {(r["task"], int(r["seed"])): r for r in map(json.loads, lines)}


def compare(first_run: Path, second_run: Path) -> dict:
    """Paired comparison of the two runs on their common episodes (same tasks, seeds, FP reference)."""
    from daptq.eval.metrics import mcnemar_exact, paired_bootstrap_diff, wilson_interval

    a, b = _records(first_run), _records(second_run)
    keys = sorted(set(a) & set(b))
    if not keys:
        raise SystemExit(f"{first_run} and {second_run} share no episode")
    out = {"episodes": len(keys)}
    for name, recs in (("first", a), ("second", b)):
        wins = sum(bool(recs[k]["success"]) for k in keys)
        out[name] = {
            "success_rate": wins / len(keys),
            "success_ci": wilson_interval(wins, len(keys)),
            "drift_mean_cm": 100 * float(np.mean([recs[k]["drift_mean"] for k in keys])),
            "drift_max_cm": 100 * float(np.mean([recs[k]["drift_max"] for k in keys])),
        }
    out["fp_success_rate"] = float(np.mean([a[k]["ref_success"] for k in keys]))
    floor = [a[k]["floor_drift_mean"] for k in keys if a[k].get("floor_drift_mean") is not None]
    out["floor_drift_mean_cm"] = 100 * float(np.mean(floor)) if floor else None
    out["mcnemar_second_vs_first"] = mcnemar_exact(
        [b[k]["success"] for k in keys], [a[k]["success"] for k in keys]
    )
    diff, lo, hi = paired_bootstrap_diff(
        [b[k]["drift_mean"] for k in keys], [a[k]["drift_mean"] for k in keys]
    )
    out["drift_diff_cm"] = {"mean": 100 * diff, "ci95": [100 * lo, 100 * hi]}
    return out


def markdown(setting: str, result: dict, command: str) -> str:
    rows = []
    for name in ("first", "second"):
        r = result[name]
        lo, hi = r["success_ci"]
        rows.append(
            f"| {name} | {100 * r['success_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"| {r['drift_mean_cm']:.2f} | {r['drift_max_cm']:.2f} |"
        )
    d = result["drift_diff_cm"]
    floor = result["floor_drift_mean_cm"]
    return "\n".join(
        [
            f"# Second allocation on rollout states ({setting}), validation seeds",
            "",
            f"`{command}`",
            "",
            f"{result['episodes']} paired episodes; FP success {100 * result['fp_success_rate']:.1f}%; "
            f"FP reseed floor drift {'-' if floor is None else f'{floor:.2f}'} cm.",
            "",
            "| model | success [95% CI] | drift mean cm | drift max cm |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Drift second - first: {d['mean']:+.2f} cm [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] (paired "
            f"bootstrap); McNemar second vs first p = {result['mcnemar_second_vs_first']['p_value']:.3g}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="avg2.5", help="a setting of benchmarks/methods_closed_loop.py")
    p.add_argument("--tasks", nargs="+", default=["reach", "push", "pick-place"])
    p.add_argument("--episodes", type=int, default=50, help="validation episodes per task")
    p.add_argument("--rollout-episodes", type=int, default=8, help="calibration-seed rollouts per task")
    p.add_argument(
        "--rollout-mix", type=float, default=0.5, help="expert share of the second calibration set"
    )
    p.add_argument("--max-steps", type=int, help="step limit of every episode (default: the suite's)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--envs-per-worker", type=int, default=4)
    p.add_argument("--reference-cache")
    p.add_argument("--root", default="runs/requant")
    p.add_argument("--results", default="results")
    p.add_argument("--toy", action="store_true", help="smoke run in seconds (toy policy, 2 short episodes)")
    args = p.parse_args(argv)
    command = "python benchmarks/requantize_on_rollouts.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    import torch

    from daptq.data.calibration import calibration_for_policy
    from daptq.data.rollout_calibration import rollout_calibration_for
    from daptq.envs.tasks import SEED_SPLITS
    from daptq.eval import evaluate
    from daptq.methods.workflow import quantize_to_directory

    torch.set_num_threads(1)
    model = "toy" if args.toy else REFERENCE
    if args.toy:
        args.tasks, args.episodes, args.rollout_episodes = ["reach"], 2, 2
        args.max_steps, args.envs_per_worker, args.rollout_mix = args.max_steps or 20, 1, 0.0
    setting = "toy" if args.toy else args.setting
    config = _config(args)
    root = Path(args.root)
    first = root / "q" / f"first-{setting}"
    second = root / "q" / f"rollouts-{setting}-mix{args.rollout_mix:g}"

    def rollouts_of(spec: str, expert=None, mix: float = 0.0):
        def build(policy):
            return rollout_calibration_for(
                policy, spec, episodes_per_task=args.rollout_episodes, mix=mix, expert=expert,
                tasks=args.tasks, max_steps=args.max_steps, progress=False,
            )  # fmt: skip

        return build

    expert = calibration_for_policy
    if not first.is_dir():
        start = time.perf_counter()
        calibration = rollouts_of(model) if args.toy else expert  # toy: FP's states, no cache to generate
        quantize_to_directory(model, config, first, calibration)
        print(f"first model: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not second.is_dir():
        start = time.perf_counter()
        quantize_to_directory(model, config, second, rollouts_of(str(first), expert, args.rollout_mix))
        print(f"second allocation: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    runs = {}
    for name, qdir in (("first", first), ("second", second)):
        runs[name] = run = root / f"eval-{qdir.name}-val"
        evaluate(
            str(qdir), model, tasks=args.tasks, episodes=args.episodes, seed_start=SEED_SPLITS["val"],
            workers=args.workers, envs_per_worker=args.envs_per_worker, out=run,
            resume=(run / "config.json").is_file(), max_steps=args.max_steps,
            reference_cache=args.reference_cache or str(root / "reference-cache"), progress=False,
        )  # fmt: skip
    result = {
        "setting": setting,
        "model": model,
        "command": command,
        **compare(runs["first"], runs["second"]),
    }
    result["directories"] = {"first": str(first), "second": str(second)}
    out = Path(args.results)
    name = f"requantize_on_rollouts_{setting}"
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", markdown(setting, result, command))
    print(markdown(setting, result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
