"""GPTQ ``sequential=True`` as one pass through the block loop against the per-layer passes it replaced.

Until issue #28, ``GPTQConfig(sequential=True)`` re-ran the whole calibration once per layer, each layer's
Hessian measured with every layer before it (in execution order) already rounded. It is now one calibration
pass plus the per-block event (``daptq.methods.sequential``): each repeated block's Hessians are measured on
the quantized outputs of the block before it; modules outside blocks and each stack's first block on float
inputs. This script keeps the per-layer algorithm (``per_layer_gptq`` below, the old ``GPTQ.apply``) to
measure both on the bundled reference VLA: held-out action-chunk error (as
``benchmarks/baseline_chunk_error.py``), time, and how far the rounded weights are apart.

    python benchmarks/gptq_sequential.py [--trajectories 8] [--out results/gptq_sequential]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from daptq.data.calibration import calibration_for_policy
from daptq.methods import quantize_policy
from daptq.methods.base import forward_batch
from daptq.methods.gptq import GPTQ, GPTQConfig, _blocks, _Tee, gptq_quantize_layer_
from daptq.methods.smoothquant import calibration_run, static_activation_layers
from daptq.models.reference import load_reference
from daptq.quant._util import set_module
from daptq.quant.capture import Hessian, capture, fan_in_rows
from daptq.quant.fake import quantized_module_for
from daptq.quant.observers import ActivationObserver
from daptq.quant.spec import w4a8


class PerLayerGPTQ(GPTQ):
    """The pre-#28 ``sequential=True``: one whole-model calibration pass per layer (reference only)."""

    def calibrate(self, adapter, batches):
        probe = GPTQ(dataclasses.replace(self.config, sequential=False))
        probe.plan = self.plan
        probe.calibrate(adapter, batches)  # only for the execution order
        self._order, self._batches = probe._order, batches

    def apply(self, adapter):
        plan, model, cfg = self.plan, adapter.model, self.config
        static = set(static_activation_layers(plan.specs))
        for name in self._order:
            spec = plan.modules[name].spec
            hessian = None if spec.weight.is_float else Hessian(_blocks(model.get_submodule(name)))
            observer = ActivationObserver(spec.activation, name) if name in static else None
            parts = [r for r in (hessian, observer) if r is not None]
            if parts:
                capture(
                    model, calibration_run(adapter, self._batches), {name: _Tee(*parts)}, rows=fan_in_rows
                )
            layer = quantized_module_for(model.get_submodule(name), spec, name, round_now=False)
            if hessian is None:
                layer.requantize(name)
            else:
                gptq_quantize_layer_(layer, hessian.hessian, cfg.block_size, cfg.damp, cfg.act_order)
            if observer is not None:
                layer.set_activation_qparams(*observer.compute())
            set_module(model, name, layer)


def chunk_error(policy, reference_outputs, inputs) -> float:
    pairs = zip(inputs, reference_outputs, strict=True)
    num = sum(float((forward_batch(policy, b) - r).pow(2).sum()) for b, r in pairs)
    return (num / sum(float(r.pow(2).sum()) for r in reference_outputs)) ** 0.5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ref:metaworld-mt10")
    p.add_argument("--trajectories", type=int, default=8)
    p.add_argument("--out", default="results/gptq_sequential")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fp = load_reference(args.model)
    calibration = calibration_for_policy(fp, n_trajectories=args.trajectories, seed=0)
    held_out = calibration_for_policy(fp, n_trajectories=args.trajectories, seed=1)
    inputs = list(fp.adapter.calibration_batches(iter(held_out.batches)))
    reference_outputs = [forward_batch(fp, b) for b in inputs]
    spec = w4a8()
    policies, rows = {}, []
    runs = {
        "one pass, float Hessians (sequential=False)": lambda pol: quantize_policy(
            pol, GPTQConfig(spec=spec), calibration
        ),
        "sequential=True: one pass + per-block event (new)": lambda pol: quantize_policy(
            pol, GPTQConfig(spec=spec, sequential=True), calibration
        ),
        "sequential=True: one pass per layer (old)": lambda pol: _per_layer(pol, spec, calibration),
    }
    for label, run in runs.items():
        policy = load_reference(args.model)
        t0 = time.perf_counter()
        run(policy)
        elapsed = time.perf_counter() - t0
        policies[label] = policy
        rows.append((label, chunk_error(policy, reference_outputs, inputs), elapsed))
        print(rows[-1], flush=True)
    new, old = (policies[k].model.state_dict() for k in list(runs)[1:])
    keys = [k for k in new if k.endswith("qweight")]
    same = sum(int((new[k] == old[k]).sum()) for k in keys) / sum(new[k].numel() for k in keys)
    lines = [
        "# GPTQ sequential: one pass with the per-block event vs one pass per layer",
        "",
        f"`python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}`; {args.model}, "
        f"{spec.short()}, {calibration.num_samples} calibration / {held_out.num_samples} held-out samples, "
        "1 thread.",
        "",
        "| GPTQ | held-out chunk error | quantize time (s) |",
        "|---|---|---|",
        *[f"| {label} | {err:.4f} | {t:.1f} |" for label, err, t in rows],
        "",
        f"Weight codes equal between the new and the old sequential GPTQ: {100 * same:.1f}% "
        f"({len(keys)} layers).",
    ]
    from daptq.atomic import atomic_write_text

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _per_layer(policy, spec, calibration):
    from daptq.methods import as_adapter

    adapter = as_adapter(policy)
    method = PerLayerGPTQ(GPTQConfig(spec=spec, sequential=True))
    method.prepare(adapter)
    batches = list(adapter.calibration_batches(iter(calibration.batches)))
    method.calibrate(adapter, batches)
    method.remove_hooks()
    method.apply(adapter)
    policy.invalidate_caches()


if __name__ == "__main__":
    raise SystemExit(main())
