"""QuantVLA on an attention with separate q/k/v/o Linears and grouped-query k/v (not the reference's fused
qkv): statistics, exact folds and the whole method through ``quantize_policy``, all from the adapter's
declared ``AttentionLayout``."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from daptq.data.calibration import CalibrationSet
from daptq.methods import quantize_policy
from daptq.methods.quantvla import (
    QuantVLAConfig,
    collect_stats,
    fold_output_gain_,
    fold_temperature_,
    layout_kinds,
    match_attention_,
)
from daptq.models.adapter import (
    ActionSpace,
    AttentionLayout,
    InterfaceModule,
    QuantizableModule,
    VLAAdapter,
    check_adapter,
)
from daptq.quant import ActivationSpec, QuantLinear, QuantSpec, WeightSpec

D, H, KV, T = 32, 4, 2, 6
HD = D // H


class SeparateAttention(nn.Module):
    """Grouped-query self-attention with separate projections (q: H heads, k/v: KV heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, KV * HD)
        self.v_proj = nn.Linear(D, KV * HD)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x, alpha=None):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, H, HD).transpose(1, 2)
        k, v = (
            p(x).reshape(B, L, KV, HD).transpose(1, 2).repeat_interleave(H // KV, 1)
            for p in (self.k_proj, self.v_proj)
        )
        logits = q @ k.transpose(-1, -2) / math.sqrt(HD)
        if alpha is not None:  # explicit per-head temperature (what a fold must reproduce)
            logits = logits * alpha[None, :, None, None]
        y = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(B, L, D)
        return self.o_proj(y)


class SepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(4, D)  # backbone
        self.z_proj = nn.Linear(D, D)  # interface
        self.attn = SeparateAttention()  # action head
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.out = nn.Linear(D, 2)
        with torch.no_grad():
            self.attn.q_proj.weight.mul_(3.0)  # spread the logits so quantization moves them

    def forward(self, state):
        h = self.z_proj(torch.tanh(self.up(state)))
        h = h + self.attn(h)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return self.out(h)


SPACE = ActionSpace(("j0", "j1"), ("joint", "joint"), control="joint")
LAYOUT = AttentionLayout(
    "attn", H, "action_head", out="attn.o_proj", q="attn.q_proj", k="attn.k_proj", v="attn.v_proj",
    kv_heads=KV, block=0, stack="head",
)  # fmt: skip


class SepAdapter(VLAAdapter):
    objective_kind = "regression_l2"
    capabilities = frozenset({"attention"})

    def __init__(self) -> None:
        self.model = SepNet()
        self.action_space = SPACE

    def quantizable_modules(self):
        parts = {n: "attention" for n in LAYOUT.linears()} | {"fc1": "mlp", "fc2": "mlp"}
        out = [
            QuantizableModule("up", self.model.up, "backbone"),
            QuantizableModule("z_proj", self.model.z_proj, "interface"),
        ]
        for name in (*LAYOUT.linears(), "fc1", "fc2"):
            meta = {"kind": "linear", "part": parts[name]}
            out.append(
                QuantizableModule(name, self.model.get_submodule(name), "action_head", meta, 0, "head")
            )
        return [*out, QuantizableModule("out", self.model.out, "action_head")]

    def attention_layouts(self):
        return [LAYOUT]

    def interface_modules(self):
        return [InterfaceModule("z_proj", self.model.z_proj, "vector")]

    def sample(self, batch, generator=None):
        noise = torch.randn(batch["state"].shape[0], T, 2, generator=generator) * 0.01
        return torch.tanh(self.model(batch["state"]) + noise)

    def objective(self, batch, dim_weights=None, generator=None):
        err = (self.sample(batch, generator) - batch["actions"]) ** 2
        return (err if dim_weights is None else err * dim_weights).mean()

    def calibration_batches(self, batches):
        for raw in batches:
            yield {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in raw.items()}


def calibration(n_batches=2, n=4):
    rng = np.random.default_rng(0)
    batches = [
        {
            "state": rng.normal(size=(n, T, 4)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, T, 2)).astype(np.float32),
        }
        for _ in range(n_batches)
    ]
    return CalibrationSet(batches, {"split": "test", "action_space": {"names": list(SPACE.names)}})


