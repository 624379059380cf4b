"""Does DA-PTQ's activation-rounding estimate rank layers the way measured damage does? (open loop)

For every layer of the `budget` scope of ``ref:metaworld-mt10`` (backbone, interface, action head) and each
activation width (default 4 and 8 bits, per-token dynamic, as `budget`'s ``activation_choices`` price them):

1. Estimates on the calibration split (never the evaluation seeds), with `DAPTQConfig.budget()`'s defaults
   (R batches, seed, drift prior), the layer's input alone rounded:
   - ``drift_fisher``: the allocator's cost (``daptq.methods.daptq.sensitivity.activation_costs``), the
     drift-weighted diagonal Fisher of the output perturbation ``0.5 sum (g * dy)^2``;
   - ``unweighted_fisher``: the same from the unweighted denoising loss;
   - ``output_mse``: ``sum dy^2``, the output perturbation with no gradient weighting (a naive baseline).
2. Measured damage on held-out observations: a small dataset of the **validation** split (scripted experts on
   the validation seeds, generated under ``ROOT``): that layer's input alone rounded (weights float), the
   drift-weighted mean squared change of the sampled action chunks against the float policy, the sampling
   noise shared (``action_deviation``'s measure, on data the estimate never saw).
3. Spearman rho of each estimate vs the measured damage over layers, per width and pooled over widths, with
   a permutation p-value and a bootstrap 95% interval (``benchmarks/surrogate_check.py``'s statistics).
   Writes ``results/activation_surrogate.{json,md}``.

    nice -n 10 python benchmarks/activation_surrogate.py --root runs/act_surrogate
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from daptq.atomic import atomic_write_text

REFERENCE = "ref:metaworld-mt10"
TASKS = ("reach", "push", "pick-place")
ESTIMATORS = ("drift_fisher", "unweighted_fisher", "output_mse")


def _surrogate_check():
    path = Path(__file__).resolve().parent / "surrogate_check.py"
    spec = importlib.util.spec_from_file_location("surrogate_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def output_mse(adapter, batches, names, act_specs) -> dict[str, dict[int, float]]:
    """``mean over batches of sum dy^2`` per (layer, width): the output change with no gradient weighting."""
    import torch

    from daptq.methods.base import forward_batch
    from daptq.quant.fake import fake_quantize_activation

    model = adapter.model
    totals = {n: dict.fromkeys(act_specs, 0.0) for n in names}
    handles = []
    for n in names:

        def hook(module, args, out, n=n):
            x = args[0].detach()
            for b, a in act_specs.items():
                dim = 1 if isinstance(module, torch.nn.Conv2d) else -1
                dy = module.forward(fake_quantize_activation(x, a, None, None, dim), *args[1:]) - out
                totals[n][b] += float(dy.double().pow(2).sum())

        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                forward_batch(adapter, batch, seed=i)
    finally:
        for h in handles:
            h.remove()
    return {n: {b: v / len(batches) for b, v in row.items()} for n, row in totals.items()}


def estimates(policy, calibration, names, act_specs) -> dict[str, dict[str, dict[int, float]]]:
    import torch

    from daptq.methods import as_adapter
    from daptq.methods.daptq import DAPTQConfig
    from daptq.methods.daptq.drift import drift_scores
    from daptq.methods.daptq.method import calibration_actions
    from daptq.methods.daptq.sensitivity import activation_costs

    cfg = DAPTQConfig.budget()
    adapter = as_adapter(policy)
    batches = list(adapter.calibration_batches(iter(calibration.batches)))
    weights = torch.tensor(
        drift_scores(calibration_actions(batches), adapter.action_space, cfg.drift_config()),
        dtype=torch.float32,
    )
    sens = batches[: cfg.sensitivity_batches]
    out = {}
    for label, dim_weights in (("drift_fisher", weights), ("unweighted_fisher", None)):
        out[label] = activation_costs(adapter, sens, names, act_specs, dim_weights, cfg.sensitivity_seed)
    out["output_mse"] = output_mse(adapter, sens, names, act_specs)
    return out, weights


def measured_damage(policy, batches, names, act_specs, weights, seed: int = 0):
    """``{layer: {width: drift-weighted mean squared chunk change}}`` with only that layer's input rounded."""
    from daptq.methods import as_adapter
    from daptq.methods.daptq.sensitivity import action_deviation
    from daptq.quant.spec import QuantSpec, WeightSpec

    adapter = as_adapter(policy)
    out = {n: {} for n in names}
    for b, a in act_specs.items():
        spec = QuantSpec(WeightSpec(16), a)
        for n, v in action_deviation(adapter, batches, names, spec, weights, seed).items():
            out[n][b] = v
    return out


