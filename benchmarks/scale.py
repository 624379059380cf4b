"""Peak memory and time per stage of sequential GPTQ W4A8 (or DA-PTQ paper) on a streamed CogACT checkpoint.

For each backbone depth: a random-weight CogACT (``--shape llama``: a Llama backbone of the given width,
tiny vision towers and DiT; ``--shape cogact-7b``: CogACT-Base's released shape, bf16, written shard by
shard from the meta device) is written as safetensors shards, then a fresh process loads it on the meta
device, quantizes it with GPTQ W4A8 (``--method``) block by block (``daptq.methods.sequential``, weights
streamed by ``daptq.models.streaming``, each quantized block written to disk and freed) and reports its peak
RSS (VmHWM) and the time and peak of each stage. The slope of peak RSS over depth is what must stay near
zero: memory grows with one block, not with the model.

    python benchmarks/scale.py --layers 1 2 4 --hidden 1024 --intermediate 2816   # minutes on 2 cores
    python benchmarks/scale.py --shape cogact-7b --layers 2 4 8 16 32   # the 7B shape: hours on 2 cores

Writes results/scale.json and results/scale.md (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, sys, time, numpy as np, torch
    from daptq.data.calibration import CalibrationSet
    from daptq.methods.gptq import GPTQConfig
    from daptq.methods.sequential import quantize_policy_sequential
    from daptq.models.cogact.streamed import load_streamed_cogact
    from daptq.models.cogact.testing import tiny_tokenizer
    from daptq.models.streaming import save_block_state
    from daptq.quant.spec import w4a8
    from daptq.methods.daptq.config import DAPTQConfig
    ckpt, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(int(sys.argv[4]))
    method = sys.argv[5]
    chunk = json.load(open(f"{ckpt}/cogact_config.json"))["future_action_window_size"] + 1
    words = ["pick the coke can", "open the drawer", "move the red block left", "put spoon on towel"]
    r = np.random.default_rng(0)
    raws = [{"image": r.integers(0, 256, (2, 36, 44, 3), dtype=np.uint8), "instruction": words[i % 2::2][:2],
             "state": np.zeros((2, 4), np.float32),
             "actions": r.uniform(-0.03, 0.03, (2, chunk, 7)).astype(np.float32)} for i in range(n)]
    t0 = time.perf_counter()
    # the checkpoint's bf16 weights computed in fp32 (this CPU has no bf16 units), one block at a time
    adapter, loader = load_streamed_cogact(ckpt, tiny_tokenizer(), dtype=torch.float32)
    load_s = time.perf_counter() - t0
    hwm = lambda: int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
    load_peak = hwm()
    t_start = time.perf_counter()
    def done(b, m):
        save_block_state(m, f"{out}/{b.name}.safetensors")
        print(f"block {b.name} written at {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)
    cal = CalibrationSet(raws, {"source": "benchmarks/scale.py"})
    config = GPTQConfig(spec=w4a8()) if method == "gptq" else DAPTQConfig.paper()
    rec = quantize_policy_sequential(adapter, config, cal, loader=loader, on_block_done=done)
    stages = {k: v for k, v in rec.timings.items()}
    peak = max(load_peak, hwm(), *(v * 2**20 for k, v in stages.items() if k.endswith("_peak_rss_mb")))
    print(json.dumps({"load_s": load_s, "load_peak_rss_mb": load_peak / 2**20, **stages,
                      "peak_rss_mb": peak / 2**20, "blocks": len(rec.decisions["sequential"]["blocks"])}))
    """
)


def write_released_shape(directory: Path, layers: int) -> int:
    """CogACT-Base's released shape (DINOv2-L + SigLIP-so400m towers, Llama-2-7B layers, DiT-B) with
    ``layers`` backbone layers, random bf16 weights written shard by shard (never whole in memory);
    returns the backbone layers' fp32 bytes."""
    from daptq.models.cogact.config import CogACTConfig
    from daptq.models.cogact.testing import write_random_streamed_cogact

    config = CogACTConfig(num_hidden_layers=layers)
    write_random_streamed_cogact(config, directory)
    h, m = config.hidden_size, config.intermediate_size
    return layers * (4 * h * h + 3 * h * m + 2 * h) * 4


