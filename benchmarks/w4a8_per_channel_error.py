"""Open-loop accuracy cost of per-channel W4A8 (the u8s8 ``MatMulInteger`` path) against per-group W4A8.

RTN W4A8 on the layers ``daptq bench`` quantizes (``reference_w4a8_recipe``: g128, or the largest group
that divides K; ``per_channel_w4a8_recipe``: the same layers, one scale per output channel), both with int8
per-token activations, scored as ``baseline_chunk_error.py`` scores: relative action-chunk error
``||a_q - a_fp|| / ||a_fp||`` on held-out calibration-split trajectories (sampler seed 1), same sampling
noise; also per held-out sample, paired. RTN needs no calibration data. Writes JSON + Markdown (``--out``).

    nice -n 10 python benchmarks/w4a8_per_channel_error.py --trajectories 4 \
        --out results/w4a8_per_channel_error
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from daptq.atomic import atomic_write_json, atomic_write_text
from daptq.data.calibration import calibration_for_policy
from daptq.deploy.bench import per_channel_w4a8_recipe, reference_w4a8_recipe
from daptq.methods.base import forward_batch
from daptq.models.reference import load_reference
from daptq.quant import QuantSpec, Recipe, Rule, quantize_


def weight_only(recipe: Recipe) -> Recipe:
    return Recipe(tuple(Rule(r.target, QuantSpec(r.spec.weight), r.match) for r in recipe.rules if r.spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ref:metaworld-mt10")
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--out", default="results/w4a8_per_channel_error")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp = load_reference(args.model)
    held_out = calibration_for_policy(fp, n_trajectories=args.trajectories, seed=1)
    inputs = list(fp.adapter.calibration_batches(iter(held_out.batches)))
    with torch.no_grad():
        reference_outputs = [forward_batch(fp, b) for b in inputs]
    recipes = {
        "W4A8 g128 (ort-w4a8)": reference_w4a8_recipe,
        "W4A8 per-channel (ort-w4a8-pc)": per_channel_w4a8_recipe,
        "W4A16 g128 (weights only)": lambda m: weight_only(reference_w4a8_recipe(m)),
        "W4A16 per-channel (weights only)": lambda m: weight_only(per_channel_w4a8_recipe(m)),
    }
    rows = []
    for label, make in recipes.items():
        policy = load_reference(args.model)
        recipe = make(policy.model)
        quantize_(policy.model, recipe)
        with torch.no_grad():
            sq = [  # per held-out sample: squared error and squared norm of its FP chunk
                (n, d)
                for b, r in zip(inputs, reference_outputs, strict=True)
                for n, d in zip(
                    (forward_batch(policy, b) - r).pow(2).flatten(1).sum(1).tolist(),
                    r.pow(2).flatten(1).sum(1).tolist(),
                    strict=True,
                )
            ]
        err = (sum(n for n, _ in sq) / sum(d for _, d in sq)) ** 0.5  # baseline_chunk_error's chunk_error
        per_sample = [(n / d) ** 0.5 for n, d in sq]
        rows.append(
            {
                "recipe": label,
                "layers": len(recipe.rules),
                "held_out_chunk_error": err,
                "median_sample_error": statistics.median(per_sample),
                "per_sample_error": per_sample,
            }
        )
        print(f"{label}: {err:.4f} (median over samples {statistics.median(per_sample):.4f})", flush=True)
    g128, pc = rows[0]["per_sample_error"], rows[1]["per_sample_error"]
    worse = sum(p > g for p, g in zip(pc, g128, strict=True))
    report = {
        "model": args.model,
        "method": "rtn",
        "held_out_samples": held_out.num_samples,
        "trajectories": args.trajectories,
        "samples": len(g128),
        "per_channel_worse_samples": worse,
        "rows": rows,
    }
    lines = [
        f"# Per-channel vs per-group W4A8 RTN, {args.model}, {held_out.num_samples} held-out samples",
        "",
        "Command: `nice -n 10 .venv/bin/python benchmarks/w4a8_per_channel_error.py "
        f"--trajectories {args.trajectories} --out {args.out}`",
        "",
        "| recipe (RTN) | layers | held-out chunk error | median over samples |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['recipe']} | {r['layers']} | {r['held_out_chunk_error']:.4f} | "
            f"{r['median_sample_error']:.4f} |"
            for r in rows
        ),
        "",
        f"W4A8 per-channel has the larger error on {worse} of {len(g128)} held-out samples (paired, same "
        "noise).",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))


if __name__ == "__main__":
    main()
