"""Is DA-PTQ's sensitivity surrogate right? Closed loop: predicted cost vs measured drift per layer group.

For each layer group of ``ref:metaworld-mt10`` (see :data:`GROUP_PATTERNS`; every layer of the `budget` scope,
backbone + interface + action head, in exactly one group):

1. ``--phase quantize``: per-(layer, bits) estimates on the calibration split (never the eval seeds), summed
   over the group's layers at the check's bit width (each layer's own fitted spec, as `budget` sees it):
   - ``drift_fisher``: DA-PTQ's drift-weighted Fisher estimate, the estimator `budget` uses by default;
   - ``drift_taylor``: the same plus the first-order term (the config's fourth estimator, free here);
   - ``unweighted_fisher``: the same Fisher estimate from the unweighted denoising loss;
   - ``action_deviation``: QVLA-style, one layer quantized at a time, mean squared change of the sampled
     action chunks (noise shared with the float pass).
   The options (R batches, seed, drift prior) are `DAPTQConfig.budget()`'s defaults. Then the group alone is
   quantized with RTN at the check's spec (default W2 asymmetric, groups of 32) into ``ROOT/q/<group>``.
2. ``--phase evaluate``: paired closed loop against FP on the **validation** seeds (the estimator that drives
   `budget` is a choice, so it must not be made on the eval split), ``ROOT/eval/<group>``, resumed.
3. ``--phase report``: per group the estimates, mean drift and success; Spearman rho (scipy) of each estimate
   vs measured mean drift with a permutation p-value (exact for n <= 8 groups, else Monte Carlo) and a
   bootstrap 95% interval over groups; which estimator ranks best, with the bootstrap share of resamples in
   which it beats the runner-up. Writes ``results/surrogate_check.{json,md}``.

    python benchmarks/surrogate_check.py --episodes 10 --root runs/surrogate --reference-cache /work/cache/ref
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from daptq.atomic import atomic_write_text

REFERENCE = "ref:metaworld-mt10"
TASKS = ("reach", "push", "pick-place")
ESTIMATORS = ("drift_fisher", "drift_taylor", "unweighted_fisher", "action_deviation")

# (regex over module names, group name template with {0} = the regex's group 1). Backbone and DiT blocks are
# split into attention and MLP (and the DiT's adaLN modulation); the small layers around them are their own
# groups, so each of backbone / interface / action head has several.
GROUP_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(?:vision|language|state)_proj", "backbone.input_proj"),
    (r"blocks\.(\d+)\.attn\..+", "backbone.{0}.attn"),
    (r"blocks\.(\d+)\.mlp\..+", "backbone.{0}.mlp"),
    (r"head\.z_proj", "interface.z_proj"),
    (r"head\.t_embed\..+", "head.t_embed"),
    (r"head\.action_in", "head.action_in"),
    (r"head\.blocks\.(\d+)\.attn\..+", "head.{0}.attn"),
    (r"head\.blocks\.(\d+)\.mlp\..+", "head.{0}.mlp"),
    (r"head\.blocks\.(\d+)\.adaLN", "head.{0}.adaLN"),
    (r"head\.final_adaLN", "head.final_adaLN"),
    (r"head\.action_out", "head.action_out"),
)


# ---- grouping --------------------------------------------------------------------------------------------
def layer_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """``{group: [layer names]}`` in model order; every name must match exactly one pattern."""
    groups: dict[str, list[str]] = {}
    problems = []
    for name in names:
        hits = [(p, t) for p, t in GROUP_PATTERNS if re.fullmatch(p, name)]
        if len(hits) != 1:
            problems.append(f"{name}: matches {len(hits)} group patterns {[p for p, _ in hits]}")
            continue
        pattern, template = hits[0]
        groups.setdefault(template.format(*re.fullmatch(pattern, name).groups()), []).append(name)
    if problems:
        raise ValueError("layer grouping is not a partition:\n  " + "\n  ".join(problems))
    return groups


def scoped_layers(policy) -> list[str]:
    """The `budget` scope's layers (backbone, interface, action head) in model order."""
    from daptq.methods.scope import DEFAULT_ROLES

    return [q.name for q in policy.adapter.quantizable_modules() if q.role in DEFAULT_ROLES]


def group_config(names: Sequence[str], spec):
    """RTN with ``spec`` on exactly ``names`` (exact-name rules, no role selected): the rest stays float."""
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.scope import Scope
    from daptq.quant.recipe import Rule

    if not names:
        raise ValueError("group_config: empty group")
    return RTNConfig(spec=spec, scope=Scope(roles=(), rules=tuple(Rule(n, spec, "exact") for n in names)))