XS = [torch.randn(3, T, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@torch.no_grad()
def reference_logit_std(model: SepNet) -> torch.Tensor:
    """Per-head std of q k^T / sqrt(d) (k heads shared by H/KV query heads), written out independently."""
    attn, vals = model.attn, []
    for x in XS:
        x = x.double()
        q = (
            (x @ attn.q_proj.weight.double().T + attn.q_proj.bias.double())
            .reshape(3, T, H, HD)
            .transpose(1, 2)
        )
        k = (
            (x @ attn.k_proj.weight.double().T + attn.k_proj.bias.double())
            .reshape(3, T, KV, HD)
            .transpose(1, 2)
        )
        k = torch.cat([k[:, i // (H // KV), None] for i in range(H)], dim=1)
        vals.append((q @ k.transpose(-1, -2) / math.sqrt(HD)).transpose(0, 1).reshape(H, -1))
    return torch.cat(vals, dim=1).std(dim=1, correction=0)


def run_attn(model):
    for x in XS:
        model.attn(x)


def test_adapter_is_valid_and_layout_kinds_come_from_declarations():
    adapter = check_adapter(SepAdapter())
    kinds = layout_kinds(adapter)
    assert {n for n, k in kinds.items() if k == "attention"} == set(LAYOUT.linears())
    assert {n for n, k in kinds.items() if k == "mlp"} == {"fc1", "fc2"}
    assert kinds["out"] == kinds["up"] == "other"


def test_grouped_query_logit_std_matches_reference():
    model = SepNet()
    stats = collect_stats(model, [LAYOUT], lambda: run_attn(model))
    assert torch.allclose(stats["attn"].logit_std(), reference_logit_std(model).detach(), rtol=1e-5)


def test_separate_folds_are_exact():
    model = SepNet()
    folded = copy.deepcopy(model)
    alpha, beta = torch.tensor([1.3, 0.8, 1.0, 1.2]), 0.9
    fold_temperature_(folded, LAYOUT, alpha)
    fold_output_gain_(folded, LAYOUT, beta)
    assert torch.equal(
        folded.attn.k_proj.weight, model.attn.k_proj.weight
    )  # k is shared across heads: untouched
    with torch.no_grad():
        for x in XS:
            torch.testing.assert_close(folded.attn(x), beta * model.attn(x, alpha), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(model.attn(x), beta * model.attn(x, alpha), atol=1e-3)


def test_atm_on_separate_q_restores_the_logit_std():
    fp = SepNet()
    q = copy.deepcopy(fp)
    with torch.no_grad():
        q.attn.q_proj.weight.mul_(0.85)  # a stand-in for upstream quantization shrinking the logits
        q.attn.q_proj.bias.mul_(0.85)
    decisions = match_attention_(fp, q, [LAYOUT], lambda m: run_attn(m), ohb=False)
    assert decisions["alpha"]["attn"] == pytest.approx([1 / 0.85] * H, rel=1e-6)
    assert torch.allclose(reference_logit_std(q), reference_logit_std(fp), rtol=1e-5)


def test_quantvla_runs_on_the_separate_layout():
    adapter = SepAdapter()
    spec = QuantSpec(WeightSpec(4), ActivationSpec(4))
    record = quantize_policy(adapter, QuantVLAConfig(spec=spec), calibration())
    m = adapter.model
    assert all(type(m.get_submodule(n)) is nn.Linear for n in LAYOUT.linears())  # head attention stays float
    assert isinstance(m.fc1, QuantLinear) and isinstance(m.fc2, QuantLinear) and isinstance(m.up, QuantLinear)
    assert type(m.out) is nn.Linear  # neither attention nor MLP: float under QuantVLA's layout
    assert record.decisions["attention_modules"] == ["attn"] and set(record.decisions["beta"]) == {"attn"}
    assert len(record.decisions["alpha"]["attn"]) == H


def test_quantvla_records_that_atm_ohb_do_nothing_without_head_attention():
    """Issue #26: where the published recipe does not apply (no attention with the head role, e.g.
    OpenVLA-OFT's MLP head), QuantVLA says what it does instead in the record, rather than refusing."""
    adapter = SepAdapter()
    record = quantize_policy(adapter, QuantVLAConfig(head_role="backbone"), calibration())
    note = record.decisions["attention_note"]
    assert "declares no 'backbone' attention" in note and "ATM/OHB do nothing" in note
