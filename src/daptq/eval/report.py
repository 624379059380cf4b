"""``daptq report``: report.md with tables and PNG plots from one or several evaluation run directories.

Everything is recomputed from episodes.jsonl and the per-episode arrays, so a report of an interrupted run
shows the episodes finished so far.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daptq.eval import metrics, store
from daptq.eval.summary import summarize

REPORT_NAME = "report.md"


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    label: str
    skipped: list[str] = dataclasses.field(default_factory=list)  # "line N (task seed S): why" per episode

    @property
    def paired(self) -> bool:
        return self.config["run"]["reference"] is not None

    @property
    def total(self) -> int:
        return len(self.config["run"]["tasks"]) * self.config["run"]["episodes"]


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    recipe = (config.get("candidate") or {}).get("recipe")
    return recipe if isinstance(recipe, dict) else {}


def method_name(config: dict[str, Any]) -> str:
    """The candidate's method from its recipe (``recipe["method"]``), else its model spec."""
    return str(_recipe(config).get("method") or config["run"]["candidate"])


def bits_label(config: dict[str, Any]) -> str:
    """``W{w_bits}A{a_bits}`` from the recipe (toy policies: their weight noise), else "-"."""
    recipe = _recipe(config)
    if recipe.get("w_bits") is not None:
        return f"W{recipe['w_bits']}A{recipe.get('a_bits', 16)}"
    if recipe.get("weight_noise"):
        return f"noise {recipe['weight_noise']:g}"
    return "-"


def method_label(config: dict[str, Any]) -> str:
    bits = bits_label(config)
    return method_name(config) + ("" if bits == "-" else f" {bits}")