def check_spec(w_bits: int, group_size: int | None, symmetric: bool):
    from daptq.methods.workflow import config_from_options

    return config_from_options(
        "rtn", w_bits=w_bits, group_size=group_size, asymmetric=not symmetric
    ).spec  # the CLI's grid convention for that bit width


# ---- rank statistics -------------------------------------------------------------------------------------
def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (scipy), NaN when either side is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"spearman: need two equal-length samples of >= 3, got {len(x)} and {len(y)}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def permutation_p(x: Sequence[float], y: Sequence[float], n_perm: int = 100_000, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's rho: P(|rho_perm| >= |rho|) under shuffled pairings.

    Exact (all n! pairings) for n <= 8; otherwise Monte Carlo with ``n_perm`` shuffles, (1 + hits)/(1 + n)."""
    rx, ry = _rank_rows(np.asarray(x, float)), _rank_rows(np.asarray(y, float))
    observed = abs(float(_pearson_rows(rx, ry)))
    tol = 1e-12 * max(1.0, observed)
    n = len(rx)
    if n <= 8:
        perms = np.array(list(itertools.permutations(range(n))))
        stats = np.abs(_pearson_rows(rx[None, :], ry[perms]))
        return float((stats >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 10_000):
        m = min(10_000, n_perm - start)
        shuffled = rng.permuted(np.broadcast_to(ry, (m, n)), axis=1)
        hits += int((np.abs(_pearson_rows(rx[None, :], shuffled)) >= observed - tol).sum())
    return (1 + hits) / (1 + n_perm)


def bootstrap_rhos(
    estimates: dict[str, Sequence[float]], y: Sequence[float], n_boot: int = 10_000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Spearman rho of each estimate vs ``y`` over the same ``n_boot`` resamples of the groups (paired, so
    estimators can be compared resample by resample); NaN where a resample is constant."""
    y = np.asarray(y, float)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    ry = _rank_rows(y[idx])
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, x in estimates.items():
            out[name] = _pearson_rows(_rank_rows(np.asarray(x, float)[idx]), ry)
    return out


def rank_report(estimates: dict[str, Sequence[float]], drift: Sequence[float], seed: int = 0) -> dict:
    """rho, p-value and bootstrap interval per estimator; the best by rho and how often it beats the
    runner-up over bootstrap resamples."""
    boot = bootstrap_rhos(estimates, drift, seed=seed)
    rows = {}
    for name, x in estimates.items():
        b = boot[name][np.isfinite(boot[name])]
        rows[name] = {
            "rho": spearman(x, drift),
            "p_permutation": permutation_p(x, drift, seed=seed),
            "rho_bootstrap_ci95": [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))],
        }
    order = sorted(rows, key=lambda n: -np.nan_to_num(rows[n]["rho"], nan=-2.0))
    best = {"estimator": order[0]}
    if len(order) > 1:
        diff = boot[order[0]] - boot[order[1]]
        diff = diff[np.isfinite(diff)]
        best.update(
            runner_up=order[1],
            tied_with_runner_up=bool(np.isclose(rows[order[0]]["rho"], rows[order[1]]["rho"], atol=1e-12)),
            bootstrap_share_beats_runner_up=float((diff > 0).mean()),
            bootstrap_share_ties_runner_up=float((np.abs(diff) < 1e-12).mean()),
        )
    return {"estimators": rows, "best": best}


# ---- phase 1: estimates and quantized groups -------------------------------------------------------------
def compute_estimates(policy, calibration, names: Sequence[str], spec) -> dict[str, dict[str, float]]:
    """``{estimator: {layer: cost at spec}}`` with `budget`'s defaults, each layer at its own fitted spec."""
    import torch

    from daptq.methods import as_adapter
    from daptq.methods.daptq import DAPTQConfig
    from daptq.methods.daptq.drift import drift_scores
    from daptq.methods.daptq.method import calibration_actions
    from daptq.methods.daptq.sensitivity import action_deviation, bit_sensitivities, gradient_stats
    from daptq.methods.scope import Scope, resolve_scope

    cfg = DAPTQConfig.budget()
    adapter = as_adapter(policy)
    calibration.check(adapter.action_space)
    batches = list(adapter.calibration_batches(iter(calibration.batches)))
    plan = resolve_scope(adapter.model, adapter.quantizable_modules(), Scope(), spec)
    missing = [n for n in names if n not in plan.modules]
    if missing:
        raise ValueError(f"layers outside the budget scope: {missing}")
    fitted = {n: plan.modules[n].spec for n in names}
    weights = torch.tensor(
        drift_scores(calibration_actions(batches), adapter.action_space, cfg.drift_config()),
        dtype=torch.float32,
    )
    sens = batches[: cfg.sensitivity_batches]
    out: dict[str, dict[str, float]] = {}
    for label, dim_weights in (("drift", weights), ("unweighted", None)):
        stats = gradient_stats(adapter, sens, list(names), dim_weights, cfg.sensitivity_seed)
        for proxy in ("fisher", "taylor") if label == "drift" else ("fisher",):
            costs = {
                n: bit_sensitivities(adapter.model, _only(stats, n), {0: fitted[n].weight}, proxy)[n][0]
                for n in names
            }
            out[f"{label}_{proxy}"] = costs
    deviation: dict[str, float] = {}
    by_spec: dict[str, list[str]] = {}
    for n in names:
        by_spec.setdefault(json.dumps(fitted[n].to_dict(), sort_keys=True), []).append(n)
    for layers in by_spec.values():
        deviation.update(
            action_deviation(adapter, sens, layers, fitted[layers[0]], seed=cfg.sensitivity_seed)
        )
    out["action_deviation"] = deviation
    return out


