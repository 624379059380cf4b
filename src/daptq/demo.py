"""``daptq demo``: quantize the bundled VLA below 3 bits with RTN, GPTQ and DA-PTQ, evaluate each against FP.

The main job of the README, chosen to show what DA-PTQ is for. At an average of 2.5 bits per weight over
backbone, interface and action head of ``ref:metaworld-mt10``:

- RTN and GPTQ on a uniform grid (W2 asymmetric, groups of 32: 2.56 bits per weight with scales and zero
  points), the generic methods a user would reach for first;
- DA-PTQ preset ``budget`` at 2.5 bits (bits per layer chosen by a MILP from drift-weighted sensitivities over
  grouped 2-8 bit formats, GPTQ rounding), on the same layers and at fewer bytes;
- optionally, as context, DA-PTQ preset ``paper`` at W4A8 (``daptq demo --w4a8-context``; off by default so
  the full demo stays under 10 minutes on a 2-core machine).

It evaluates on reach, push and pick-place, the three MT10 tasks where the full-precision model is weakest
(80%, 84%, 72% on the FP table of docs/RESULTS.md): there quantization shows first, and the 150-episode
methods tables measured a 34-point RTN loss at this budget. Calibration data (the ``calib`` split, scripted
experts; the 64 stratified trajectories ``daptq quantize`` uses by default) is generated into the cache on
first use; each quantized policy directory is evaluated with ``daptq.eval.evaluate`` on the ``eval`` seed
split, paired with the FP policy (same initial states, same sampling noise), the FP rollouts shared through
the reference cache so they run once. One table goes to stdout, ``demo_summary.json`` / ``demo_table.md``
and ``report/`` (plots: drift over time, end-effector paths, actions FP vs each method) go under ``out``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEMO_MARKER = "demo_summary.json"
TABLE_NAME = "demo_table.md"
# McNemar's exact two-sided test needs this many discordant pairs, all one way, to reach p < 0.05.
MCNEMAR_MIN_DISCORDANT = 6


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; ``FULL`` and ``QUICK`` are what the CLI offers (sized by measured wall time)."""

    model: str = "ref:metaworld-mt10"
    tasks: tuple[str, ...] | None = ("reach", "push", "pick-place")  # None: all MT10 tasks
    episodes: int = 20  # paired episodes (seeds of ``seed_split``) per task
    seed_split: str = "eval"  # "val" to make choices (daptq.envs.tasks.SEED_SPLITS)
    max_steps: int | None = None  # None: the per-task step limit
    workers: int = 2
    envs_per_worker: int = 4
    calib_episodes_per_task: int = 8  # scripted-expert episodes of the calib split generated per task
    calib_trajectories: int = 64  # as `daptq quantize`'s default calibration
    calib_tasks: tuple[str, ...] | None = None  # None: all MT10 tasks
    budget_bits: float = 2.5
    # The uniform grid of the RTN and GPTQ rows: `daptq quantize` options (2.56 bits per weight).
    uniform_grid: dict[str, Any] = field(
        default_factory=lambda: {"w_bits": 2, "group_size": 32, "asymmetric": True}
    )
    context_w4a8: bool = False  # add DA-PTQ `paper` at W4A8 as a context row (about +25% wall time)
    sensitivity_batches: int = 8
    paper_overrides: dict[str, Any] = field(default_factory=dict)  # DAPTQConfig.paper(**...)
    budget_overrides: dict[str, Any] = field(default_factory=dict)  # DAPTQConfig.budget(**...)


FULL = DemoSettings()
_QUICK_TASKS = ("reach", "drawer-close", "button-press-topdown")
# A smoke run: fixed costs (calibration generation, DA-PTQ's passes, loading models) dominate it, so it
# calibrates on its own three tasks and evaluates in-process (one worker: no worker start-up).
QUICK = DemoSettings(
    tasks=_QUICK_TASKS,
    episodes=2,
    max_steps=100,
    workers=1,
    envs_per_worker=2,
    calib_episodes_per_task=1,
    calib_trajectories=3,
    calib_tasks=_QUICK_TASKS,
    sensitivity_batches=1,
)


