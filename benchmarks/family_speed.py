"""Speed and memory of one policy call (one action chunk) of each VLA family at a realistic width (issue #26).

Random weights (latency does not depend on their values), each family at its released checkpoint's widths
with fewer layers so that the whole run fits a shared 2-core machine in minutes (``SIZES``; the exact
config of every family is written into the JSON). Per family, rows:

- ``torch-fp32``: the family's PyTorch network as ``daptq eval`` runs it (``adapter.predict_chunk``);
- ``torch-w4a8-fake``: RTN W4A8 (4-bit symmetric weights, groups of 128 or the largest divisor, int8
  per-token activations) over the adapter's default scope (backbone, interface, action head), fake-quant:
  what daptq evaluates, not a deployment;
- ``torch-w4-packed``: the same layers weight-only W4 on daptq's packed int4 CPU kernels (bf16 compute):
  the PyTorch deployment where the family's graph does not export (W4A8 has no PyTorch CPU kernel);
- pi0 (its graph exports, ``daptq.deploy.flow_export``): ``ort-fp32`` and ``ort-w4a8`` (MatMulNBits int4
  weights, int8 activations, one-step expert graph called ``num_steps`` times) and ``ort-w4a8-unrolled``
  (the Euler loop unrolled in one graph).

One call is the network from preprocessed model inputs to the chunk (prefix/backbone once + the action
decoder's steps), batch 1, one intra-op thread. Every row runs in its own process (peak RSS = VmHWM of
that process, which includes the Python/torch runtime); the rows of a family run round-robin in one run, so
a noisy neighbour slows them alike and the ratios (to the family's ``torch-fp32``) are the result; absolute
milliseconds on a loaded shared machine are not.

    nice -n 10 .venv/bin/python benchmarks/family_speed.py --out results/family_speed
    .venv/bin/python benchmarks/family_speed.py --size toy --out /tmp/fs   # seconds: the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOL = "@@family "
FAMILIES = ("pi0", "smolvla", "openvla-oft", "gr00t")
ROWS = {
    "pi0": ("torch-fp32", "torch-w4a8-fake", "ort-fp32", "ort-w4a8", "ort-w4a8-unrolled"),
    "smolvla": ("torch-fp32", "torch-w4a8-fake", "torch-w4-packed"),
    "openvla-oft": ("torch-fp32", "torch-w4a8-fake", "torch-w4-packed"),
    "gr00t": ("torch-fp32", "torch-w4a8-fake", "torch-w4-packed"),
}
GROUP_SIZE = 128

# What each family keeps of its released checkpoint (widths, heads, MLPs, image size, chunk and steps as
# released) and what it cuts (depth; vocabularies where only the embedding gather would change). Notes
# say what the original has.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "realistic": {
        "pi0": {
            "note": "PaliGemma-3B widths (Gemma-2B 2048 / MLP 16384, 8 heads, 1 KV head, head 256; "
            "SigLIP So400m 1152 / 4304 at 224 px) and the gemma_300m expert (1024 / 4096); 2 of 18 "
            "Gemma layers and expert layers, 2 of 27 vision layers, vocab 2048 "
            "(of 257152); chunk 50, 10 Euler steps, 48 prompt tokens",
            "text": (2048, 16384, 8, 1, 256, 2, 2048),
            "expert": (1024, 4096, 8, 1, 256, 2, 2048),
            "vision": (1152, 4304, 16, 2, 14, 224),
        },
        "smolvla": {
            "note": "SmolVLA as released (SmolVLM2-500M's first 16 text layers, width 960, 15 heads, 5 KV; "
            "16 expert layers of width 720, cross-attention every other layer; vocab 49280) except the "
            "vision tower: 2 of 12 SigLIP-base layers at 512 px; chunk 50, 10 Euler steps",
            "text": (960, 2560, 15, 5, 64, 16, 49280),
            "expert_layers": 16,
            "vision": (768, 3072, 12, 2, 16, 512),
        },
        "openvla-oft": {
            "note": "Llama-2-7B widths (4096 / 11008, 32 heads) with 2 of 32 layers, DINOv2-L + SigLIP "
            "So400m widths with 2 blocks each (of 24 / 27), one 224 px image (LIBERO's OFT uses two), "
            "the OFT head at 4096; vocab 1024 (of 32064); chunk 8 x 7 actions",
            "llm": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 2},
            "vit_depth": 2,
            "num_images": 1,
        },
        "gr00t": {
            "note": "GR00T N1.5-3B widths (SigLIP-2 1152 / 4304 at 224 px, Qwen3-1.7B 2048 / 6144 with 16 "
            "heads / 8 KV, DiT 1536 = 32 x 48 cross-attending to 2048, VL self-attention 2048) with 2 of "
            "27 vision layers, 2 of 12 LLM layers, 4 of 16 DiT blocks, 1 of 4 VL self-attention blocks; "
            "vocab 1024 (of 151680); horizon 16, 4 flow steps",
            "vision_layers": 2,
            "select_layer": 2,
            "dit_layers": 4,
            "vl_layers": 1,
        },
    },
}


# ---- building a family's adapter and one batch (in a worker) ---------------------------------------------
def _lerobot(kind: str, size: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import torch

    from daptq.models.lerobot_vla import LeRobotVLAAdapter, LeRobotVLAConfig, Statistics, build_model
    from daptq.models.lerobot_vla.config import TextConfig, VisionConfig, smolvla_intermediate
    from daptq.models.lerobot_vla.testing import tiny_statistics

    if size == "toy":
        config = LeRobotVLAConfig.tiny(kind)
    else:
        s = SIZES[size][kind]
        vh, vi, vheads, vl, patch, image = s["vision"]
        vision = VisionConfig(vh, vi, vheads, vl, patch, image)
        if kind == "pi0":
            text, expert = TextConfig(*s["text"]), TextConfig(*s["expert"])
            extra: dict[str, Any] = {"tokenizer_max_length": 48}
        else:
            text = TextConfig(*s["text"], 1e-5)
            w = int(text.hidden * 0.75)
            expert = TextConfig(w, smolvla_intermediate(w), 15, 5, 64, s["expert_layers"], text.vocab, 1e-5)
            extra = {"tie_word_embeddings": False, "scale_factor": 4, "tokenizer_max_length": 48}
        config = LeRobotVLAConfig(
            type=kind, text=text, vision=vision, expert=expert, chunk_size=50, n_action_steps=50,
            num_steps=10, state_dim=8, action_dim=7, **extra,
        )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config).eval()
    raw = tiny_statistics(config)
    stats = Statistics(
        {f: {k: torch.tensor(v) for k, v in d.items()} for f, d in raw.items()},
        dict(config.normalization_mapping),
    )
    adapter = LeRobotVLAAdapter(model, _tokenizer(), stats)
    r = np.random.default_rng(0)
    batch = {
        "image": r.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8),
        "state": (r.normal(size=(1, 8)) * 0.5).astype(np.float32),
        "instruction": ["pick up the red cup and put it on the plate"],
    }
    return adapter, batch, config.to_dict()


def _oft(size: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from dataclasses import replace

    import torch

    from daptq.models.openvla_oft import OFTAdapter, oft_statistics
    from daptq.models.openvla_oft.config import OFTConfig
    from daptq.models.openvla_oft.model import OpenVLAOFT
    from daptq.models.openvla_oft.testing import tiny_statistics

    tiny = OFTConfig.tiny()
    if size == "toy":
        config = tiny
    else:
        s = SIZES[size]["openvla-oft"]
        base = OFTConfig()
        config = replace(
            base,
            dino=replace(base.dino, depth=s["vit_depth"]),
            siglip=replace(base.siglip, depth=s["vit_depth"]),
            vocab_size=1024,
            pad_token_id=tiny.pad_token_id,
            empty_token_id=tiny.empty_token_id,
            action_token_id=tiny.action_token_id,
            stop_token_id=tiny.stop_token_id,
            num_images=s["num_images"],
            **s["llm"],
        )
    torch.manual_seed(0)
    model = OpenVLAOFT(config).eval()
    adapter = OFTAdapter(model, _tokenizer(), oft_statistics(tiny_statistics(), None))
    r = np.random.default_rng(0)
    batch: dict[str, Any] = {
        "image": r.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8),
        "state": (r.normal(size=(1, config.proprio_dim)) * 0.1).astype(np.float32),
        "instruction": ["pick up the red cup and put it on the plate"],
    }
    if config.num_images > 1:
        batch["wrist_image"] = r.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
    return adapter, batch, config.to_dict()


def _gr00t(size: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from dataclasses import replace

    import torch

    from daptq.models.gr00t import Gr00tAdapter, embodiment_from_metadata
    from daptq.models.gr00t.config import Gr00tConfig
    from daptq.models.gr00t.model import Gr00tN1
    from daptq.models.gr00t.testing import tiny_metadata

    tiny = Gr00tConfig.tiny()
    if size == "toy":
        config = tiny
    else:
        s = SIZES[size]["gr00t"]
        base = Gr00tConfig()
        config = replace(
            base,
            vision_layers=s["vision_layers"],
            select_layer=s["select_layer"],
            vocab_size=1024,
            img_context_token_id=tiny.img_context_token_id,
            img_start_token_id=tiny.img_start_token_id,
            img_end_token_id=tiny.img_end_token_id,
            pad_token_id=tiny.pad_token_id,
            dit={**base.dit, "num_layers": s["dit_layers"]},
            vl_self_attention={**base.vl_self_attention, "num_layers": s["vl_layers"]},
        )
    torch.manual_seed(0)
    model = Gr00tN1(config).eval()
    adapter = Gr00tAdapter(model, embodiment_from_metadata(tiny_metadata(), None), _tokenizer())
    r = np.random.default_rng(0)
    batch = {
        "image": r.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8),
        "state": (r.normal(size=(1, 7)) * 0.3).astype(np.float32),
        "instruction": ["pick up the red cup"],
    }
    return adapter, batch, config.to_dict()


def _tokenizer():
    from daptq.models.cogact.testing import tiny_tokenizer

    return tiny_tokenizer()  # ids only index the embedding: the cost does not depend on the tokenizer


def build_family(family: str, size: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(adapter with random weights, its preprocessed model-input batch, the config as a dict)."""
    if family in ("pi0", "smolvla"):
        adapter, raw, config = _lerobot(family, size)
    elif family == "openvla-oft":
        adapter, raw, config = _oft(size)
    elif family == "gr00t":
        adapter, raw, config = _gr00t(size)
    else:
        raise ValueError(f"unknown family {family!r}; known: {list(FAMILIES)}")
    return adapter, next(adapter.calibration_batches(iter([raw]))), config


