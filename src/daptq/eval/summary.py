"""Aggregate episode records into per-task and overall statistics (what summary.json and report.md show)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from daptq.eval import metrics


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _mean_vec(values: Sequence[Sequence[float]]) -> list[float] | None:
    return np.mean(np.asarray(values, dtype=np.float64), axis=0).tolist() if len(values) else None


def _group(records: list[dict[str, Any]], paired: bool) -> dict[str, Any]:
    n = len(records)
    succ = [bool(r["success"]) for r in records]
    out: dict[str, Any] = {
        "episodes": n,
        "success_rate": sum(succ) / n,
        "success_ci95": list(metrics.wilson_interval(sum(succ), n)),
        "steps_mean": _mean([r["steps"] for r in records]),
        "jerk_mean": _mean([r["jerk"] for r in records]),
        "hf_share_mean": _mean_vec([r["hf_share"] for r in records]),
        "grip_toggles_mean": _mean([r["grip_toggles"] for r in records]),
    }
    if not paired:
        return out
    ref = [bool(r["ref_success"]) for r in records]
    diff, lo, hi = metrics.paired_bootstrap_diff(np.asarray(succ, float), np.asarray(ref, float))
    ttd = [r["time_to_divergence"] for r in records if r["time_to_divergence"] is not None]
    out.update(
        {
            "ref_success_rate": sum(ref) / n,
            "ref_success_ci95": list(metrics.wilson_interval(sum(ref), n)),
            "success_diff": diff,
            "success_diff_bootstrap_ci95": [lo, hi],
            "mcnemar": metrics.mcnemar_exact(succ, ref),
            "ref_steps_mean": _mean([r["ref_steps"] for r in records]),
            "ref_jerk_mean": _mean([r["ref_jerk"] for r in records]),
            "ref_hf_share_mean": _mean_vec([r["ref_hf_share"] for r in records]),
            "ref_grip_toggles_mean": _mean([r["ref_grip_toggles"] for r in records]),
            "drift_mean": _mean([r["drift_mean"] for r in records]),
            "drift_max_mean": _mean([r["drift_max"] for r in records]),
            "drift_final_mean": _mean([r["drift_final"] for r in records]),
            "drift_auc_mean": _mean([r["drift_auc"] for r in records]),
            "diverged_fraction": len(ttd) / n,
            "time_to_divergence_median": float(np.median(ttd)) if ttd else None,
            "action_mae_mean": _mean_vec([r["action_mae"] for r in records]),
            "action_rmse_mean": _mean_vec([r["action_rmse"] for r in records]),
            "grip_disagreement_rate": sum(r["grip_disagreements"] for r in records)
            / max(1, sum(r["steps"] for r in records)),
        }
    )
    out.update(_floor(records, out["drift_mean"]))
    out.update(_objects(records))
    return out


def _objects(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Drift of the manipulated object from its path under FP (suites that declare an object, e.g. LIBERO);
    nothing for suites without one, so their summaries keep their keys."""
    if not records or not all("object_drift_mean" in r for r in records):
        return {}
    out = {
        "object_drift_mean": _mean([r["object_drift_mean"] for r in records]),
        "object_drift_final_mean": _mean([r["object_drift_final"] for r in records]),
    }
    if all("floor_object_drift_mean" in r for r in records):
        out["floor_object_drift_mean"] = _mean([r["floor_object_drift_mean"] for r in records])
    return out


def _floor(records: list[dict[str, Any]], drift_mean: float | None) -> dict[str, Any]:
    """The reseed floor (the reference against itself re-sampled) and the candidate's drift as a ratio to
    it; all None when the run has no floor (``reseed_floor=False``)."""
    with_floor = [r for r in records if "floor_drift_mean" in r]
    if len(with_floor) != len(records) or not records:
        keys = ("floor_drift_mean", "floor_drift_final_mean", "floor_diverged_fraction", "floor_success_rate")
        return {k: None for k in (*keys, "drift_to_floor_ratio")}
    floor = _mean([r["floor_drift_mean"] for r in records])
    return {
        "floor_drift_mean": floor,
        "floor_drift_final_mean": _mean([r["floor_drift_final"] for r in records]),
        "floor_diverged_fraction": sum(r["floor_time_to_divergence"] is not None for r in records)
        / len(records),
        "floor_success_rate": sum(bool(r["floor_success"]) for r in records) / len(records),
        "drift_to_floor_ratio": None if not floor or drift_mean is None else drift_mean / floor,
    }


def summarize(
    records: list[dict[str, Any]], paired: bool, tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-task and overall statistics; tasks without a finished episode are listed with ``episodes: 0``.

    Records are sorted by (task, seed) first, so the result does not depend on the order in which workers
    finished (float sums are order-sensitive in the last bits).
    """
    records = sorted(records, key=lambda r: (r["task"], r["seed"]))
    tasks = list(tasks) if tasks is not None else sorted({r["task"] for r in records})
    per_task: dict[str, Any] = {}
    for task in tasks:
        group = [r for r in records if r["task"] == task]
        per_task[task] = _group(group, paired) if group else {"episodes": 0}
    return {
        "paired": paired,
        "episodes": len(records),
        "overall": _group(records, paired) if records else {"episodes": 0},
        "per_task": per_task,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a summary (per task and overall), for the command line."""
    paired = summary["paired"]
    objects = paired and "object_drift_mean" in summary["overall"]
    head = f"{'task':<22} {'n':>4} {'success % [95% CI]':>22}"
    if paired:
        head += f" {'FP %':>6} {'McNemar p':>9} {'drift cm':>8} {'final cm':>8} {'diverged':>8}"
        head += f" {'floor cm':>8} {'drift/floor':>11}"
    if objects:
        head += f" {'object cm':>9}"
    lines = [head, "-" * len(head)]
    rows = [*summary["per_task"].items(), ("overall", summary["overall"])]
    for task, s in rows:
        if not s["episodes"]:
            lines.append(f"{task:<22} {0:>4}")
            continue
        lo, hi = s["success_ci95"]
        line = f"{task:<22} {s['episodes']:>4} {100 * s['success_rate']:>6.1f}"
        line += f" [{100 * lo:5.1f}, {100 * hi:5.1f}]"
        if paired:
            line += (
                f" {100 * s['ref_success_rate']:>6.1f} {s['mcnemar']['p_value']:>9.3f}"
                f" {100 * s['drift_mean']:>8.2f} {100 * s['drift_final_mean']:>8.2f}"
                f" {100 * s['diverged_fraction']:>7.0f}%"
            )
            floor, ratio = s.get("floor_drift_mean"), s.get("drift_to_floor_ratio")
            line += f" {'-' if floor is None else f'{100 * floor:.2f}':>8}"
            line += f" {'-' if ratio is None else f'{ratio:.2f}':>11}"
        if objects:
            obj = s.get("object_drift_mean")
            line += f" {'-' if obj is None else f'{100 * obj:.2f}':>9}"
        lines.append(line)
    return "\n".join(lines)
