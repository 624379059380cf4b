"""W4A4 ablation on the reference VLA: RTN / GPTQ with and without rotation and per-denoising-step scales.

Each configuration quantizes a fresh copy of the bundled reference VLA on ``--trajectories`` calibration
trajectories (sampler seed 0) and is scored open loop on a **validation-split** dataset this script
generates once (scripted experts on the validation seeds, ``--val-episodes`` per task on reach, push,
pick-place, 4 frames each, under ``--root``): the relative error ``||a_q - a_fp|| / ||a_fp||`` of the
predicted action chunks (same sampling noise for both), and their RMSE in action units. Two activation grids:
- ``dynamic``: the RESULTS W4A4 grid (W4 asymmetric per-channel weights, A4 dynamic per-token activations),
  where per-step scales do not apply (nothing static);
- ``static``: W4 asymmetric per-channel weights, A4 static per-tensor asymmetric activations, where they do.

Rows marked ``online`` add, on top of the folded rotation, an online Hadamard rotation of every ``mlp.proj``
input (after GELU; backbone and DiT), done here with forward pre-hooks as a measurement of what an online
rotation would buy: daptq does not implement online rotations (docs/methods.md, "Rotations").

    python benchmarks/w4a4_ablation.py [--trajectories 8] [--val-episodes 6] [--root runs/w4a4_ablation] \
        [--methods rtn gptq] [--out results/w4a4_ablation]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from daptq.atomic import atomic_write_json, atomic_write_text
from daptq.data.calibration import calibration_for_policy
from daptq.methods import quantize_policy
from daptq.methods.base import forward_batch
from daptq.methods.gptq import GPTQConfig
from daptq.methods.rtn import RTNConfig
from daptq.models.reference import load_reference
from daptq.quant import ActivationSpec, QuantSpec, WeightSpec

GRIDS = {
    "dynamic": QuantSpec(WeightSpec(4, symmetric=False, granularity="per_channel"), ActivationSpec(4)),
    "static": QuantSpec(
        WeightSpec(4, symmetric=False, granularity="per_channel"),
        ActivationSpec(4, symmetric=False, mode="static_per_tensor"),
    ),
}
TASKS = ("reach", "push", "pick-place")
METHODS = {"rtn": lambda s: RTNConfig(spec=s), "gptq": lambda s: GPTQConfig(spec=s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ref:metaworld-mt10")
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--val-episodes", type=int, default=6, help="validation episodes per task")
    parser.add_argument("--root", default="runs/w4a4_ablation", help="where the validation data is generated")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--out", default="results/w4a4_ablation", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp = load_reference(args.model)
    calibration = calibration_for_policy(fp, n_trajectories=args.trajectories, seed=0)
    validation = validation_set(Path(args.root), fp, args.val_episodes)
    inputs = list(fp.adapter.calibration_batches(iter(validation.batches)))
    reference = [forward_batch(fp, b, seed=i) for i, b in enumerate(inputs)]
    ref_sq = sum(float(r.pow(2).sum()) for r in reference)
    n_values = sum(r.numel() for r in reference)
    rows = []
    for grid, spec in GRIDS.items():
        for method in args.methods:
            cases = [(r, st, False) for r in (None, "hadamard") for st in (False, True)]
            cases += [("hadamard", True, True)]
            for rotation, step_scales, online in cases:
                if grid == "dynamic" and step_scales != online:  # per-step scales need static activations
                    continue
                step_scales = step_scales and grid == "static"
                config = dataclasses.replace(
                    METHODS[method](spec), rotation=rotation, step_scales=step_scales
                )
                policy = load_reference(args.model)
                hooks = online_down_projection(policy) if online else None
                start = time.perf_counter()
                record = quantize_policy(policy, config, calibration)
                elapsed = time.perf_counter() - start
                if hooks is not None:
                    hooks.reattach(policy)  # quantization swapped the modules the hooks were on
                sq = sum(
                    float((forward_batch(policy, b, seed=i) - r).pow(2).sum())
                    for i, (b, r) in enumerate(zip(inputs, reference, strict=True))
                )
                row = {
                    "grid": grid,
                    "method": method,
                    "rotation": rotation is not None,
                    "online_down_projection": online,
                    "step_scales": step_scales,
                    "chunk_error": (sq / ref_sq) ** 0.5,
                    "action_rmse": (sq / n_values) ** 0.5,
                    "quantize_s": round(elapsed, 1),
                    "step_scale_layers": len(record.decisions.get("step_scales", {})),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    rotation = rotation_summary(args.model, calibration)
    result = {
        "command": "python benchmarks/w4a4_ablation.py "
        + f"--trajectories {args.trajectories} --val-episodes {args.val_episodes} "
        + f"--methods {' '.join(args.methods)}",
        "model": args.model,
        "grids": {k: v.to_dict() for k, v in GRIDS.items()},
        "calibration_samples": calibration.num_samples,
        "validation_samples": validation.num_samples,
        "validation": {"tasks": list(TASKS), "episodes_per_task": args.val_episodes, "split": "val"},
        "rotation": rotation,
        "rows": rows,
    }
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), to_markdown(result))
    print(to_markdown(result))


def validation_set(root: Path, policy, episodes: int):
    """Chunks from validation-seed expert episodes (generated once under ``root``; never calibration data)."""
    from daptq.data.calibration import sample_calibration
    from daptq.data.episodes import chunk_size_of
    from daptq.data.generate import generate_dataset

    data = generate_dataset(
        root / "val-data", list(TASKS), {"val": episodes}, image_size=int(policy.image_size), progress=False
    )
    chunk = int(chunk_size_of(policy))
    return sample_calibration(data, episodes * len(TASKS), chunk_size=chunk, split="val", tasks=list(TASKS))


class online_down_projection:  # noqa: N801 (used as a function)
    """Measurement only: turn every ``mlp.proj`` input by a randomized Hadamard H online (a forward pre-hook
    x -> x H) and its weight by W <- W H (exact in float), before quantization."""

    def __init__(self, policy) -> None:
        from daptq.methods.rotation import random_hadamard

        generator = torch.Generator().manual_seed(1)
        self.rotations = {}
        for name, module in policy.model.named_modules():
            if name.endswith("mlp.proj") and isinstance(module, torch.nn.Linear):
                h = random_hadamard(module.in_features, generator)[0].float()
                with torch.no_grad():
                    module.weight.copy_(module.weight @ h)
                self.rotations[name] = h
        self.reattach(policy)

    def reattach(self, policy) -> None:
        for name, h in self.rotations.items():
            module = policy.model.get_submodule(name)
            module.register_forward_pre_hook(lambda _m, args, _h=h: (args[0] @ _h,))


def rotation_summary(model: str, calibration) -> dict:
    """What rotation folds on this model (and what it leaves), and how far the rotated float model moves."""
    from daptq.methods.rotation import rotate_model

    fp, rotated = load_reference(model), load_reference(model)
    record = rotate_model(rotated.adapter)
    batches = list(fp.adapter.calibration_batches(iter(calibration.batches)))[:2]
    diff = max(
        float((forward_batch(rotated, b, seed=i) - forward_batch(fp, b, seed=i)).abs().max())
        for i, b in enumerate(batches)
    )
    return {**record, "float_max_abs_chunk_diff": diff}


def to_markdown(result: dict) -> str:
    lines = [
        f"# W4A4 ablation: rotation and per-denoising-step scales ({result['model']})",
        "",
        f"Command: `{result['command']}`. {result['calibration_samples']} calibration samples (sampler "
        f"seed 0), {result['validation_samples']} validation-split samples (reach, push, pick-place). Chunk "
        "error: ||a_q - a_fp|| / "
        "||a_fp|| with the same sampling noise; RMSE in action units ([-1, 1]).",
        "",
        "| grid | method | rotation | per-step scales | chunk error | action RMSE | quantize s |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        rotation = "no" if not r["rotation"] else "folded"
        rotation += " + online mlp.proj" if r["online_down_projection"] else ""
        lines.append(
            f"| {r['grid']} | {r['method']} | {rotation} | "
            f"{'yes' if r['step_scales'] else ('n/a' if r['grid'] == 'dynamic' else 'no')} | "
            f"{r['chunk_error']:.4f} | {r['action_rmse']:.4f} | {r['quantize_s']} |"
        )
    rot = result["rotation"]
    lines += [
        "",
        f"Rotation folded: streams {sorted(rot['streams'])}, V/O of {len(rot['value_output'])} attentions; "
        f"the rotated float model's chunks differ by at most {rot['float_max_abs_chunk_diff']:.1e}. "
        f"Not rotated: {'; '.join(rot['not_rotated'])}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
