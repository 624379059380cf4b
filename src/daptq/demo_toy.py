"""A small end-to-end quantization demo on a seeded toy MLP (runs in a few seconds on CPU).

It quantizes the same model with RTN at W8 per-channel and at W4 group-32, prints per-layer weight SQNR,
output error and bytes (fp16 vs quantized), and, given ``out_dir``, saves each quantized checkpoint, reloads
it and checks the outputs are bit-identical. It is the README's main job until the full VLA demo exists.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daptq.quant import (
    QuantSpec,
    WeightSpec,
    load_quantized,
    model_bytes,
    quantize_,
    quantized_modules,
    save_quantized,
    sqnr_db,
)

SPECS = {
    "W8 per-channel": QuantSpec(WeightSpec(8, granularity="per_channel")),
    "W4 group-32": QuantSpec(WeightSpec(4, granularity="per_group", group_size=32)),
}


def build_toy_mlp(seed: int = 0) -> nn.Sequential:
    """Deterministic 4-layer MLP (64 -> 256 -> 256 -> 128 -> 16)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256),
        nn.GELU(),
        nn.Linear(256, 256),
        nn.GELU(),
        nn.Linear(256, 128),
        nn.GELU(),
        nn.Linear(128, 16),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(p.shape[-1], 1) ** 0.5))
    return model.eval()


def _layer_rows(fp: nn.Module, q: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per layer: weight SQNR and the output error of that layer on its own FP input."""
    fp_inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: fp_inputs.__setitem__(n, a[0]))
        for n, m in fp.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            fp(x)
    finally:
        for h in handles:
            h.remove()
    rows = []
    bytes_rows = {r.name: r for r in model_bytes(q).rows}
    for name, layer in quantized_modules(q).items():
        ref_layer = fp.get_submodule(name)
        with torch.no_grad():
            y_ref, y_q = ref_layer(fp_inputs[name]), layer(fp_inputs[name])
        b = bytes_rows[name]
        rows.append(
            {
                "layer": name,
                "shape": list(layer.weight.shape),
                "spec": layer.spec.short(),
                "weight_sqnr_db": sqnr_db(ref_layer.weight, layer.dequantized_weight()),
                "output_sqnr_db": sqnr_db(y_ref, y_q),
                "output_max_abs_err": float((y_ref - y_q).abs().max()),
                "fp16_bytes": b.fp16_bytes,
                "quant_bytes": b.ideal_bytes,
            }
        )
    return rows


def _print_table(title: str, rows: list[dict[str, Any]], model_sqnr: float) -> None:
    print(f"\n{title}: model output SQNR {model_sqnr:.1f} dB")
    print(
        "| layer | shape | spec | weight SQNR (dB) | output SQNR (dB) | max abs err | fp16 bytes "
        "| quant bytes |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['layer']} | {tuple(r['shape'])} | {r['spec']} | {r['weight_sqnr_db']:.1f} | "
            f"{r['output_sqnr_db']:.1f} | {r['output_max_abs_err']:.2e} | {r['fp16_bytes']} "
            f"| {r['quant_bytes']} |"
        )
    fp, q = sum(r["fp16_bytes"] for r in rows), sum(r["quant_bytes"] for r in rows)
    print(f"| **total** | | | | | | {fp} | {q} ({q / fp:.3f}x) |")


def run_toy_demo(out_dir: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Quantize the toy MLP at W8 and W4 and return per-layer metrics (and reload checks when ``out_dir``)."""
    fp = build_toy_mlp(seed)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y_fp = fp(x)
    summary: dict[str, Any] = {"seed": seed, "results": {}}
    for label, spec in SPECS.items():
        q = copy.deepcopy(fp)
        quantize_(q, spec)
        with torch.no_grad():
            y_q = q(x)
        result: dict[str, Any] = {
            "spec": spec.to_dict(),
            "model_output_sqnr_db": sqnr_db(y_fp, y_q),
            "layers": _layer_rows(fp, q, x),
            "fp16_bytes": model_bytes(q).fp16_bytes,
            "quant_bytes": model_bytes(q).ideal_bytes,
        }
        _print_table(label, result["layers"], result["model_output_sqnr_db"])
        if out_dir is not None:
            ckpt = Path(out_dir) / label.lower().replace(" ", "_").replace("-", "")
            save_quantized(q, ckpt)
            reloaded = load_quantized(lambda: build_toy_mlp(seed), ckpt)
            with torch.no_grad():
                equal = torch.equal(reloaded(x), y_q)
            if not equal:
                raise RuntimeError(f"{label}: reloaded checkpoint does not reproduce the outputs bit for bit")
            result["checkpoint"] = str(ckpt)
            result["reload_bit_exact"] = equal
            print(f"saved {ckpt} and reloaded it: outputs bit-identical = {equal}")
        summary["results"][label] = result
    return summary


if __name__ == "__main__":
    import sys

    run_toy_demo(sys.argv[1] if len(sys.argv) > 1 else None)
