"""Open-loop action-chunk error of the baselines on the reference VLA, on data they were not calibrated on.

Each method quantizes a fresh copy of the bundled reference VLA on ``--trajectories`` calibration trajectories
(sampler seed 0) and is scored on as many other calibration-split trajectories (seed 1): the relative error
``||a_q - a_fp|| / ||a_fp||`` of the predicted action chunks, with the same sampling noise for both. A cheap
signal for choosing defaults before closed-loop evaluation (which is what counts). Prints a Markdown table.

    python benchmarks/baseline_chunk_error.py [--spec w4a8|w4g32|w8a8] [--trajectories 8] \
        [--configs rtn smoothquant awq awq:clip gptq gptq:sequential]
"""

from __future__ import annotations

import argparse
import time

import torch

from daptq.data.calibration import calibration_for_policy
from daptq.methods import quantize_policy
from daptq.methods.awq import AWQConfig
from daptq.methods.base import forward_batch
from daptq.methods.gptq import GPTQConfig
from daptq.methods.rtn import RTNConfig
from daptq.methods.smoothquant import SmoothQuantConfig
from daptq.models.reference import load_reference
from daptq.quant import ActivationSpec, QuantSpec, WeightSpec, w4a8

SPECS = {
    "w4a8": w4a8(),
    "w4g32": QuantSpec(WeightSpec(4, granularity="per_group", group_size=32)),
    "w8a8": QuantSpec(WeightSpec(8), ActivationSpec(8)),
}
CONFIGS = {
    "rtn": lambda s: RTNConfig(spec=s),
    "smoothquant": lambda s: SmoothQuantConfig(spec=s),
    "awq": lambda s: AWQConfig(spec=s, clip=False),
    "awq:clip": lambda s: AWQConfig(spec=s, clip=True),
    "gptq": lambda s: GPTQConfig(spec=s, sequential=False),
    "gptq:sequential": lambda s: GPTQConfig(spec=s, sequential=True),
}


def chunk_error(policy, reference_outputs, inputs) -> float:
    pairs = zip(inputs, reference_outputs, strict=True)
    num = sum(float((forward_batch(policy, b) - r).pow(2).sum()) for b, r in pairs)
    return (num / sum(float(r.pow(2).sum()) for r in reference_outputs)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ref:metaworld-mt10")
    parser.add_argument("--spec", choices=sorted(SPECS), default="w4a8")
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp = load_reference(args.model)
    calibration = calibration_for_policy(fp, n_trajectories=args.trajectories, seed=0)
    held_out = calibration_for_policy(fp, n_trajectories=args.trajectories, seed=1)
    inputs = list(fp.adapter.calibration_batches(iter(held_out.batches)))
    reference_outputs = [forward_batch(fp, b) for b in inputs]
    spec = SPECS[args.spec]
    print(f"{args.model}, {spec.short()}, {calibration.num_samples} calibration / {held_out.num_samples} "
          "held-out samples\n")  # fmt: skip
    print("| config | held-out chunk error | quantize time (s) |\n|---|---|---|")
    for name in args.configs:
        policy = load_reference(args.model)
        start = time.perf_counter()
        quantize_policy(policy, CONFIGS[name](spec), calibration)
        elapsed = time.perf_counter() - start
        print(
            f"| {name} | {chunk_error(policy, reference_outputs, inputs):.4f} | {elapsed:.1f} |", flush=True
        )


if __name__ == "__main__":
    main()
