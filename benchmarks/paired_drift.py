"""Paired drift of two evaluation runs of the same episodes: the ratio of their mean drift from FP,
with its paired bootstrap interval, and a Wilcoxon signed-rank test on the per-episode differences.

The runs must be paired against the same FP rollouts (same suite, tasks, seeds: ``daptq eval`` or
``benchmarks/methods_closed_loop.py`` with one reference cache); episodes are matched by (task, seed).

    python benchmarks/paired_drift.py runs/w4a8eq/eval-daptq-eqbytes-w4a8 runs/w4a8eq/eval-rtn-w4a8 \\
        --out results/w4a8_equal_bytes/paired_drift
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def episodes(run: Path) -> dict[tuple[str, int], dict]:
    path = run / "episodes.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no episodes.jsonl (an evaluation run directory is needed)")
    out = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        out[(e["task"], int(e["seed"]))] = e
    return out


def paired_ratio(candidate: np.ndarray, reference: np.ndarray, n_boot: int = 10_000, seed: int = 0):
    """mean(candidate) / mean(reference) and its percentile bootstrap interval over resampled episode pairs
    (scipy.stats.bootstrap, paired)."""
    from scipy.stats import bootstrap

    res = bootstrap(
        (candidate, reference),
        lambda x, y, axis=-1: x.mean(axis=axis) / y.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=n_boot,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return float(candidate.mean() / reference.mean()), float(ci.low), float(ci.high)


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import wilcoxon

    from daptq.atomic import atomic_write_json, atomic_write_text
    from daptq.eval.metrics import paired_bootstrap_diff

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidate", type=Path)
    p.add_argument("reference", type=Path)
    p.add_argument("--metric", default="drift_mean", help="a per-episode field of episodes.jsonl")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    a, b = episodes(args.candidate), episodes(args.reference)
    missing = [
        str(r)
        for r, eps in ((args.candidate, a), (args.reference, b))
        if any(args.metric not in e for e in eps.values())
    ]
    if missing:
        raise SystemExit(f"--metric {args.metric!r}: not a field of every episode in {', '.join(missing)}")
    keys = sorted(set(a) & set(b))
    if len(keys) != len(a) or len(keys) != len(b):
        raise SystemExit(f"the runs are not paired: {len(a)} and {len(b)} episodes, {len(keys)} in common")
    ca = np.array([a[k][args.metric] for k in keys], dtype=np.float64)
    cb = np.array([b[k][args.metric] for k in keys], dtype=np.float64)
    ratio, lo, hi = paired_ratio(ca, cb)
    diff, dlo, dhi = paired_bootstrap_diff(ca, cb, n_boot=10_000)
    test = wilcoxon(ca, cb)
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "candidate": str(args.candidate),
        "reference": str(args.reference),
        "metric": args.metric,
        "episodes": len(keys),
        "candidate_mean": float(ca.mean()),
        "reference_mean": float(cb.mean()),
        "ratio": ratio,
        "ratio_ci95": [lo, hi],
        "difference": diff,
        "difference_ci95": [dlo, dhi],
        "wilcoxon_p": float(test.pvalue),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    text = (
        f"# Paired {args.metric}: {args.candidate.name} vs {args.reference.name}\n\n`{result['command']}`\n\n"
        "| episodes | candidate mean | reference mean | ratio [95% CI] | difference [95% CI] | Wilcoxon p |\n"
        "|---:|---:|---:|---|---|---:|\n"
        f"| {len(keys)} | {ca.mean():.4g} | {cb.mean():.4g} | {ratio:.3f} [{lo:.3f}, {hi:.3f}] | "
        f"{diff:.4g} [{dlo:.4g}, {dhi:.4g}] | {test.pvalue:.2g} |\n"
    )
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