def write_checkpoint(directory: Path, layers: int, hidden: int, intermediate: int, heads: int) -> int:
    """A random CogACT (tiny towers and DiT, the given Llama shape) as shards; returns the backbone bytes."""
    import torch

    from daptq.models.cogact.streamed import write_streamed_cogact
    from daptq.models.cogact.testing import tiny_cogact

    torch.manual_seed(0)
    model = tiny_cogact(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    nbytes = sum(p.numel() * p.element_size() for p in model.llm_backbone.llm.model.layers.parameters())
    write_streamed_cogact(model, directory, max_shard_bytes=1 << 30)
    return nbytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument(
        "--shape",
        choices=["llama", "cogact-7b"],
        default="llama",
        help="llama: Llama layers of --hidden/--intermediate with tiny towers and DiT (the checkpoint is "
        "built in memory); cogact-7b: the released CogACT-Base shape (--layers backbone layers of "
        "Llama-2-7B, real DINOv2-L/SigLIP-so400m towers, DiT-B), bf16, written shard by shard",
    )
    p.add_argument("--method", choices=["gptq", "daptq-paper"], default="gptq")
    p.add_argument("--batches", type=int, default=2, help="calibration batches of 2 samples")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the quantizing process (1: on the shared 2-core machine, 2 intra-op threads "
        "made GPTQ's solve 8x slower)",
    )
    p.add_argument("--out", default="results/scale")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="daptq-scale-", dir=args.workdir) as tmp:
        for layers in args.layers:
            ckpt, out = Path(tmp) / f"ckpt{layers}", Path(tmp) / f"q{layers}"
            out.mkdir()
            t0 = time.perf_counter()
            if args.shape == "cogact-7b":
                nbytes = write_released_shape(ckpt, layers)
            else:
                nbytes = write_checkpoint(ckpt, layers, args.hidden, args.intermediate, args.heads)
            write_s = time.perf_counter() - t0
            ckpt_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
            child = [str(ckpt), str(out), str(args.batches), str(args.threads), args.method]
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *child],
                stdout=subprocess.PIPE,  # progress (a line per block) goes to stderr as it happens
                text=True,
            )
            if proc.returncode:
                raise SystemExit(f"scale: {layers} layers failed (its stderr is above)")
            row = {
                "layers": layers,
                "backbone_fp32_mb": nbytes / 2**20,
                "write_s": write_s,
                "checkpoint_mb": ckpt_mb,
            }
            row["quantized_mb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(args, argv, rows)  # after every depth: an interrupted run keeps what it measured
    return 0


def write_results(args: argparse.Namespace, argv: list[str] | None, rows: list[dict]) -> None:
    slope = None
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["layers"] - a["layers"])
    per_layer = rows[0]["backbone_fp32_mb"] / rows[0]["layers"] if rows else None
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "shape": (
            {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads}
            if args.shape == "llama"
            else "cogact-7b: CogACT-Base as released (Llama-2-7B, DINOv2-L + SigLIP-so400m, DiT-B), bf16"
        ),
        "threads": args.threads,
        "method": (
            "gptq w4a8 (g128)" if args.method == "gptq" else "DA-PTQ paper (W4A8, CSRC, Eq. 20 bit map)"
        )
        + ", sequential, weights streamed, quantized blocks written to disk",
        "rows": rows,
        "peak_rss_slope_mb_per_layer": slope,
        "fp32_mb_per_layer": per_layer,
    }
    from daptq.atomic import atomic_write_json, atomic_write_text

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    stages = ("prepare", "calibrate", "apply")
    lines = [
        f"# Scale: {result['method']}",
        "",
        f"`{result['command']}`; "
        + (
            f"Llama layers of width {args.hidden} (MLP {args.intermediate}), tiny vision towers and DiT"
            if args.shape == "llama"
            else "CogACT-Base's released shape (Llama-2-7B layers, DINOv2-L + SigLIP-so400m towers, DiT-B), "
            "random bf16 weights computed in fp32"
        )
        + f", 2-core CPU, {args.threads} torch thread(s).",
        "",
        "| layers | backbone fp32 MB | checkpoint MB | written blocks MB (float weights kept) "
        "| peak RSS MB | " + " | ".join(f"{s} s / peak MB" for s in stages) + " |",
        "|" + "---|" * (5 + len(stages)),
    ]
    for r in rows:
        cells = [f"{r[f'{s}_s']:.1f} / {r[f'{s}_peak_rss_mb']:.0f}" for s in stages]
        sizes = f"{r.get('checkpoint_mb', float('nan')):.0f} | {r.get('quantized_mb', float('nan')):.0f}"
        head = f"| {r['layers']} | {r['backbone_fp32_mb']:.0f} | {sizes} | {r['peak_rss_mb']:.0f} | "
        lines.append(head + " | ".join(cells) + " |")
    if slope is not None:
        lines += [
            "",
            f"Peak RSS slope: {slope:.1f} MB per added layer, against {per_layer:.0f} MB of fp32 weights per "
            "layer (an in-memory model would add all of it).",
        ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