def _only(stats, name: str):
    from daptq.methods.daptq.sensitivity import GradientStats

    return GradientStats(
        {name: stats.phi[name]},
        {name: stats.grad_mean[name]},
        {name: stats.grad_sq_mean[name]},
        stats.n_batches,
    )


def phase_quantize(root: Path, groups: dict[str, list[str]], spec, all_groups: dict[str, list[str]]) -> None:
    from daptq.data.calibration import calibration_for_policy
    from daptq.methods.workflow import quantize_to_directory
    from daptq.models.registry import load_policy

    est_path = root / "estimates.json"
    spec_dict = spec.to_dict()
    if est_path.is_file():
        saved = json.loads(est_path.read_text())
        if saved["spec"] != spec_dict:
            raise SystemExit(
                f"{est_path} was computed for spec {saved['spec']}, not {spec_dict}: use another --root"
            )
    else:
        start = time.perf_counter()
        policy = load_policy(REFERENCE)
        names = [n for layers in all_groups.values() for n in layers]
        per_layer = compute_estimates(policy, calibration_for_policy(policy), names, spec)
        payload = {
            "spec": spec_dict,
            "seconds": time.perf_counter() - start,
            "per_layer": per_layer,
            "groups": all_groups,
        }
        atomic_write_text(est_path, json.dumps(payload, indent=2) + "\n")
        print(f"estimates: {payload['seconds']:.0f} s", file=sys.stderr)
    for group, layers in groups.items():
        qdir = root / "q" / group
        if qdir.is_dir():
            continue
        start = time.perf_counter()
        quantize_to_directory(REFERENCE, group_config(layers, spec), qdir)
        print(f"{group}: quantized in {time.perf_counter() - start:.1f} s", file=sys.stderr)


# ---- phase 2: closed loop on the validation seeds --------------------------------------------------------
def phase_evaluate(root: Path, groups: Iterable[str], args) -> None:
    from daptq.envs.tasks import SEED_SPLITS
    from daptq.eval import evaluate

    for group in groups:
        qdir, run = root / "q" / group, root / "eval" / group
        if not qdir.is_dir():
            raise SystemExit(f"{qdir} is missing: run --phase quantize first")
        start = time.perf_counter()
        evaluate(
            str(qdir),
            REFERENCE,
            tasks=list(args.tasks),
            episodes=args.episodes,
            seed_start=SEED_SPLITS["val"],
            workers=args.workers,
            envs_per_worker=args.envs_per_worker,
            out=run,
            resume=(run / "config.json").is_file(),
            max_steps=args.max_steps,
            reference_cache=args.reference_cache,
            progress=False,
        )
        print(f"{group}: evaluated in {time.perf_counter() - start:.0f} s", file=sys.stderr)


# ---- phase 3: report -------------------------------------------------------------------------------------
def group_rows(root: Path, groups: Iterable[str]) -> list[dict]:
    est = json.loads((root / "estimates.json").read_text())
    rows = []
    for group in groups:
        layers = est["groups"][group]
        summary_path = root / "eval" / group / "summary.json"
        if not summary_path.is_file():
            raise SystemExit(f"{summary_path} is missing: run --phase evaluate first")
        overall = json.loads(summary_path.read_text())["overall"]
        rows.append(
            {
                "group": group,
                "layers": layers,
                **{e: float(sum(est["per_layer"][e][n] for n in layers)) for e in ESTIMATORS},
                "episodes": overall["episodes"],
                "drift_mean_m": overall["drift_mean"],
                "floor_drift_mean_m": overall.get("floor_drift_mean"),
                "success_rate": overall["success_rate"],
                "ref_success_rate": overall["ref_success_rate"],
                "mcnemar_p": overall["mcnemar"]["p_value"],
            }
        )
    return rows


