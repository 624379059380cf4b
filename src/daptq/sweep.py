"""``daptq sweep``: which part of *your* model breaks under quantization, measured in closed loop.

VLAQuantBench's scope lattice made a verb for the user's own model: quantize one component (vision,
language, backbone, interface, action head), one block or one block part at a time -- and any union the user
names with ``+`` -- with one method and spec, evaluate each against the float model paired on the
**validation** seeds, and print and plot the damage per group with intervals, beside DA-PTQ's estimate for the
same group when asked.

Groups come from the adapter's declarations (role, stack, block, ``meta["part"]``), never from name patterns,
so the same command means the same thing on every family. Every quantized model passes a scope audit before
it is evaluated: its quantized modules, counted per role, must equal the plan (a method that silently skips
layers is the failure users hit most). A union's row also shows what the sum of its parts predicts, so a user
sees where layer sensitivities do not add up (the assumption of an additive allocator).

    daptq sweep ref:metaworld-mt10 --method rtn --w-bits 2 --group-size 32 --asymmetric --by component \\
        --tasks reach push --episodes 10 --out runs/sweep
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daptq.atomic import atomic_write_text

GROUPINGS = ("component", "block", "part", "type")
SWEEP_FORMAT = 1


# ---- groups ----------------------------------------------------------------------------------------------
def _group_key(module: Any, by: str) -> str:
    where = module.stack or module.role
    if by == "component":
        return module.role
    if module.block is None:
        return f"{where}.other"
    if by == "type":  # one kind of layer across every block of a stack, e.g. "dit.attention"
        return f"{where}.{module.meta.get('part', 'other')}"
    if by == "block":
        return f"{where}.{module.block}"
    return f"{where}.{module.block}.{module.meta.get('part', 'other')}"


def module_groups(adapter: Any, by: str, roles: Sequence[str]) -> dict[str, list[str]]:
    """``{group: [module names]}`` in model order over the adapter's quantizable modules of ``roles``."""
    if by not in GROUPINGS:
        raise ValueError(f"--by must be one of {GROUPINGS}, got {by!r}")
    groups: dict[str, list[str]] = {}
    for module in adapter.quantizable_modules():
        if module.role in roles:
            groups.setdefault(_group_key(module, by), []).append(module.name)
    if not groups:
        raise ValueError(f"no quantizable module has a role in {list(roles)}")
    return groups


def select_groups(groups: Mapping[str, list[str]], requested: Sequence[str] | None) -> dict[str, list[str]]:
    """The requested groups (all when None); ``a+b`` is the union of groups a and b, in model order."""
    if not requested:
        return dict(groups)
    order = {name: i for i, name in enumerate(n for layers in groups.values() for n in layers)}
    chosen: dict[str, list[str]] = {}
    for label in requested:
        parts = [p.strip() for p in label.split("+")]
        unknown = [p for p in parts if p not in groups]
        if unknown or len(set(parts)) != len(parts):
            why = f"unknown group(s) {unknown}" if unknown else "a group repeated"
            raise ValueError(f"--groups {label!r}: {why}; known groups: {', '.join(groups)}")
        names = sorted({n for p in parts for n in groups[p]}, key=order.__getitem__)
        chosen["+".join(parts)] = names
    return chosen


def group_config(base: Any, names: Sequence[str]) -> Any:
    """``base`` restricted to exactly ``names`` (exact-name rules at its spec; no role selected)."""
    from daptq.methods.scope import Scope
    from daptq.quant.recipe import Rule

    fields = {f.name for f in dataclasses.fields(base)}
    if "spec" not in fields or hasattr(base, "with_average_bits") or "avg_bits" in fields:
        raise ValueError(
            f"method {base.method_name!r} chooses its own per-layer settings; sweep quantizes each group "
            "with one spec (use rtn, gptq, smoothquant, awq, quantvla with --w-bits/--a-bits)"
        )
    spec = base.spec
    rules = tuple(Rule(n, spec, "exact") for n in names)
    scope = Scope(roles=(), rules=rules, group_fallback=base.scope.group_fallback)
    return dataclasses.replace(base, scope=scope)


