"""The deployed (ONNX Runtime) policy against the fake-quant twin it came from, and the twin against FP.

Reads two paired ``daptq eval`` runs of the same tasks and seeds:

- ``--onnx-vs-twin``: candidate ``onnx:OUT``, reference the twin's ``daptq quantize`` directory;
- ``--twin-vs-fp``: candidate the same twin directory, reference the FP model.

and writes ``OUT.json`` and ``OUT.md``: per task and overall, success of ONNX, twin and FP with 95% Wilson
intervals, McNemar's exact test ONNX vs twin (and twin vs FP), mean end-effector drift ONNX-vs-twin and
twin-vs-FP with 95% bootstrap intervals (beside the reseed floors when the runs have them), and the
per-dimension action error of each pair. The twin is run twice (as reference in one run, as candidate in
the other): how often its two rollouts of a seed agree on success is reported, not assumed.

"Equal within intervals" holds when (1) each of ONNX's and the twin's success rates lies inside the other's
Wilson interval and McNemar's p >= 0.05, and (2) the upper end of the ONNX-vs-twin drift interval is below
the twin-vs-FP drift: deploying moves the policy less than quantizing it did.

    python benchmarks/deploy_closed_loop.py --onnx-vs-twin runs/eval-onnx-vs-twin \\
        --twin-vs-fp runs/eval-twin-vs-fp --out results/deploy_closed_loop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from daptq.atomic import atomic_write_text
from daptq.eval import metrics, store


def read_run(path: Path) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Any]]]:
    config = store.read_config(path)
    if config["run"]["reference"] is None:
        raise ValueError(f"{path}: not a paired run (no reference)")
    records = store.EpisodeLog(path / store.EPISODES_NAME).read()
    return config, {(r["task"], int(r["seed"])): r for r in records}


def mean_ci(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    mean, lo, hi = metrics.paired_bootstrap_diff(np.asarray(values), np.zeros(len(values)))
    return {"mean": mean, "ci95": [lo, hi]}


def rate(successes: list[bool]) -> dict[str, Any]:
    n, k = len(successes), int(sum(successes))
    return {"rate": k / n, "successes": k, "n": n, "ci95": list(metrics.wilson_interval(k, n))}


def compare(keys: list[tuple[str, int]], a: dict, b: dict) -> dict[str, Any]:
    """``a``: ONNX-vs-twin records, ``b``: twin-vs-FP records, for the same episodes ``keys``."""
    onnx = [bool(a[k]["success"]) for k in keys]
    twin_a = [bool(a[k]["ref_success"]) for k in keys]
    twin_b = [bool(b[k]["success"]) for k in keys]
    fp = [bool(b[k]["ref_success"]) for k in keys]
    out: dict[str, Any] = {
        "episodes": len(keys),
        "onnx": rate(onnx),
        "twin": rate(twin_a),
        "twin_in_twin_vs_fp": rate(twin_b),
        "twin_runs_agree_on_success": sum(x == y for x, y in zip(twin_a, twin_b, strict=True)) / len(keys),
        "fp": rate(fp),
        "mcnemar_onnx_vs_twin": metrics.mcnemar_exact(onnx, twin_a),
        "mcnemar_twin_vs_fp": metrics.mcnemar_exact(twin_b, fp),
        "drift_onnx_vs_twin_m": mean_ci([a[k]["drift_mean"] for k in keys]),
        "drift_max_onnx_vs_twin_m": mean_ci([a[k]["drift_max"] for k in keys]),
        "drift_twin_vs_fp_m": mean_ci([b[k]["drift_mean"] for k in keys]),
        "drift_max_twin_vs_fp_m": mean_ci([b[k]["drift_max"] for k in keys]),
        "floor_twin_reseeded_m": mean_ci(
            [a[k]["floor_drift_mean"] for k in keys if "floor_drift_mean" in a[k]]
        ),
        "floor_fp_reseeded_m": mean_ci(
            [b[k]["floor_drift_mean"] for k in keys if "floor_drift_mean" in b[k]]
        ),
        "action_mae_onnx_vs_twin": np.mean([a[k]["action_mae"] for k in keys], axis=0).tolist(),
        "action_mae_twin_vs_fp": np.mean([b[k]["action_mae"] for k in keys], axis=0).tolist(),
    }
    o, t = out["onnx"], out["twin"]
    success_equal = (
        t["ci95"][0] <= o["rate"] <= t["ci95"][1]
        and o["ci95"][0] <= t["rate"] <= o["ci95"][1]
        and out["mcnemar_onnx_vs_twin"]["p_value"] >= 0.05
    )
    drift_below = out["drift_onnx_vs_twin_m"]["ci95"][1] < out["drift_twin_vs_fp_m"]["mean"]
    out["success_equal_within_intervals"] = bool(success_equal)
    out["drift_onnx_vs_twin_below_twin_vs_fp"] = bool(drift_below)
    out["equal_within_intervals"] = bool(success_equal and drift_below)
    return out


def check_pairing(path_a: Path, cfg_a: dict, path_b: Path, cfg_b: dict) -> None:
    twin_a, twin_b = cfg_a["run"]["reference"], cfg_b["run"]["candidate"]
    if twin_a != twin_b or cfg_a["reference"]["digest"] != cfg_b["candidate"]["digest"]:
        raise ValueError(
            f"the twin differs: {path_a} has reference {twin_a!r}, {path_b} has candidate {twin_b!r} "
            "(or their digests differ)"
        )
    if not cfg_a["run"]["candidate"].startswith("onnx:"):
        raise ValueError(f"{path_a}: candidate {cfg_a['run']['candidate']!r} is not an onnx: policy")


def pct(r: dict[str, Any]) -> str:
    return f"{100 * r['rate']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"


def cm(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{100 * r['mean']:.2f} [{100 * r['ci95'][0]:.2f}, {100 * r['ci95'][1]:.2f}]"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"`{result['command']}`",
        "",
        f"ONNX-vs-twin run: `{result['onnx_vs_twin']['path']}` ({result['onnx_vs_twin']['candidate']} vs "
        f"{result['onnx_vs_twin']['reference']}); twin-vs-FP run: `{result['twin_vs_fp']['path']}` "
        f"(vs {result['twin_vs_fp']['reference']}). Success % [95% Wilson]; drift = mean end-effector "
        "distance, cm [95% bootstrap].",
        "",
        "| task | n | ONNX % | twin % | FP % | McNemar p ONNX/twin | drift ONNX-twin cm | drift twin-FP cm "
        "| twin floor cm | action MAE ONNX-twin | action MAE twin-FP | equal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, r in [*result["per_task"].items(), ("overall", result["overall"])]:
        mae_a = max(r["action_mae_onnx_vs_twin"])
        mae_b = max(r["action_mae_twin_vs_fp"])
        lines.append(
            f"| {task} | {r['episodes']} | {pct(r['onnx'])} | {pct(r['twin'])} | {pct(r['fp'])} | "
            f"{r['mcnemar_onnx_vs_twin']['p_value']:.3f} | {cm(r['drift_onnx_vs_twin_m'])} | "
            f"{cm(r['drift_twin_vs_fp_m'])} | {cm(r['floor_twin_reseeded_m'])} | {mae_a:.4f} | {mae_b:.4f} | "
            f"{'yes' if r['equal_within_intervals'] else 'no'} |"
        )
    o = result["overall"]
    lines += [
        "",
        "Action MAE: the largest per-dimension mean. The twin's two runs agree on success in "
        f"{100 * o['twin_runs_agree_on_success']:.1f}% of episodes (twin success in the twin-vs-FP run: "
        f"{pct(o['twin_in_twin_vs_fp'])}; McNemar twin vs FP p = {o['mcnemar_twin_vs_fp']['p_value']:.3f}).",
        f"Overall: success equal within intervals: {o['success_equal_within_intervals']}; ONNX-vs-twin drift "
        f"below twin-vs-FP drift: {o['drift_onnx_vs_twin_below_twin_vs_fp']}; "
        f"**equal within intervals: {o['equal_within_intervals']}**.",
    ]
    if result["episodes_only_in_one_run"]:
        lines.append(f"Episodes in only one run (left out): {result['episodes_only_in_one_run']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx-vs-twin", required=True, type=Path)
    p.add_argument("--twin-vs-fp", required=True, type=Path)
    p.add_argument("--out", default="results/deploy_closed_loop", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    cfg_a, a = read_run(args.onnx_vs_twin)
    cfg_b, b = read_run(args.twin_vs_fp)
    check_pairing(args.onnx_vs_twin, cfg_a, args.twin_vs_fp, cfg_b)
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two runs share no (task, seed) episode")
    tasks = sorted({t for t, _ in keys})
    result = {
        "command": f"python benchmarks/deploy_closed_loop.py --onnx-vs-twin {args.onnx_vs_twin} "
        f"--twin-vs-fp {args.twin_vs_fp} --out {args.out}",
        "onnx_vs_twin": {
            "path": str(args.onnx_vs_twin),
            **{k: cfg_a["run"][k] for k in ("candidate", "reference")},
        },
        "twin_vs_fp": {
            "path": str(args.twin_vs_fp),
            **{k: cfg_b["run"][k] for k in ("candidate", "reference")},
        },
        "episodes_only_in_one_run": len(set(a) ^ set(b)),
        "per_task": {t: compare([k for k in keys if k[0] == t], a, b) for t in tasks},
        "overall": compare(keys, a, b),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