def validation_set(root: Path, policy, episodes: int):
    from daptq.data.calibration import sample_calibration
    from daptq.data.episodes import chunk_size_of
    from daptq.data.generate import generate_dataset

    data = generate_dataset(
        root / "val-data", list(TASKS), {"val": episodes}, image_size=int(policy.image_size), progress=False
    )
    return sample_calibration(
        data,
        episodes * len(TASKS),
        chunk_size=int(chunk_size_of(policy)),
        split="val",
        tasks=list(TASKS),
        seed=0,
    )


def markdown(payload: dict) -> str:
    lines = [
        "# Activation-rounding estimate vs measured damage (open loop, validation split)",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"{payload['n_layers']} layers of the budget scope; activations per-token dynamic; damage = "
        "drift-weighted mean squared change of the sampled action chunks (shared noise) on "
        f"{payload['validation_samples']} validation-split observations, one layer's input rounded at a "
        "time. "
        f"Wall time {payload['seconds']:.0f} s.",
        "",
        "| widths | estimator | Spearman rho | permutation p | bootstrap 95% |",
        "|---|---|---:|---:|---|",
    ]
    for key, rep in payload["ranking"].items():
        for name, row in rep["estimators"].items():
            lo, hi = row["rho_bootstrap_ci95"]
            lines.append(
                f"| {key} | {name} | {row['rho']:.3f} | {row['p_permutation']:.2g} | [{lo:.2f}, {hi:.2f}] |"
            )
    lines += ["", "| layer | " + " | ".join(f"A{b} est. / damage" for b in payload["widths"]) + " |"]
    lines.append("|---|" + "---:|" * len(payload["widths"]))
    est, dmg = payload["estimates"]["drift_fisher"], payload["damage"]
    for n in est:
        cells = [f"{est[n][str(b)]:.3g} / {dmg[n][str(b)]:.3g}" for b in payload["widths"]]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    p.add_argument("--val-episodes", type=int, default=4, help="validation episodes per task")
    p.add_argument("--root", default="runs/act_surrogate")
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    import torch

    from daptq.data.calibration import calibration_for_policy
    from daptq.methods import as_adapter
    from daptq.models.registry import load_policy
    from daptq.quant.spec import ActivationSpec

    torch.set_num_threads(1)
    sc = _surrogate_check()
    start = time.perf_counter()
    root = Path(args.root)
    policy = load_policy(REFERENCE)
    names = sc.scoped_layers(policy)
    act_specs = {b: ActivationSpec(b) for b in args.widths}
    est, weights = estimates(policy, calibration_for_policy(policy), names, act_specs)
    print(f"estimates: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    val = validation_set(root, policy, args.val_episodes)
    adapter = as_adapter(policy)
    val_batches = list(adapter.calibration_batches(iter(val.batches)))
    dmg = measured_damage(policy, val_batches, names, act_specs, weights)
    ranking = {}
    keys = [(f"A{b}", [b]) for b in args.widths]
    if len(args.widths) > 1:
        keys.append(("pooled", list(args.widths)))
    for key, widths in keys:
        pairs = [(n, b) for b in widths for n in names]
        y = [dmg[n][b] for n, b in pairs]
        ranking[key] = sc.rank_report({e: [est[e][n][b] for n, b in pairs] for e in ESTIMATORS}, y)
    payload = {
        "command": "nice -n 10 python benchmarks/activation_surrogate.py " + " ".join(argv or sys.argv[1:]),
        "n_layers": len(names),
        "widths": args.widths,
        "validation_samples": val.num_samples,
        "seconds": time.perf_counter() - start,
        "ranking": ranking,
        "estimates": {e: {n: {str(b): v for b, v in row.items()} for n, row in est[e].items()} for e in est},
        "damage": {n: {str(b): v for b, v in row.items()} for n, row in dmg.items()},
    }
    out = Path(args.results)
    atomic_write_text(out / "activation_surrogate.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out / "activation_surrogate.md", markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
