"""Calibration cost of DA-PTQ against GPTQ on the same model and the same calibration data, in one run.

For each setting, GPTQ and DA-PTQ (``paper`` at w4a8; the ``budget`` preset at the avg settings, exactly as
``methods_closed_loop.py`` configures them) quantize a fresh copy of ``ref:metaworld-mt10`` from one
calibration set loaded once; the methods alternate within each repeat so that a change of machine load hits
both. Times are wall clock of ``quantize_policy`` (prepare + calibrate + apply, the record's own timings
beside them), one torch thread unless ``--threads``. The issue's goal: DA-PTQ at most 2x GPTQ's time.
Writes results/calibration_cost.{json,md}.

    python benchmarks/calibration_cost.py --settings w4a8 avg3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods_closed_loop import REFERENCE, method_config  # noqa: E402

from daptq.atomic import atomic_write_text  # noqa: E402

METHODS = ("gptq", "daptq")


def time_once(method: str, setting: str, calibration) -> dict:
    """Quantize a fresh reference VLA with ``method`` at ``setting``: wall seconds and the record's
    timings."""
    from daptq.methods import quantize_policy
    from daptq.models.registry import load_policy

    policy = load_policy(REFERENCE)
    config = method_config(method, setting)
    start = time.perf_counter()
    record = quantize_policy(policy, config, calibration)
    return {"wall_s": time.perf_counter() - start, "timings": dict(record.timings)}


def measure(settings: list[str], repeats: int) -> list[dict]:
    from daptq.data.calibration import calibration_for_policy
    from daptq.models.registry import load_policy

    calibration = calibration_for_policy(load_policy(REFERENCE))
    rows = []
    for setting in settings:
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(repeats):
            for method in METHODS if r % 2 == 0 else METHODS[::-1]:
                runs[method].append(time_once(method, setting, calibration))
                print(f"{setting} {method}: {runs[method][-1]['wall_s']:.1f} s", file=sys.stderr)
        median = {m: statistics.median(x["wall_s"] for x in runs[m]) for m in METHODS}
        rows.append(
            {
                "setting": setting,
                "samples": calibration.num_samples,
                "wall_s": {m: [round(x["wall_s"], 2) for x in runs[m]] for m in METHODS},
                "median_s": {m: round(v, 2) for m, v in median.items()},
                "timings_last": {m: runs[m][-1]["timings"] for m in METHODS},
                "ratio_daptq_to_gptq": round(median["daptq"] / median["gptq"], 2),
            }
        )
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Calibration cost: DA-PTQ vs GPTQ",
        "",
        f"`{result['command']}` on {result['machine']['cpus']} CPUs, {result['threads']} torch thread(s); "
        f"1-min load average {result['machine']['load_avg_1m_start']:.1f} at the start, "
        f"{result['machine']['load_avg_1m_end']:.1f} at the end. Same model, same calibration set "
        f"({result['rows'][0]['samples']} samples), methods alternating within each repeat; wall clock of "
        "`quantize_policy`, median over repeats.",
        "",
        "| setting | DA-PTQ preset | GPTQ (s) | DA-PTQ (s) | DA-PTQ / GPTQ | goal <= 2x "
        "| DA-PTQ phases (last run, s) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        preset = "paper" if r["setting"] == "w4a8" else "budget"
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timings_last"]["daptq"].items())
        ok = "met" if r["ratio_daptq_to_gptq"] <= 2 else "missed"
        lines.append(
            f"| {r['setting']} | {preset} | {r['median_s']['gptq']:.1f} | {r['median_s']['daptq']:.1f} "
            f"| {r['ratio_daptq_to_gptq']:.2f}x | {ok} | {phases} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["w4a8", "avg3"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/calibration_cost")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit("--repeats and --threads must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows = measure(args.settings, args.repeats)
    result = {
        "benchmark": "calibration time, DA-PTQ vs GPTQ, same model and data",
        "command": "python benchmarks/calibration_cost.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m_start": load_start,
            "load_avg_1m_end": os.getloadavg()[0],
        },
        "rows": rows,
    }
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
