"""Shared pieces of the pi0 / pi0.5 / SmolVLA family tests (tiny models, dataset-style batches, the method
matrix check)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from torch import nn

from daptq.data.calibration import CalibrationSet
from daptq.methods import quantize_policy
from daptq.methods.scope import DEFAULT_ROLES
from daptq.models.lerobot_vla import LeRobotVLAAdapter, Statistics
from daptq.models.lerobot_vla.testing import tiny_model, tiny_statistics

# SQNR of the sampled chunk (same noise) at W8A8 against FP, dB; every method must reach it. Measured on the
# tiny models (pi0 / pi0.5 / SmolVLA): RTN 44 / 46 / 43, GPTQ 45 / 48 / 45, SmoothQuant 44 / 46 / 43,
# AWQ 44 / 46 / 43, QuantVLA 70 / 99 / 71, QVLA 46 / 50 / 46, DA-PTQ paper 55 / 73 / 71, budget 61 / 74 / 66.
MIN_SQNR_DB = 35.0


@functools.cache
def tokenizer():
    from daptq.models.cogact.testing import tiny_tokenizer

    return tiny_tokenizer()


def statistics(config) -> Statistics:
    raw = tiny_statistics(config)
    return Statistics(
        {f: {k: torch.tensor(v) for k, v in s.items()} for f, s in raw.items()},
        dict(config.normalization_mapping),
    )


def adapter_of(model) -> LeRobotVLAAdapter:
    return LeRobotVLAAdapter(model, tokenizer(), statistics(model.config))


def raw_batch(seed: int, b: int = 4, k: int = 4) -> dict:
    """A dataset-style batch: uint8 frames, robot-unit states and action chunks, instructions."""
    r = np.random.default_rng(seed)
    return {
        "image": r.integers(0, 255, (b, 48, 40, 3), dtype=np.uint8),
        "state": (r.normal(size=(b, 8)) * 0.5).astype(np.float32),
        "instruction": [("pick up the red cup", "open the drawer")[i % 2] for i in range(b)],
        "actions": ((r.normal(size=(b, k, 7)) * 0.3).cumsum(1) * 0.3).astype(np.float32),
    }


def calibration() -> CalibrationSet:
    return CalibrationSet([raw_batch(100 + i) for i in range(3)], {"source": "test"})


def chunks(adapter) -> torch.Tensor:
    batch = next(adapter.calibration_batches(iter([raw_batch(99, 6)])))
    return adapter.predict_chunk(batch, generator=torch.Generator().manual_seed(7))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


@functools.cache
def base_model(kind: str):
    return tiny_model(kind)


def check_method(kind: str, name: str, config) -> dict:
    """Run one method on a fresh copy of the tiny model; check it ran, respected its scope (each declared
    in-scope module quantized or kept float with a reason, per role) and kept the chunk close to FP."""
    adapter = adapter_of(copy.deepcopy(base_model(kind)))
    declared = {m.name: m.role for m in adapter.quantizable_modules() if m.role in DEFAULT_ROLES}
    fp = chunks(adapter)
    record = quantize_policy(adapter, config, calibration())
    q = chunks(adapter)
    assert record.modules, f"{name}: quantized nothing"
    kept = record.decisions.get("kept_float", {})
    overlap = set(record.modules) & set(kept)
    assert not overlap, f"{name}: modules both quantized and kept float: {sorted(overlap)[:5]}"
    for role in DEFAULT_ROLES:
        want = sorted(n for n, r in declared.items() if r == role)
        got = sorted(n for n in [*record.modules, *kept] if declared.get(n) == role)
        assert got == want, f"{name}: role {role}: {len(got)} quantized or kept float, {len(want)} declared"
    for n, m in record.modules.items():
        assert m.role == declared[n], f"{name}: {n} recorded as {m.role}, declared {declared[n]}"
        module = adapter.model.get_submodule(n)
        assert type(module) not in (nn.Linear, nn.Conv2d), f"{name}: {n} is in the record but still float"
    assert not torch.equal(q, fp), f"{name}: the sampled chunk did not change"
    assert sqnr_db(fp, q) >= MIN_SQNR_DB, f"{name}: SQNR {sqnr_db(fp, q):.1f} dB"
    return {"adapter": adapter, "record": record}


def prefix_matches_transformers_layers(kind: str) -> list[float]:
    """Max |difference| per layer between the rebuilt prefix pass's cached keys and the keys of the same
    layers run as ``transformers`` decoder layers (their own attention) under the same block mask, float64."""
    if kind == "smolvla":
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    else:
        from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb
    from daptq.models.lerobot_vla.modeling import block_masks

    torch.manual_seed(1)
    m = copy.deepcopy(base_model(kind)).double()
    b, n = 2, 7
    embs = torch.randn(b, n, m.config.text.hidden, dtype=torch.float64)
    pad = torch.ones(b, n, dtype=torch.bool)
    ar = torch.zeros_like(pad)
    ar[:, 5] = True  # two blocks: the first 5 tokens bidirectional, the last 2 see everything
    cache = m.prefix_cache(embs, pad, ar)
    additive = torch.zeros(b, 1, n, n, dtype=torch.float64).masked_fill(~block_masks(pad, ar)[:, None], -1e30)
    pos = torch.cumsum(pad.long(), 1) - 1
    lm = m.vlm
    lm.config._attn_implementation = "eager"
    h, pe, errs = embs, lm.rotary_emb(embs, pos), []
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        k = a.k_proj(layer.input_layernorm(h)).view(b, n, -1, a.head_dim).transpose(1, 2)
        k = apply_rotary_pos_emb(k, k, *pe)[1].transpose(1, 2)
        errs.append(float((k - cache[i][0]).abs().max().detach()))
        out = layer(h, attention_mask=additive, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return errs