@dataclass(frozen=True)
class DemoMethod:
    name: str  # directory name and table key
    label: str  # what the table and the plots call it
    config: Any  # a MethodConfig


def demo_methods(settings: DemoSettings) -> list[DemoMethod]:
    """RTN and GPTQ on the uniform grid, DA-PTQ ``budget`` at ``budget_bits`` over the grouped formats (GPTQ
    rounding), and DA-PTQ ``paper`` W4A8 when ``context_w4a8``. The first row is the drift baseline."""
    from daptq.methods.daptq import DAPTQConfig
    from daptq.methods.daptq.allocation import GROUPED_FORMATS
    from daptq.methods.workflow import config_from_options

    bits = f"{settings.budget_bits:g}"
    grid = settings.uniform_grid
    label = f"W{grid['w_bits']}" + (f" g{grid['group_size']}" if grid.get("group_size") else "")
    budget = DAPTQConfig.budget(
        average_bits=settings.budget_bits,
        sensitivity_batches=settings.sensitivity_batches,
        **{"rounding": "gptq", "formats": GROUPED_FORMATS, **settings.budget_overrides},
    )
    methods = [
        DemoMethod(f"rtn-{bits}bit", f"RTN {label}", config_from_options("rtn", **grid)),
        DemoMethod(f"gptq-{bits}bit", f"GPTQ {label}", config_from_options("gptq", **grid)),
        DemoMethod(f"daptq-budget-{bits}bit", f"DA-PTQ budget {bits} bits", budget),
    ]
    if settings.context_w4a8:
        paper_batches = settings.sensitivity_batches
        paper = DAPTQConfig.paper(sensitivity_batches=paper_batches, **settings.paper_overrides)
        methods.append(DemoMethod("daptq-paper-w4a8", "DA-PTQ paper W4A8 (context)", paper))
    return methods


# ------------------------------------------------------------------------------------------------ stages


def demo_calibration(
    policy: Any, settings: DemoSettings, cache_dir: str | Path | None, progress: bool = True
) -> Any:
    """The calibration set for ``policy``: the cached calib split (generated on first use, ``calib_tasks``
    with ``calib_episodes_per_task`` each), ``calib_trajectories`` trajectories stratified over spatial
    bins."""
    from daptq.data.calibration import ensure_calibration_dataset, sample_calibration

    root = ensure_calibration_dataset(
        int(getattr(policy, "image_size", 96)),
        str(getattr(policy, "camera", "corner3")),
        settings.calib_episodes_per_task,
        list(settings.calib_tasks) if settings.calib_tasks else None,
        cache_dir,
        workers=settings.workers,
        progress=progress,
    )
    chunk = getattr(policy, "chunk_size", None) or policy.config.chunk_size
    return sample_calibration(
        root,
        settings.calib_trajectories,
        chunk_size=int(chunk),
        tasks=list(settings.calib_tasks) if settings.calib_tasks else None,
        with_images=hasattr(policy, "image_size"),
        episodes_per_task=settings.calib_episodes_per_task,  # the same set after a cache was extended
    )


def core_weight_bytes(policy: Any) -> tuple[int, int]:
    """(ideal bytes, bf16 bytes) of the weights of backbone, interface and action head (encoders excluded,
    as no demo method touches them); float layers count 2 bytes per weight."""
    from daptq.methods.scope import DEFAULT_ROLES
    from daptq.quant import model_bytes

    core = {m.name for m in policy.adapter.quantizable_modules() if m.role in DEFAULT_ROLES}
    rows = [r for r in model_bytes(policy.model).rows if r.name in core]
    if not rows:
        raise ValueError("core_weight_bytes: the policy declares no backbone/interface/action-head module")
    return sum(r.ideal_bytes for r in rows), sum(r.fp16_bytes for r in rows)


def quantize_method(
    method: DemoMethod, model: str, calibration: Any, out: Path
) -> tuple[Path, float, tuple[int, int]]:
    """Quantize ``model`` with ``method`` into ``out``; returns (directory, quantize seconds, core bytes)."""
    from daptq.methods import quantize_policy
    from daptq.models.quantized import model_digest, save_quantized_policy
    from daptq.models.registry import load_policy

    policy = load_policy(model)
    digest = model_digest(policy.model)
    t0 = time.perf_counter()
    record = quantize_policy(policy, method.config, calibration, base_model={"spec": model, "digest": digest})
    seconds = time.perf_counter() - t0
    directory = save_quantized_policy(policy, record, out, model)
    return Path(directory), seconds, core_weight_bytes(policy)