def markdown(payload: dict) -> str:
    spec = payload["spec"]["weight"]
    lines = [
        "# Surrogate check: predicted sensitivity vs closed-loop drift, one layer group quantized at a time",
        "",
        f"Each group alone: RTN W{spec['bits']} {'symmetric' if spec['symmetric'] else 'asymmetric'} "
        f"{spec['granularity']}{' ' + str(spec['group_size']) if spec.get('group_size') else ''}; "
        f"paired vs FP on validation seeds (tasks {', '.join(payload['tasks'])}), "
        f"{payload['rows'][0]['episodes']} episodes per group. Estimates: `DAPTQConfig.budget()` defaults on "
        "the calibration split, summed over the group's layers.",
        "",
        "| group | layers | drift_fisher | drift_taylor | unweighted_fisher | action_deviation "
        "| drift mean (cm) | FP reseed floor (cm) | success | FP | McNemar p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        floor = r["floor_drift_mean_m"]
        lines.append(
            f"| {r['group']} | {len(r['layers'])} "
            + " ".join(f"| {r[e]:.3g}" for e in ESTIMATORS)
            + f" | {100 * r['drift_mean_m']:.2f} | {'-' if floor is None else f'{100 * floor:.2f}'} "
            f"| {100 * r['success_rate']:.1f}% | {100 * r['ref_success_rate']:.1f}% | {r['mcnemar_p']:.3g} |"
        )
    ranks = payload["ranking"]
    lines += [
        "",
        f"Spearman rho vs measured mean drift over {len(payload['rows'])} groups:",
        "",
        "| estimator | rho | permutation p | bootstrap 95% CI |",
        "|---|---:|---:|---|",
    ]
    for e, s in ranks["estimators"].items():
        lo, hi = s["rho_bootstrap_ci95"]
        lines.append(f"| {e} | {s['rho']:.3f} | {s['p_permutation']:.3g} | [{lo:.2f}, {hi:.2f}] |")
    best = ranks["best"]
    tail = ""
    if "runner_up" in best:
        tail = (
            f" (beats {best['runner_up']} in {100 * best['bootstrap_share_beats_runner_up']:.0f}% of "
            f"bootstrap resamples of the groups, ties in {100 * best['bootstrap_share_ties_runner_up']:.0f}%)"
        )
        if best["tied_with_runner_up"]:
            tail = f": tied with {best['runner_up']} on rho" + tail
    lines += [
        "",
        f"Best-ranking estimator: **{best['estimator']}**{tail}.",
        "",
        f"Command: `{payload['command']}`",
    ]
    return "\n".join(lines) + "\n"


def phase_report(root: Path, groups: Sequence[str], args, command: str) -> dict:
    rows = group_rows(root, groups)
    est = json.loads((root / "estimates.json").read_text())
    drift = [r["drift_mean_m"] for r in rows]
    ranking = rank_report({e: [r[e] for r in rows] for e in ESTIMATORS}, drift)
    payload = {
        "spec": est["spec"],
        "tasks": list(args.tasks),
        "seed_split": "val",
        "estimate_seconds": est["seconds"],
        "rows": rows,
        "ranking": ranking,
        "command": command,
    }
    out = Path(args.results)
    atomic_write_text(out / "surrogate_check.json", json.dumps(payload, indent=2) + "\n")
    text = markdown(payload)
    atomic_write_text(out / "surrogate_check.md", text)
    print(text)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("all", "quantize", "evaluate", "report"), default="all")
    p.add_argument("--groups", nargs="+", help="a subset of the groups (default: all)")
    p.add_argument("--w-bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=32, help="0: per-channel")
    p.add_argument("--symmetric", action="store_true", help="symmetric weights (default asymmetric)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--episodes", type=int, default=10, help="per task")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--envs-per-worker", type=int, default=4)
    p.add_argument("--reference-cache")
    p.add_argument("--root", default="runs/surrogate")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)

    import torch

    from daptq.models.registry import load_policy

    torch.set_num_threads(1)
    root = Path(args.root)
    all_groups = layer_groups(scoped_layers(load_policy(REFERENCE)))
    unknown = sorted(set(args.groups or ()) - set(all_groups))
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; known: {list(all_groups)}")
    groups = {g: all_groups[g] for g in (args.groups or all_groups)}
    if len(groups) < 3 and args.phase in ("all", "report"):
        raise SystemExit("the report needs at least 3 groups")
    spec = check_spec(args.w_bits, args.group_size or None, args.symmetric)
    if args.phase in ("all", "quantize"):
        phase_quantize(root, groups, spec, all_groups)
    if args.phase in ("all", "evaluate"):
        phase_evaluate(root, groups, args)
    if args.phase in ("all", "report"):
        command = "python benchmarks/surrogate_check.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        phase_report(root, list(groups), args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
