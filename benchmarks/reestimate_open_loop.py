"""Open-loop check of DA-PTQ ``budget`` with re-estimated sensitivities (``reestimate_rounds``, issue #29).

For each average bit budget, estimator and number of rounds: quantize a fresh ``ref:metaworld-mt10`` with the
``budget`` preset (RTN rounding, no CSRC, so only the allocation differs) on ``--trajectories`` calibration
trajectories (sampler seed 0), and score it on as many other calibration-split trajectories (seed 1): the
relative error ``||a_q - a_fp|| / ||a_fp||`` of the sampled action chunks, the same noise for both. Also how
many layers each round moved. A cheap signal before the closed-loop variant ``daptq-reest1`` of
``benchmarks/methods_closed_loop.py`` (which is what counts). Writes
``results/reestimate_open_loop.{json,md}``.

    python benchmarks/reestimate_open_loop.py --avg-bits 2.75 3.0 --estimators drift_fisher drift_taylor \\
        --rounds 0 1 --trajectories 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from daptq.atomic import atomic_write_text


def held_out_error(fp, q, batches) -> float:
    errs = []
    for i, b in enumerate(batches):
        a = fp.adapter.predict_chunk(b, generator=torch.Generator().manual_seed(i))
        c = q.adapter.predict_chunk(b, generator=torch.Generator().manual_seed(i))
        errs.append(float((c - a).norm() / a.norm()))
    return sum(errs) / len(errs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref:metaworld-mt10")
    p.add_argument("--avg-bits", type=float, nargs="+", default=[2.75, 3.0])
    p.add_argument("--estimators", nargs="+", default=["drift_fisher", "drift_taylor"])
    p.add_argument("--rounds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--trajectories", type=int, default=32)
    p.add_argument("--results", default="results")
    args = p.parse_args(argv)
    command = "python benchmarks/reestimate_open_loop.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    from daptq.data.calibration import calibration_for_policy
    from daptq.methods import quantize_policy
    from daptq.methods.daptq import DAPTQConfig
    from daptq.models.registry import load_policy

    torch.set_num_threads(1)
    fp = load_policy(args.model)
    calibration = calibration_for_policy(fp, None, args.trajectories, seed=0)
    held = list(
        fp.adapter.calibration_batches(
            iter(calibration_for_policy(fp, None, args.trajectories, seed=1).batches)
        )
    )
    rows = []
    for avg in args.avg_bits:
        for estimator in args.estimators:
            for rounds in args.rounds:
                q = load_policy(args.model)
                config = DAPTQConfig.budget(
                    average_bits=avg, use_csrc=False, estimator=estimator, reestimate_rounds=rounds
                )
                start = time.perf_counter()
                record = quantize_policy(q, config, calibration)
                seconds = time.perf_counter() - start
                re = record.decisions.get("reestimate") or {"rounds": [{}]}
                rows.append(
                    {
                        "average_bits": avg,
                        "estimator": estimator,
                        "rounds": rounds,
                        "held_out_rel_error": held_out_error(fp, q, held),
                        "changed_per_round": [len(r.get("changed_layers", [])) for r in re["rounds"][1:]],
                        "converged_at_round": re.get("converged_at_round"),
                        "total_bytes": record.decisions["allocation"]["total_bytes"],
                        "budget_bytes": record.decisions["allocation"]["budget_bytes"],
                        "quantize_s": seconds,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        "# DA-PTQ budget: re-estimated sensitivities, open loop",
        "",
        f"`{command}`",
        "",
        f"{args.model}, RTN rounding, no CSRC; calibration {args.trajectories} trajectories (seed 0), "
        f"held-out {args.trajectories} other calibration-split trajectories (seed 1); relative chunk error "
        "vs FP.",
        "",
        "| avg bits | estimator | rounds | held-out rel. error | layers moved per round | bytes/budget | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['average_bits']} | {r['estimator']} | {r['rounds']} | {r['held_out_rel_error']:.4f} "
            f"| {', '.join(map(str, r['changed_per_round'])) or '-'} "
            f"| {r['total_bytes'] / r['budget_bytes']:.4f} "
            f"| {r['quantize_s']:.0f} |"
        )
    out = Path(args.results)
    atomic_write_text(
        out / "reestimate_open_loop.json", json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
    )
    atomic_write_text(out / "reestimate_open_loop.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