def _run_stats(run_dir: Path) -> dict[str, Any]:
    """The overall paired statistics of one evaluation run plus the per-episode max of the reseed floor."""
    from daptq.eval.report import load_run

    run = load_run(run_dir)
    o = run.summary["overall"]
    floor_max = [r["floor_drift_max"] for r in run.records if "floor_drift_max" in r]
    return {
        "episodes": o["episodes"],
        "success_rate": o["success_rate"],
        "success_ci95": o["success_ci95"],
        "fp_success_rate": o["ref_success_rate"],
        "fp_success_ci95": o["ref_success_ci95"],
        "mcnemar_p": o["mcnemar"]["p_value"],
        "drift_mean_m": o["drift_mean"],
        "drift_max_mean_m": o["drift_max_mean"],
        "floor_drift_mean_m": o.get("floor_drift_mean"),
        "floor_drift_max_mean_m": float(np.mean(floor_max)) if floor_max else None,
        "drift_to_floor_ratio": o.get("drift_to_floor_ratio"),
    }


# ------------------------------------------------------------------------------------------- statistics


def drift_vs_first(run_dirs: Sequence[Path]) -> list[list[float] | None]:
    """Per run after the first: mean per-episode drift minus the first run's on the same episodes, with a
    paired bootstrap 95% interval ([diff, lo, hi] in metres); None for the first run."""
    from daptq.eval.metrics import paired_bootstrap_diff
    from daptq.eval.report import load_run

    drifts = [{(r["task"], r["seed"]): r["drift_mean"] for r in load_run(d).records} for d in run_dirs]
    out: list[list[float] | None] = [None]
    for other in drifts[1:]:
        common = sorted(set(drifts[0]) & set(other))
        diff = paired_bootstrap_diff([other[k] for k in common], [drifts[0][k] for k in common])
        out.append(list(diff))
    return out


def success_vs(run_dirs: Sequence[Path], against: int) -> list[dict[str, Any] | None]:
    """Per run: McNemar's exact test of its episode successes against run ``against``'s on the same
    (task, seed) episodes (``{"p_value", "b", "c", "episodes"}``, b: only this run succeeded, c: only the
    other); None for run ``against`` itself."""
    from daptq.eval.metrics import mcnemar_exact
    from daptq.eval.report import load_run

    outcomes = [{(r["task"], r["seed"]): bool(r["success"]) for r in load_run(d).records} for d in run_dirs]
    out: list[dict[str, Any] | None] = []
    for i, mine in enumerate(outcomes):
        if i == against:
            out.append(None)
            continue
        common = sorted(set(mine) & set(outcomes[against]))
        test = mcnemar_exact([mine[k] for k in common], [outcomes[against][k] for k in common])
        out.append({**test, "episodes": len(common)})
    return out


def strength_notes(n: int, fp_rate: float) -> dict[str, Any]:
    """How strong conclusions at ``n`` paired episodes are: the Wilson half-width at FP's rate, the smallest
    difference McNemar can call significant, and the episodes a 5- or 10-point drop would need."""
    from daptq.eval.metrics import wilson_interval

    lo, hi = wilson_interval(round(fp_rate * n), n)
    p = min(max(fp_rate, 0.05), 0.95)
    needed = {}
    for drop in (0.05, 0.10):
        q = max(p - drop, 0.0)
        # Two proportions, alpha 0.05 two-sided, power 0.8 (normal approximation): an upper bound for the
        # paired design, which needs fewer when outcomes are correlated.
        needed[f"{round(100 * drop)}_points"] = math.ceil(
            (1.96 + 0.8416) ** 2 * (p * (1 - p) + q * (1 - q)) / drop**2
        )
    return {
        "episodes": n,
        "wilson_halfwidth_at_fp": (hi - lo) / 2,
        "min_significant_difference": MCNEMAR_MIN_DISCORDANT / n,
        "episodes_for_drop_80pct_power": needed,
    }