# ---- the scope audit -------------------------------------------------------------------------------------
def quantized_names(model: Any) -> set[str]:
    """Names of the modules of ``model`` that are quantized modules (fake-quant or a registered type)."""
    from daptq.quant.category import QUANTIZED_TYPES
    from daptq.quant.fake import QUANT_MODULE_TYPES

    kinds = (*QUANT_MODULE_TYPES, *QUANTIZED_TYPES.values())
    return {n for n, m in model.named_modules() if isinstance(m, kinds)}


def audit_scope(policy: Any, planned: Sequence[str]) -> dict[str, Any]:
    """Quantized modules per role of the loaded ``policy`` against the plan; a ValueError on any mismatch."""
    roles = {m.name: m.role for m in policy.adapter.quantizable_modules()}
    found = quantized_names(policy.adapter.model)
    outside = sorted(found - set(roles))
    want = Counter(roles[n] for n in planned)
    got = Counter(roles[n] for n in found if n in roles)
    missing = [n for n in planned if n not in found]
    extra = sorted(n for n in found if n in roles and n not in set(planned))
    if missing or extra or outside:
        lines = [f"plan per role {dict(want)}, quantized per role {dict(got)}"]
        lines += [f"planned but float: {missing}"] if missing else []
        lines += [f"quantized outside the plan: {extra + outside}"] if extra or outside else []
        raise ValueError("scope audit failed:\n  " + "\n  ".join(lines))
    return {"per_role": dict(sorted(want.items())), "modules": len(planned)}


# ---- estimates -------------------------------------------------------------------------------------------
def drift_estimates(policy: Any, calibration: Any, names: Sequence[str], spec: Any) -> dict[str, float]:
    """DA-PTQ's drift-weighted Fisher cost of rounding each layer's weight at ``spec`` (each at its fitted
    group size), with `budget`'s defaults: what the allocator believes, per layer."""
    import torch

    from daptq.methods import as_adapter
    from daptq.methods.daptq import DAPTQConfig
    from daptq.methods.daptq.drift import drift_scores
    from daptq.methods.daptq.method import calibration_actions
    from daptq.methods.daptq.sensitivity import GradientStats, bit_sensitivities, gradient_stats
    from daptq.methods.scope import Scope, resolve_scope
    from daptq.quant.recipe import Rule

    if spec.weight.is_float:
        raise ValueError("--estimates prices weight rounding; the sweep's spec keeps weights float")
    cfg = DAPTQConfig.budget()
    adapter = as_adapter(policy)
    calibration.check(adapter.action_space)
    batches = list(adapter.calibration_batches(iter(calibration.batches)))
    scope = Scope(roles=(), rules=tuple(Rule(n, spec, "exact") for n in names))
    plan = resolve_scope(adapter.model, adapter.quantizable_modules(), scope, spec)
    weights = torch.tensor(
        drift_scores(calibration_actions(batches), adapter.action_space, cfg.drift_config()),
        dtype=torch.float32,
    )
    stats = gradient_stats(
        adapter, batches[: cfg.sensitivity_batches], list(names), weights, cfg.sensitivity_seed
    )
    out = {}
    for n in names:
        one = GradientStats(
            {n: stats.phi[n]}, {n: stats.grad_mean[n]}, {n: stats.grad_sq_mean[n]}, stats.n_batches
        )
        out[n] = float(
            bit_sensitivities(adapter.model, one, {0: plan.modules[n].spec.weight}, "fisher")[n][0]
        )
    return out


# ---- statistics ------------------------------------------------------------------------------------------
def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean over episodes."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def group_row(label: str, names: Sequence[str], run_dir: Path, audit: Mapping[str, Any]) -> dict[str, Any]:
    from daptq.eval.report import load_run

    run = load_run(run_dir)
    overall = run.summary["overall"]
    drift = [r["drift_mean"] for r in run.records]
    return {
        "group": label,
        "modules": len(names),
        "audit": dict(audit),
        "episodes": overall["episodes"],
        "drift_mean_m": overall["drift_mean"],
        "drift_ci95_m": list(bootstrap_mean_ci(drift)),
        "floor_drift_mean_m": overall.get("floor_drift_mean"),
        "success_rate": overall["success_rate"],
        "ref_success_rate": overall["ref_success_rate"],
        "success_diff": overall["success_diff"],
        "success_diff_ci95": overall["success_diff_bootstrap_ci95"],
        "mcnemar_p": overall["mcnemar"]["p_value"],
    }