def _usable_records(path: Path, config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records a report can use, and why each other one is left out: a record that is malformed or
    invalid, whose arrays are missing, damaged or another episode's, or whose metrics disagree with its
    arrays (``store.episode_problem``) is named in a warning and in the report (``daptq eval --resume``
    re-runs those episodes)."""
    keep, skipped, seen = [], [], set()
    for i, r in enumerate(store.EpisodeLog(path / store.EPISODES_NAME).read()):
        problem = store.episode_problem(path, config, r)
        if problem is None and (r["task"], r["seed"]) in seen:
            problem = "repeats an episode of an earlier line"
        if problem:
            skipped.append(f"{store.describe(r, i + 1)}: {problem}")
        else:
            keep.append(r)
            seen.add((r["task"], r["seed"]))
    if skipped:
        warnings.warn(
            f"{path}: {len(skipped)} damaged episode record(s) left out of the report (resume the run to "
            f"re-run them): {'; '.join(skipped[:5])}",
            stacklevel=3,
        )
    return keep, skipped


def load_run(path: str | os.PathLike) -> RunData:
    path = Path(path)
    store.check_no_symlinks(path)
    config = store.read_config(path)
    records, skipped = _usable_records(path, config)
    if not records:
        why = f" intact ({len(skipped)} damaged: {'; '.join(skipped[:3])})" if skipped else " yet"
        raise ValueError(f"{path}: the run has no finished episode{why}; nothing to report")
    paired = config["run"]["reference"] is not None
    summary = summarize(records, paired=paired, tasks=config["run"]["tasks"])
    return RunData(path, config, records, summary, method_label(config), skipped)


# ------------------------------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _cm(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _vec(v: Sequence[float] | None, fmt: str = ".3f") -> str:
    return "-" if v is None else " / ".join(format(x, fmt) for x in v)


def _comparison_table(runs: list[RunData]) -> list[str]:
    lines = [
        "| run | method | bits | episodes | success % [95% CI] | FP success % | diff (95% bootstrap) "
        "| McNemar p | drift mean / final (cm) | diverged % | TTD median (steps) | action MAE (per dim) "
        "| HF share (per dim) | FP reseed floor drift (cm) | drift / floor |",
        "|" + "---|" * 15,
    ]
    for run in runs:
        o = run.summary["overall"]
        if run.paired:
            diff = f"{100 * o['success_diff']:+.1f} {_ci(o['success_diff_bootstrap_ci95'])}"
            paired_cols = [
                _pct(o["ref_success_rate"]),
                diff,
                _num(o["mcnemar"]["p_value"]),
                f"{_cm(o['drift_mean'])} / {_cm(o['drift_final_mean'])}",
                _pct(o["diverged_fraction"]),
                _num(o["time_to_divergence_median"], ".0f"),
                _vec(o["action_mae_mean"]),
            ]
        else:
            paired_cols = ["-"] * 7
        lines.append(
            "| "
            + " | ".join(
                [
                    run.path.name,
                    run.label,
                    bits_label(run.config),
                    f"{len(run.records)}/{run.total}",
                    f"{_pct(o['success_rate'])} {_ci(o['success_ci95'])}",
                    *paired_cols,
                    _vec(o["hf_share_mean"], ".2f"),
                    _cm(o.get("floor_drift_mean")) if run.paired else "-",
                    _ratio(o.get("drift_to_floor_ratio")) if run.paired else "-",
                ]
            )
            + " |"
        )
    return lines


def _method_by_bits_table(runs: list[RunData]) -> list[str]:
    """Methods as rows, bit settings as columns; a cell is success % / mean drift (cm) of that run."""
    methods = list(dict.fromkeys(method_name(r.config) for r in runs))
    settings = list(dict.fromkeys(bits_label(r.config) for r in runs))
    cells: dict[tuple[str, str], str] = {}
    for run in runs:
        o = run.summary["overall"]
        cell = f"{_pct(o['success_rate'])}%"
        if run.paired:
            cell += f" / {_cm(o['drift_mean'])} cm"
        key = (method_name(run.config), bits_label(run.config))
        cells[key] = cell if key not in cells else f"{cells[key]}; {cell}"
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cells.get((m, b), "") for b in settings) + " |")
    return lines


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _task_table(run: RunData) -> list[str]:
    # Suites that declare a manipulated object (LIBERO) get its drift too; Meta-World's table is unchanged.
    objects = run.paired and "object_drift_mean" in run.summary["overall"]
    lines = [
        "| task | episodes | success % [95% CI] | FP success % [95% CI] | McNemar p | drift mean (cm) "
        "| final (cm) | diverged % | FP reseed floor: drift (cm) / diverged % | drift / floor |"
        + (" object drift mean / final (cm) | FP floor object drift (cm) |" if objects else ""),
        "|" + "---|" * (12 if objects else 10),
    ]
    for task, s in run.summary["per_task"].items():
        if not s["episodes"]:
            lines.append(f"| {task} | 0 | - | - | - | - | - | - | - | - |" + (" - | - |" if objects else ""))
            continue
        if run.paired:
            extra = [
                f"{_pct(s['ref_success_rate'])} {_ci(s['ref_success_ci95'])}",
                _num(s["mcnemar"]["p_value"]),
                _cm(s["drift_mean"]),
                _cm(s["drift_final_mean"]),
                _pct(s["diverged_fraction"]),
                f"{_cm(s.get('floor_drift_mean'))} / {_pct(s.get('floor_diverged_fraction'))}",
                _ratio(s.get("drift_to_floor_ratio")),
            ]
        else:
            extra = ["-"] * 7
        row = [task, str(s["episodes"]), f"{_pct(s['success_rate'])} {_ci(s['success_ci95'])}", *extra]
        if objects:
            row += [
                f"{_cm(s.get('object_drift_mean'))} / {_cm(s.get('object_drift_final_mean'))}",
                _cm(s.get("floor_object_drift_mean")),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# -------------------------------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    store.atomic_write_bytes(path, buffer.getvalue())  # a failed savefig leaves nothing on disk


def _plot_success(runs: list[RunData], path: Path) -> None:
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(t for r in runs for t in r.config["run"]["tasks"])) + ["overall"]
    series: list[tuple[str, list[float], list[tuple[float, float]]]] = []
    fp = next((r for r in runs if r.paired), None)

    def stats_of(run: RunData, prefix: str) -> tuple[list[float], list[tuple[float, float]]]:
        rates, cis = [], []
        for t in tasks:
            s = run.summary["overall"] if t == "overall" else run.summary["per_task"].get(t, {"episodes": 0})
            if not s["episodes"]:
                rates.append(np.nan)
                cis.append((np.nan, np.nan))
                continue
            rates.append(s[f"{prefix}success_rate"])
            cis.append(tuple(s[f"{prefix}success_ci95"]))
        return rates, cis

    if fp is not None:
        series.append(("FP reference", *stats_of(fp, "ref_")))
    for run in runs:
        series.append((run.label, *stats_of(run, "")))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks) * max(1, len(series) / 2)), 3.8))
    x = np.arange(len(tasks))
    for i, (label, rates, cis) in enumerate(series):
        r = np.asarray(rates, float)
        lo = r - np.asarray([c[0] for c in cis], float)
        hi = np.asarray([c[1] for c in cis], float) - r
        ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            100 * r,
            width,
            yerr=100 * np.stack([lo, hi]),
            capsize=2,
            label=label,
        )
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Success per task (bars: Wilson 95% interval)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _deviation_curves(run: RunData) -> list[np.ndarray]:
    curves = []
    for r in run.records:
        a = store.load_arrays(run.path, r["task"], r["seed"])
        curves.append(metrics.deviation_curve(a["ee"], a["ref_ee"]))
    return curves


def _plot_drift(runs: list[RunData], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run in runs:
        curves = _deviation_curves(run)
        length = max(len(c) for c in curves)
        stack = np.stack([metrics.hold_last(c[:, None], length)[:, 0] for c in curves])  # ended episodes hold
        mean = stack.mean(axis=0)
        lo, hi = np.quantile(stack, [0.25, 0.75], axis=0)
        t = np.arange(length)
        (line,) = ax.plot(t, 100 * mean, label=f"{run.label} (mean)")
        ax.fill_between(t, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.2)
    threshold = runs[0].config["run"]["divergence_threshold"]
    ax.axhline(100 * threshold, color="grey", ls=":", lw=1, label="divergence threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("end-effector deviation from FP (cm)")
    ax.set_title("Drift over time (band: 25-75% of episodes)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_paths(run: RunData, path: Path, n: int) -> None:
    import matplotlib.pyplot as plt

    chosen = run.records[:n]
    fig, axes = plt.subplots(2, len(chosen), figsize=(3.2 * len(chosen), 6), squeeze=False)
    for j, r in enumerate(chosen):
        a = store.load_arrays(run.path, r["task"], r["seed"])
        for i, (d0, d1, name) in enumerate(((0, 1, "y"), (0, 2, "z"))):
            ax = axes[i, j]
            if "ref_ee" in a:
                ax.plot(a["ref_ee"][:, d0], a["ref_ee"][:, d1], label="FP", color="k", lw=1.2)
            ax.plot(a["ee"][:, d0], a["ee"][:, d1], label=run.label, color="tab:red", lw=1.0, ls="--")
            ax.plot(a["ee"][0, d0], a["ee"][0, d1], "o", color="tab:green", ms=4)
            ax.set_xlabel("x (m)")
            ax.set_ylabel(f"{name} (m)")
            if i == 0:
                ax.set_title(f"{r['task']} seed {r['seed']}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"End-effector paths, top and side view: {run.label}", fontsize=10)
    _save(fig, path)


def _plot_actions(run: RunData, path: Path) -> None:
    import matplotlib.pyplot as plt

    r = run.records[0]
    a = store.load_arrays(run.path, r["task"], r["seed"])
    names = run.config["candidate"]["action_space"]["names"]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.6 * len(names)), sharex=True, squeeze=False)
    for d, name in enumerate(names):
        ax = axes[d, 0]
        if "ref_actions" in a:
            ax.plot(a["ref_actions"][:, d], color="k", lw=1.2, label="FP rollout")
            ax.plot(a["shadow_actions"][:, d], color="tab:blue", lw=0.8, ls=":", label="FP at candidate obs.")
        ax.plot(a["actions"][:, d], color="tab:red", lw=1.0, ls="--", label=run.label)
        ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"Actions per dimension, {r['task']} seed {r['seed']}", fontsize=10)
    _save(fig, path)


# ------------------------------------------------------------------------------------------------- report


def _suite_line(run: RunData) -> list[str]:
    """The suite a run evaluated on, for runs on another suite than Meta-World (whose reports keep their
    lines; runs written before suites existed are Meta-World runs)."""
    suite = run.config["run"].get("suite")
    if suite is None or suite == "metaworld":
        return []
    return [f"- suite: {suite} (version {run.config['run'].get('suite_version')})"]


def _suite_of(run: RunData) -> str:
    return str(run.config["run"].get("suite", "metaworld"))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_report(
    run_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    paths: int = 3,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write report.md and its plots for one run (into the run directory by default) or several runs (``out``
    is required then). ``labels`` (one per run) replace the labels read from the runs' recipes. Returns the
    path of report.md."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    if out is None:
        if len(run_dirs) > 1:
            raise ValueError("write_report: pass out=DIR when reporting several runs")
        out = run_dirs[0]
    if paths <= 0:
        raise ValueError(
            f"paths (episodes whose end-effector paths are plotted) must be positive, got {paths}"
        )
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(p) for p in run_dirs]
    suites = sorted({_suite_of(r) for r in runs})
    if len(suites) > 1:
        raise ValueError(f"write_report: the runs are on different suites {suites}; report each suite apart")
    if labels is not None:
        if len(labels) != len(runs):
            raise ValueError(f"write_report: {len(labels)} labels for {len(runs)} runs")
        for run, label in zip(runs, labels, strict=True):
            run.label = str(label)
    seen: dict[str, int] = {}
    for run in runs:  # make labels unique (legend entries, file names)
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    md = ["# daptq evaluation report", ""]
    md += ["## Comparison", "", *_comparison_table(runs), ""]
    if len(runs) > 1:
        md += [
            "Success % / mean drift from FP (cm), method x bit setting:",
            "",
            *_method_by_bits_table(runs),
            "",
        ]
    md += [
        "Success intervals are Wilson 95%; diff is candidate minus FP success with a paired bootstrap 95% "
        "interval; McNemar is the exact test on discordant episode pairs. Drift is the end-effector "
        "distance to the paired FP trajectory; the FP reseed floor is the drift of the FP policy against "
        "itself with only its sampling seed changed (what noise alone does), and drift / floor their ratio; "
        "a run diverges at the first step above "
        f"{100 * runs[0].config['run']['divergence_threshold']:.1f} cm. HF share: spectral power of each "
        f"action dimension at >= {runs[0].config['run']['hf_cutoff']} cycles/step. "
        "Definitions: docs/evaluation.md.",
        "",
    ]
    _plot_success(runs, out / "success_by_task.png")
    md += ["## Success per task", "", "![success per task](success_by_task.png)", ""]
    paired = [r for r in runs if r.paired]
    if paired:
        _plot_drift(paired, out / "drift_over_time.png")
        md += ["## Drift over time", "", "![drift over time](drift_over_time.png)", ""]
    for run in runs:
        slug = _slug(run.label)
        md += [f"## Run `{run.path.name}`: {run.label}", ""]
        md += [
            f"- candidate: `{run.config['run']['candidate']}`; reference: `{run.config['run']['reference']}`",
            *_suite_line(run),
            f"- episodes: {len(run.records)} of {run.total}; seeds from {run.config['run']['seed_start']}",
            f"- git commit: {run.config['provenance'].get('git_commit')}; created "
            f"{run.config['provenance'].get('created')}",
            "",
            *_task_table(run),
            "",
        ]
        if run.skipped:
            md += [
                f"### Skipped episodes ({len(run.skipped)})",
                "",
                "Left out of every table and plot (`daptq eval --resume` re-runs them):",
                "",
                *[f"- {line}" for line in run.skipped],
                "",
            ]
        _plot_paths(run, out / f"ee_paths_{slug}.png", paths)
        _plot_actions(run, out / f"actions_{slug}.png")
        md += [f"![end-effector paths](ee_paths_{slug}.png)", "", f"![actions](actions_{slug}.png)", ""]
    report = out / REPORT_NAME
    store.atomic_write_bytes(report, "\n".join(md).encode("utf-8"))
    return report
