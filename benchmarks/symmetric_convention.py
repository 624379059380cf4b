"""Layer MSE of RTN per bit width for the symmetric grid conventions (restricted, full, full_exact), affine.

Two sources of weights: a Gaussian 512x512 layer and every in-scope Linear of the bundled reference VLA
(backbone, interface, action head). Relative MSE is ||W - Q(W)||^2 / ||W||^2 (for the VLA: summed over
layers); lower is better. The last table says which symmetric convention is best per bit width and
granularity on the VLA's weights: ``daptq.methods.rtn.RTN_SYMMETRIC_RANGE`` quotes it. Writes
results/symmetric_convention.json and .md atomically.

    python benchmarks/symmetric_convention.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from daptq.atomic import atomic_write_text
from daptq.quant import WeightSpec, fake_quantize_weight

BITS = (2, 3, 4, 8)
GRANULARITIES = (("per_channel", None), ("per_group", 32), ("per_group", 128))
CONVENTIONS = ("restricted", "full", "full_exact", "asymmetric")


def spec_for(bits: int, granularity: str, group: int | None, convention: str) -> WeightSpec:
    if convention == "asymmetric":
        return WeightSpec(bits, False, granularity, group, scale_dtype="float32")
    return WeightSpec(bits, True, granularity, group, scale_dtype="float32", symmetric_range=convention)


def rel_mse(weights: list[torch.Tensor], spec: WeightSpec) -> float:
    err = sum(float((fake_quantize_weight(w, spec) - w).pow(2).sum()) for w in weights)
    return err / sum(float(w.pow(2).sum()) for w in weights)


def vla_weights() -> list[torch.Tensor]:
    from daptq.methods.scope import DEFAULT_ROLES
    from daptq.models.reference import load_reference_policy

    policy = load_reference_policy("metaworld-mt10")
    return [
        m.module.weight.detach().float()
        for m in policy.adapter.quantizable_modules()
        if m.role in DEFAULT_ROLES and isinstance(m.module, torch.nn.Linear)
    ]


def fits(weights: list[torch.Tensor], group: int | None) -> list[torch.Tensor]:
    return [w for w in weights if group is None or w.shape[1] % group == 0]


def main() -> None:
    torch.set_num_threads(1)
    sources = {
        "gaussian 512x512": [torch.randn(512, 512, generator=torch.Generator().manual_seed(0))],
        "reference VLA (in scope)": vla_weights(),
    }
    rows = []
    for source, weights in sources.items():
        for gran, group in GRANULARITIES:
            ws = fits(weights, group)
            for bits in BITS:
                row = {"source": source, "bits": bits, "granularity": gran if group is None else f"g{group}"}
                row["layers"] = len(ws)
                for conv in CONVENTIONS:
                    row[conv] = rel_mse(ws, spec_for(bits, gran, group, conv))
                sym = {c: row[c] for c in CONVENTIONS if c != "asymmetric"}
                row["best_symmetric"] = min(sym, key=sym.get)
                rows.append(row)
    out = Path("results")
    atomic_write_text(out / "symmetric_convention.json", json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        "# RTN layer error by symmetric grid convention",
        "",
        "Relative MSE ||W - Q(W)||^2 / ||W||^2, min-max observer, float32 scales. Command: "
        "`python benchmarks/symmetric_convention.py`.",
        "",
        "| source | granularity | bits | layers | restricted | full | full_exact | asymmetric"
        " | best symmetric |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vals = " | ".join(f"{r[c]:.4g}" for c in CONVENTIONS)
        head = f"| {r['source']} | {r['granularity']} | {r['bits']} | {r['layers']}"
        lines.append(f"{head} | {vals} | {r['best_symmetric']} |")
    atomic_write_text(out / "symmetric_convention.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