def rtn_w4a8(adapter: Any, weight_only: bool = False) -> int:
    """RTN W4A8 (or weight-only W4) over the adapter's default scope, in place; the number of layers."""
    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.quant import QuantSpec, w4a8

    spec = w4a8(GROUP_SIZE)
    if weight_only:
        spec = QuantSpec(spec.weight)
    return len(quantize_policy(adapter, RTNConfig(spec=spec)).modules)


def parameter_count(model: Any) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---- exports (a child process before the workers) ---------------------------------------------------------
def prepare(family: str, size: str, cache: Path) -> None:
    """Write the ORT variants of a family and its batch (npz) into ``cache``."""
    from daptq.deploy.flow_export import export_flow_policy

    adapter, batch, _ = build_family(family, size)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache / f"{family}-batch.npz", **{k: v.numpy() for k, v in batch.items()})
    export_flow_policy(adapter.model, cache / f"{family}-ort-fp32", overwrite=True)
    rtn_w4a8(adapter)
    export_flow_policy(adapter.model, cache / f"{family}-ort-w4a8", overwrite=True)
    export_flow_policy(adapter.model, cache / f"{family}-ort-w4a8-unrolled", loop="unrolled", overwrite=True)


# ---- a worker: one row ------------------------------------------------------------------------------
def build_row(family: str, variant: str, size: str, cache: Path):
    """(one call, info) for a row."""
    import torch

    torch.set_num_threads(1)
    info: dict[str, Any] = {"family": family, "variant": variant}
    if variant.startswith("ort-"):
        from daptq.deploy.flow_export import FlowOnnxSampler

        directory = cache / f"{family}-{variant}"
        runner = FlowOnnxSampler(directory, threads=1)
        with np.load(cache / f"{family}-batch.npz", allow_pickle=False) as z:
            batch = {k: torch.from_numpy(z[k]) for k in z.files}
        plans = [p for g in runner.manifest["layers"].values() for p in g]
        nbits = [p for p in plans if p["kernel"] == "matmul_nbits"]
        info.update(
            graph_bytes=sum(f.stat().st_size for f in directory.glob("*.onnx")),
            matmul_nbits_layers=len(nbits),
            u8s8_layers=sum(p["kernel"] == "matmul_integer_u8s8" for p in plans),  # per-channel W4A8
            accuracy_levels=sorted({p["accuracy_level"] for p in nbits}),
        )

        def call() -> None:
            runner.predict_chunk(batch, torch.Generator().manual_seed(0))

        return call, info
    adapter, batch, config = build_family(family, size)
    info["parameters"] = parameter_count(adapter.model)
    if variant == "torch-w4a8-fake":
        info["quantized_layers"] = rtn_w4a8(adapter)
    elif variant == "torch-w4-packed":
        from daptq.quant import to_deployable_

        info["quantized_layers"] = rtn_w4a8(adapter, weight_only=True)
        report = to_deployable_(adapter.model, compute_dtype="bfloat16")
        info["packed_layers"] = len(report.converted)
        for m in adapter.model.modules():  # the float weight is no longer needed once packed
            if hasattr(m, "qweight") and hasattr(m, "packed_weight"):
                m.qweight = None
    if variant == "torch-fp32":
        info["config"] = config

    def call() -> None:
        with torch.no_grad():
            adapter.predict_chunk(batch, torch.Generator().manual_seed(0))

    return call, info