def add_additivity(rows: list[dict[str, Any]]) -> None:
    """For each union whose parts were swept alone: what the sum of the parts predicts (success change, and
    drift above the reseed floor), beside what the union measured."""
    by_label = {r["group"]: r for r in rows}
    for row in rows:
        parts = row["group"].split("+")
        if len(parts) < 2 or not all(p in by_label for p in parts):
            continue
        floor = row["floor_drift_mean_m"] or 0.0
        row["parts_success_diff_sum"] = sum(by_label[p]["success_diff"] for p in parts)
        row["parts_excess_drift_sum_m"] = sum(
            by_label[p]["drift_mean_m"] - (by_label[p]["floor_drift_mean_m"] or 0.0) for p in parts
        )
        row["excess_drift_m"] = row["drift_mean_m"] - floor


# ---- output ----------------------------------------------------------------------------------------------
def _cm(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def sweep_table(payload: Mapping[str, Any]) -> str:
    """A Markdown table: damage per group with intervals (and the estimate / the sum of parts when known)."""
    rows = payload["rows"]
    est = any("estimate" in r for r in rows)
    add = any("parts_success_diff_sum" in r for r in rows)
    head = [
        "group",
        "modules",
        "episodes",
        "drift cm [95% CI]",
        "floor cm",
        "success",
        "FP",
        "diff [95% CI]",
        "McNemar p",
    ]
    head += ["estimate"] if est else []
    head += ["sum of parts: diff / excess drift cm"] if add else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lo, hi = r["drift_ci95_m"]
        dlo, dhi = r["success_diff_ci95"]
        cells = [
            r["group"], str(r["modules"]), str(r["episodes"]),
            f"{_cm(r['drift_mean_m'])} [{_cm(lo)}, {_cm(hi)}]", _cm(r["floor_drift_mean_m"]),
            f"{100 * r['success_rate']:.1f}%", f"{100 * r['ref_success_rate']:.1f}%",
            f"{100 * r['success_diff']:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]", f"{r['mcnemar_p']:.3g}",
        ]  # fmt: skip
        cells += [f"{r['estimate']:.3g}" if "estimate" in r else "-"] if est else []
        if add:
            cells.append(
                f"{100 * r['parts_success_diff_sum']:+.1f} / {_cm(r['parts_excess_drift_sum_m'])} "
                f"(measured {100 * r['success_diff']:+.1f} / {_cm(r['excess_drift_m'])})"
                if "parts_success_diff_sum" in r
                else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(payload: Mapping[str, Any], path: Path) -> None:
    """Drift and success change per group with their intervals (and the estimate when known)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    est = all("estimate" in r for r in rows)
    y = np.arange(len(rows))
    fig, axes = plt.subplots(
        1, 3 if est else 2, figsize=(12 if est else 9, 1.2 + 0.35 * len(rows)), sharey=True
    )
    drift = np.array([100 * r["drift_mean_m"] for r in rows])
    ci = np.array([[100 * r["drift_ci95_m"][0], 100 * r["drift_ci95_m"][1]] for r in rows])
    axes[0].barh(y, drift, xerr=[drift - ci[:, 0], ci[:, 1] - drift], color="tab:red", alpha=0.7)
    floors = [r["floor_drift_mean_m"] for r in rows if r["floor_drift_mean_m"] is not None]
    if floors:
        axes[0].axvline(100 * float(np.mean(floors)), color="k", ls="--", lw=1, label="FP reseed floor")
        axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_xlabel("mean end-effector drift vs FP (cm)")
    diff = np.array([100 * r["success_diff"] for r in rows])
    dci = np.array([[100 * r["success_diff_ci95"][0], 100 * r["success_diff_ci95"][1]] for r in rows])
    axes[1].errorbar(diff, y, xerr=[diff - dci[:, 0], dci[:, 1] - diff], fmt="o", color="tab:blue")
    axes[1].axvline(0, color="k", lw=1)
    axes[1].set_xlabel("success change vs FP (points)")
    if est:
        axes[2].barh(y, [r["estimate"] for r in rows], color="tab:gray")
        axes[2].set_xscale("log")
        axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[2].set_xlabel("DA-PTQ estimate (drift-weighted Fisher)")
    axes[0].set_yticks(y, [r["group"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(payload["title"], fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ---- the sweep -------------------------------------------------------------------------------------------
def _say(text: str, progress: bool) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def run_sweep(
    model: str,
    config: Any,
    out: str | Path,
    *,
    by: str = "component",
    groups: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    episodes: int = 10,
    split: str = "val",
    workers: int = 1,
    envs_per_worker: int = 1,
    max_steps: int | None = None,
    reference_cache: str | Path | None = None,
    calibration: Any = None,
    estimates: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize each group alone with ``config``, audit it, evaluate it paired against ``model`` on the
    ``split`` seeds, and write ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``out``. Resumable: a
    group whose quantized directory and finished run exist is not redone. ``calibration`` is a CalibrationSet
    or a callable building one from the loaded float policy."""
    from daptq.envs.tasks import SEED_SPLITS
    from daptq.eval import evaluate
    from daptq.methods import get_method
    from daptq.methods.workflow import quantize_to_directory
    from daptq.models.quantized import load_quantized_policy
    from daptq.models.registry import load_policy

    if split not in SEED_SPLITS or split == "eval":
        allowed = [s for s in SEED_SPLITS if s != "eval"]
        raise ValueError(f"--split {split!r}: choose among {allowed} (the eval split is for reports)")
    out = Path(out)
    float_policy = load_policy(model)
    roles = config.scope.active_roles
    chosen = select_groups(module_groups(float_policy.adapter, by, roles), groups)
    configs = {label: group_config(config, names) for label, names in chosen.items()}  # refuse early
    cal = None
    if estimates or get_method(config).requires_calibration():
        cal = calibration(float_policy) if callable(calibration) else calibration
        if cal is None:
            from daptq.data.calibration import calibration_for_policy

            cal = calibration_for_policy(float_policy)
    per_layer: dict[str, float] = {}
    if estimates:
        names = [n for layers in chosen.values() for n in layers]
        per_layer = drift_estimates(float_policy, cal, list(dict.fromkeys(names)), config.spec)
    rows = []
    for label, names in chosen.items():
        qdir, run_dir = out / "q" / label, out / "eval" / label
        if not (qdir / "config.json").is_file():
            t0 = time.perf_counter()
            needs = get_method(config).requires_calibration()
            quantize_to_directory(model, configs[label], qdir, cal if needs else None)
            _say(f"{label}: quantized {len(names)} modules in {time.perf_counter() - t0:.1f} s", progress)
        audit = audit_scope(load_quantized_policy(qdir), names)
        t0 = time.perf_counter()
        evaluate(
            str(qdir),
            model,
            tasks=tasks,
            episodes=episodes,
            seed_start=SEED_SPLITS[split],
            workers=workers,
            envs_per_worker=envs_per_worker,
            out=run_dir,
            resume=(run_dir / "config.json").is_file(),
            max_steps=max_steps,
            reference_cache=reference_cache,
            progress=False,
        )
        _say(f"{label}: evaluated in {time.perf_counter() - t0:.0f} s", progress)
        row = group_row(label, names, run_dir, audit)
        if estimates:
            row["estimate"] = float(sum(per_layer[n] for n in names))
        rows.append(row)
    add_additivity(rows)
    payload = {
        "format": SWEEP_FORMAT,
        "title": f"{model}: {config.method_name} {config.spec.short()}, one group at a time ({split} seeds)",
        "model": model,
        "method": config.to_dict(),
        "by": by,
        "split": split,
        "episodes_per_task": episodes,
        "tasks": list(tasks) if tasks else None,
        "groups": chosen,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out / "sweep.md", f"# {payload['title']}\n\n{sweep_table(payload)}\n")
    plot_sweep(payload, out / "sweep.png")
    return payload