def _strength_text(s: dict[str, Any]) -> str:
    need = s["episodes_for_drop_80pct_power"]
    if s["min_significant_difference"] > 1:
        mcnemar = (
            f"McNemar cannot reach p < 0.05 at all (it needs >= {MCNEMAR_MIN_DISCORDANT} discordant pairs)"
        )
    else:
        mcnemar = (
            f"McNemar reaches p < 0.05 only with >= {MCNEMAR_MIN_DISCORDANT} discordant pairs all one way, "
            f"i.e. a difference of at least {100 * s['min_significant_difference']:.0f} points"
        )
    return (
        f"{s['episodes']} paired episodes per method: a success interval is about +-"
        f"{100 * s['wilson_halfwidth_at_fp']:.0f} points wide at FP's rate; {mcnemar}; detecting a 5-point "
        f"(10-point) drop with 80% power would need about {need['5_points']} ({need['10_points']}) "
        "episodes per method (unpaired bound). Differences in drift carry their own paired interval (drift "
        "vs RTN)."
    )


# ------------------------------------------------------------------------------------------------ table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cm(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _p(test: dict[str, Any] | None) -> str:
    return "-" if test is None else f"{test['p_value']:.3g}"


def _diff_cm(d: Sequence[float] | None) -> str:
    return "-" if d is None else f"{100 * d[0]:+.2f} [{100 * d[1]:+.2f}, {100 * d[2]:+.2f}]"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The demo's one table (Markdown)."""
    head = (
        "| method | success % [95% CI] | FP success % | McNemar p vs FP | drift mean cm (FP floor) "
        "| drift max cm (FP floor) | drift vs RTN cm [95% CI] | McNemar p vs DA-PTQ budget "
        "| weight bytes vs bf16 | quantize s | eval s |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["success_ci95"]
        lines.append(
            f"| {r['label']} | {_pct(r['success_rate'])} [{_pct(lo)}, {_pct(hi)}]"
            f" | {_pct(r['fp_success_rate'])} | {r['mcnemar_p']:.3g}"
            f" | {_cm(r['drift_mean_m'])} ({_cm(r['floor_drift_mean_m'])})"
            f" | {_cm(r['drift_max_mean_m'])} ({_cm(r['floor_drift_max_mean_m'])})"
            f" | {_diff_cm(r.get('drift_vs_rtn_m'))}"
            f" | {_p(r.get('success_vs_budget'))}"
            f" | {r['bytes_vs_bf16']:.3f} | {r['quantize_s']:.1f} | {r['eval_s']:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _plot_comparisons(run_dirs: list[Path], labels: list[str], out: Path, n_paths: int = 3) -> list[str]:
    """Two plots over all methods on the same episodes: end-effector paths and actions, FP vs each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from daptq.eval import store
    from daptq.eval.report import load_run

    runs = [load_run(d) for d in run_dirs]
    common = sorted(set.intersection(*({(r["task"], r["seed"]) for r in run.records} for run in runs)))
    if not common:
        raise ValueError("the demo's runs share no finished episode; nothing to compare")
    # One episode per task first, so the paths show different tasks.
    chosen, seen = [], set()
    for key in common:
        if key[0] not in seen:
            chosen.append(key)
            seen.add(key[0])
    chosen = (chosen + [k for k in common if k not in chosen])[:n_paths]
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]

    fig, axes = plt.subplots(1, len(chosen), figsize=(3.6 * len(chosen), 3.4), squeeze=False)
    for j, (task, seed) in enumerate(chosen):
        ax = axes[0, j]
        for k, (run, label) in enumerate(zip(runs, labels, strict=True)):
            a = store.load_arrays(run.path, task, seed)
            if k == 0:
                ax.plot(a["ref_ee"][:, 0], a["ref_ee"][:, 1], color="k", lw=1.6, label="FP")
                ax.plot(a["ref_ee"][0, 0], a["ref_ee"][0, 1], "o", color="k", ms=4)
            ax.plot(a["ee"][:, 0], a["ee"][:, 1], color=colors[k % 5], lw=1.0, ls="--", label=label)
        ax.set_title(f"{task} seed {seed}", fontsize=9)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("End-effector paths (top view): FP vs each method, same episodes", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "ee_paths_compare.png", dpi=90)
    plt.close(fig)

    task, seed = chosen[0]
    names = runs[0].config["candidate"]["action_space"]["names"]
    fig, axes = plt.subplots(len(names), 1, figsize=(7.5, 1.7 * len(names)), sharex=True, squeeze=False)
    for k, (run, label) in enumerate(zip(runs, labels, strict=True)):
        a = store.load_arrays(run.path, task, seed)
        for d, name in enumerate(names):
            ax = axes[d, 0]
            if k == 0:
                ax.plot(a["ref_actions"][:, d], color="k", lw=1.4, label="FP")
            ax.plot(a["actions"][:, d], color=colors[k % 5], lw=0.9, ls="--", label=label)
            ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"Actions per dimension, {task} seed {seed}: FP vs each method", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "actions_compare.png", dpi=90)
    plt.close(fig)
    return ["ee_paths_compare.png", "actions_compare.png"]


# ------------------------------------------------------------------------------------------------- main


def _prepare_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier demo's output (whose own subdirectories are replaced)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise ValueError(f"{out}: not empty and not an earlier demo's output; choose another --out")
        for name in ("eval", "quantized", "report"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in (DEMO_MARKER, TABLE_NAME):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(
    out: str | Path = "runs/demo",
    settings: DemoSettings = FULL,
    *,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    reference_cache: str | Path | None = None,
    progress: bool = True,
    calibration: Callable[[Any], Any] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary written to ``out/demo_summary.json``.

    ``cache_dir`` holds the calibration split (default: ``daptq.data.calibration.default_cache_dir()``),
    ``reference_cache`` the FP rollouts (default: ``daptq.eval.cache.default_cache_dir()``); ``calibration``
    (policy -> CalibrationSet) replaces the cached calib split (tests).
    """
    import torch

    from daptq.atomic import atomic_write_json, atomic_write_text
    from daptq.envs.tasks import SEED_SPLITS
    from daptq.eval import evaluate, write_report
    from daptq.eval.cache import default_cache_dir
    from daptq.models.registry import load_policy

    if settings.seed_split not in SEED_SPLITS:
        raise ValueError(f"seed_split must be one of {sorted(SEED_SPLITS)}, got {settings.seed_split!r}")
    if workers is not None:
        settings = dataclasses.replace(settings, workers=workers)
    if settings.workers < 1 or settings.episodes < 1:
        raise ValueError(f"workers and episodes must be >= 1, got {settings.workers}, {settings.episodes}")
    torch.set_num_threads(1)
    out = Path(out)
    _prepare_out(out)
    started = time.perf_counter()
    methods = demo_methods(settings)

    echo(f"[demo] calibration data for {settings.model}")
    t0 = time.perf_counter()
    base = load_policy(settings.model)
    calib = (
        calibration(base)
        if calibration is not None
        else demo_calibration(base, settings, cache_dir, progress)
    )
    calibration_s = time.perf_counter() - t0
    _, bf16_total = core_weight_bytes(base)
    del base

    rows: list[dict[str, Any]] = []
    run_dirs: list[Path] = []
    ref_cache = Path(reference_cache) if reference_cache is not None else default_cache_dir()
    for method in methods:
        echo(f"[demo] quantize: {method.label}")
        directory, quantize_s, (ideal, bf16) = quantize_method(
            method, settings.model, calib, out / "quantized" / method.name
        )
        n_tasks = _n_tasks(settings)
        echo(f"[demo] evaluate: {method.label} vs FP ({settings.episodes} episodes x {n_tasks} tasks)")
        run_dir = out / "eval" / method.name
        t0 = time.perf_counter()
        evaluate(
            str(directory),
            settings.model,
            list(settings.tasks) if settings.tasks else None,
            settings.episodes,
            workers=settings.workers,
            out=run_dir,
            max_steps=settings.max_steps,
            progress=progress,
            reference_cache=ref_cache,
            envs_per_worker=settings.envs_per_worker,
            seed_start=SEED_SPLITS[settings.seed_split],
        )
        eval_s = time.perf_counter() - t0
        run_dirs.append(run_dir)
        rows.append(
            {
                "method": method.name,
                "label": method.label,
                "directory": str(directory),
                "config": method.config.to_dict(),
                **_run_stats(run_dir),
                "weight_bytes": ideal,
                "bf16_bytes": bf16,
                "bytes_vs_bf16": ideal / bf16,
                "quantize_s": quantize_s,
                "eval_s": eval_s,
            }
        )
        if bf16 != bf16_total:
            raise RuntimeError(
                f"{method.name}: core bf16 bytes {bf16} differ from the float model's {bf16_total}"
            )

    for row, diff in zip(rows, drift_vs_first(run_dirs), strict=True):
        row["drift_vs_rtn_m"] = diff
    budget_index = next(i for i, m in enumerate(methods) if m.name.startswith("daptq-budget"))
    for row, test in zip(rows, success_vs(run_dirs, budget_index), strict=True):
        row["success_vs_budget"] = test
    labels = [m.label for m in methods]
    report = write_report(run_dirs, out / "report", labels=labels)
    extra = _plot_comparisons(run_dirs, labels, out / "report")
    n = rows[0]["episodes"]
    strength = strength_notes(n, rows[0]["fp_success_rate"])
    table = format_table(rows)
    total_s = time.perf_counter() - started
    notes = [
        _setup_note(settings, n, calibration_s, total_s),
        "Drift: mean (and per-episode max) end-effector distance to the paired FP trajectory; FP floor: "
        "the FP policy against itself with only its sampling seed changed. Bytes: ideal weight bytes "
        "(codes, scales, zero points; float layers 2 B/weight) of backbone + interface + action head vs "
        "bf16. Drift vs RTN: the method's mean drift minus RTN's on the same episodes (paired bootstrap). "
        "McNemar p vs DA-PTQ budget: the row's episode successes against DA-PTQ budget's on the same "
        "episodes. "
        "The first row's eval time includes the FP reference and floor rollouts unless cached.",
        _strength_text(strength),
    ]
    md = "\n".join([table, "", *notes, "", f"Report: {report}"])
    atomic_write_text(out / TABLE_NAME, md + "\n")
    _frame_report(report, table, notes, extra)
    summary = {
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "rows": rows,
        "strength": strength,
        "calibration_s": calibration_s,
        "total_s": total_s,
        "report": str(report),
        "plots": extra,
    }
    atomic_write_json(out / DEMO_MARKER, summary)
    echo("")
    echo(md)
    return summary


def _frame_report(report: Path, table: str, notes: list[str], plots: list[str]) -> None:
    """Put the demo's table on top of the evaluation report and its FP-vs-all plots after the comparison."""
    from daptq.atomic import atomic_write_text

    body = report.read_text(encoding="utf-8").split("\n", 1)[1]
    title = "# daptq demo: RTN, GPTQ and DA-PTQ against FP, paired closed-loop episodes"
    head = [title, "", table, "", *notes, ""]
    head += ["## FP vs each method on the same episodes", ""]
    head += [f"![{Path(p).stem}]({p})" for p in plots] + ["", "# Evaluation report"]
    atomic_write_text(report, "\n".join(head) + "\n" + body)


def _setup_note(settings: DemoSettings, n: int, calibration_s: float, total_s: float) -> str:
    steps = "" if settings.max_steps is None else f", at most {settings.max_steps} steps"
    return (
        f"{settings.model}, {n} paired episodes per method ({settings.episodes} {settings.seed_split}-split "
        f"seeds x "
        f"{_n_tasks(settings)} tasks{steps}), {settings.workers} workers x {settings.envs_per_worker} envs; "
        f"calibration: {settings.calib_trajectories} trajectories of the calib split ({calibration_s:.0f} s, "
        f"generation included on first use); total wall time {total_s:.0f} s."
    )


def _n_tasks(settings: DemoSettings) -> int:
    if settings.tasks:
        return len(settings.tasks)
    from daptq.envs.tasks import MT10

    return len(MT10)


def main(argv: Sequence[str] | None = None) -> int:  # python -m daptq.demo
    import argparse

    p = argparse.ArgumentParser(prog="daptq demo")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--workers", type=int)
    args = p.parse_args(argv)
    run_demo(args.out, QUICK if args.quick else FULL, workers=args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