def worker_main(args: argparse.Namespace) -> int:
    from daptq.deploy.bench import peak_rss_bytes

    try:
        t0 = time.perf_counter()
        call, info = build_row(args.family, args.variant, args.size, Path(args.cache))
        info["build_s"] = time.perf_counter() - t0
        for _ in range(args.warmup):
            call()
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(PROTOCOL + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(PROTOCOL + json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "exit":
            break
        times = []
        for _ in range(int(cmd)):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        print(PROTOCOL + json.dumps({"times": times}), flush=True)
    print(PROTOCOL + json.dumps({"peak_rss_bytes": peak_rss_bytes()}), flush=True)
    return 0


# ---- the parent --------------------------------------------------------------------------------------
class Row:
    def __init__(self, family: str, variant: str, size: str, cache: Path, warmup: int) -> None:
        cmd = [sys.executable, __file__, "--worker", "--family", family, "--variant", variant]
        cmd += ["--size", size, "--cache", str(cache), "--warmup", str(warmup)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.family, self.variant = family, variant
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )
        self.times: list[float] = []
        self.info: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                msg = json.loads(line[len(PROTOCOL) :])
                if "error" in msg:
                    raise RuntimeError(f"{self.family} {self.variant}: {msg['error']}\n{self._tail()}")
                return msg
        raise RuntimeError(
            f"{self.family} {self.variant}: worker exited ({self.proc.wait()})\n{self._tail()}"
        )

    def _tail(self) -> str:
        self.stderr.seek(0)
        return "\n".join(self.stderr.read().decode("utf-8", "replace").splitlines()[-15:])

    def ask(self, msg: str) -> dict[str, Any]:
        self.proc.stdin.write(msg + "\n")
        self.proc.stdin.flush()
        return self.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def run_family(family: str, size: str, cache: Path, rounds: int, warmup: int) -> dict[str, Any]:
    """All rows of one family, round-robin; ratios to its torch-fp32 row."""
    variants = ROWS[family]
    t0 = time.perf_counter()
    if any(v.startswith("ort-") for v in variants):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--prepare",
                "--family",
                family,
                "--size",
                size,
                "--cache",
                str(cache),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
            check=False,
        )
        if proc.returncode:
            raise RuntimeError(f"exporting {family} failed:\n{proc.stderr[-3000:]}")
    export_s = time.perf_counter() - t0
    rows: list[Row] = []
    try:
        for v in variants:  # built one at a time so their building does not overlap
            rows.append(Row(family, v, size, cache, warmup))
            rows[-1].info = rows[-1].read()["ready"]
        for _ in range(rounds):
            for r in rows:
                r.times += r.ask("1")["times"]
        for r in rows:
            r.info["peak_rss_bytes"] = r.ask("exit")["peak_rss_bytes"]
            r.proc.wait()
    finally:
        for r in rows:
            r.kill()
    out = []
    for r in rows:
        t = np.asarray(r.times) * 1e3
        out.append({**r.info, "calls": len(t), "call_p50_ms": float(np.median(t)), "call_ms": t.tolist()})
    base = out[0]
    for row in out:
        row["call_p50_vs_fp32"] = row["call_p50_ms"] / base["call_p50_ms"]
        row["call_paired_vs_fp32"] = paired_ratio(row, base)
        row["peak_rss_vs_fp32"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
    return {"family": family, "export_s": export_s, "wall_s": time.perf_counter() - t0, "rows": out}


def paired_ratio(row: dict[str, Any], base: dict[str, Any]) -> float:
    """Median over rounds of this row's call time over the fp32 row's in the same round: the rows of a round
    run back to back, so a neighbour's load that comes and goes slows both sides of each ratio alike (on a
    loaded machine one round's times can differ 5x from the next's, which the p50 ratio does not cancel)."""
    return float(np.median(np.asarray(row["call_ms"]) / np.asarray(base["call_ms"])))


def to_markdown(report: dict[str, Any]) -> str:
    mib = 1 << 20
    lines = [
        f"Size: {report['size']}; 1 thread; {report['rounds']} rounds x 1 call per row after "
        f"{report['warmup']} warm-up call(s), round-robin within a family, each row in its own process; "
        "ratios to the family's torch-fp32 row (absolute times: a loaded shared machine). 'paired' is the "
        "median over rounds of the per-round ratio (the result); 'p50' the ratio of medians.",
        "",
        "| family | variant | params (M) | call min / p50 ms | call vs fp32, paired | p50 ratio "
        "| peak RSS MiB | RSS vs fp32 | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for fam in report["families"]:
        params = fam["rows"][0].get("parameters", 0) / 1e6
        for r in fam["rows"]:
            note = ""
            if "packed_layers" in r:
                note = f"{r['packed_layers']}/{r['quantized_layers']} layers packed int4"
            elif "quantized_layers" in r:
                note = f"{r['quantized_layers']} fake-quant layers"
            elif "matmul_nbits_layers" in r:
                kernels = [f"{r['matmul_nbits_layers']} MatMulNBits"] if r["matmul_nbits_layers"] else []
                kernels += [f"{r['u8s8_layers']} u8s8 MatMulInteger"] if r.get("u8s8_layers") else []
                note = (
                    f"{' + '.join(kernels)} layers, graphs {r['graph_bytes'] / mib:.0f} MiB"
                    if kernels
                    else f"fp32 graphs {r['graph_bytes'] / mib:.0f} MiB"
                )
            lines.append(
                f"| {fam['family']} | {r['variant']} | {params:.1f} | {min(r['call_ms']):.0f} / "
                f"{r['call_p50_ms']:.0f} | {paired_ratio(r, fam['rows'][0]):.2f}x | "
                f"{r['call_p50_vs_fp32']:.2f}x | {r['peak_rss_bytes'] / mib:.0f} | "
                f"{r['peak_rss_vs_fp32']:.2f}x | {note} |"
            )
    if report["size"] in SIZES:
        lines += ["", "Sizes:"] + [f"- {f}: {SIZES[report['size']][f]['note']}" for f in report["only"]]
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    from daptq.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out.with_suffix(".md"), to_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="realistic", choices=["realistic", "toy"])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--cache", default="runs/family_speed_cache", help="where the ONNX exports are written")
    p.add_argument("--out", default="results/family_speed", help="writes OUT.json and OUT.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.prepare:
        prepare(args.family, args.size, Path(args.cache))
        return 0
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    import torch

    from daptq.deploy.runtime import onnxruntime_module

    report: dict[str, Any] = {
        "size": args.size,
        "only": args.families,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": 1,
        "group_size": GROUP_SIZE,
        "command": " ".join(["benchmarks/family_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime_module().__version__},
        "families": [],
    }
    t0 = time.perf_counter()
    for family in args.families:
        fam = run_family(family, args.size, Path(args.cache), args.rounds, args.warmup)
        report["families"].append(fam)
        report["wall_s"] = time.perf_counter() - t0
        write(report, Path(args.out))  # after each family: a partial report survives an interrupted run
        print(f"{family}: {fam['wall_s']:.0f} s", flush=True)
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
