"""The adapter contract: check_adapter names what is wrong, ChunkedPolicy owns the queue and the noise, and
DA-PTQ reads blocks and interface fold exactness from the adapter (refusing or restricting CSRC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from daptq.data.calibration import CalibrationSet
from daptq.methods import as_adapter, quantize_policy
from daptq.methods.daptq import DAPTQConfig
from daptq.methods.daptq.compensation import Stats, compensate
from daptq.methods.daptq.method import action_head_blocks
from daptq.models.adapter import (
    ActionSpace,
    AttentionLayout,
    InterfaceModule,
    QuantizableModule,
    VLAAdapter,
    check_adapter,
)
from daptq.models.policy import ChunkedPolicy
from daptq.models.reference import module_place
from daptq.models.toy import ToyPolicy
from daptq.quant import QuantSpec, WeightSpec
from daptq.quant.smoothing import SmoothingGroup

SPACE = ActionSpace(("x", "y"), ("translation", "translation"))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(3, 16)
        self.k_proj = nn.Linear(16, 16)  # the interface: a K projection a rotary embedding follows
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.tanh(self.k_proj(torch.tanh(self.enc(x))))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(h)


class Adapter(VLAAdapter):
    objective_kind = "regression_l2"

    def __init__(self, fold="exact", rope_head_dim=None, stacks=("head",)) -> None:
        self.model = Net()
        self.action_space = SPACE
        self.fold, self.rope_head_dim, self.stacks = fold, rope_head_dim, stacks

    def quantizable_modules(self):
        out = [
            QuantizableModule("enc", self.model.enc, "backbone"),
            QuantizableModule("k_proj", self.model.k_proj, "interface"),
            QuantizableModule("out", self.model.out, "action_head"),
        ]
        for i, block in enumerate(self.model.blocks):
            stack = self.stacks[i % len(self.stacks)]
            out.append(QuantizableModule(f"blocks.{i}", block, "action_head", {"kind": "linear"}, i, stack))
        return out

    def interface_modules(self):
        return [
            InterfaceModule(
                "k_proj", self.model.k_proj, "vector", self.fold, "RoPE follows", self.rope_head_dim
            )
        ]

    def sample(self, batch, generator=None):
        noise = torch.randn(batch["state"].shape[0], 1, 2, generator=generator) * 0.01
        return self.model(batch["state"])[:, None] + noise

    def objective(self, batch, dim_weights=None, generator=None):
        err = (self.sample(batch, generator) - batch["actions"]) ** 2
        return (err if dim_weights is None else err * dim_weights).mean()

    def calibration_batches(self, batches):
        for raw in batches:
            yield {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in raw.items()}


def calibration():
    rng = np.random.default_rng(0)
    batches = [
        {
            "state": rng.normal(size=(16, 3)).astype(np.float32),
            "actions": rng.normal(size=(16, 1, 2)).astype(np.float32),
        }
        for _ in range(2)
    ]
    return CalibrationSet(batches, {"split": "test", "action_space": {"names": ["x", "y"]}})


# ---- check_adapter ----------------------------------------------------------------------------------------
def test_check_adapter_accepts_the_bundled_adapters():
    assert check_adapter(ToyPolicy().adapter)
    assert as_adapter(ToyPolicy()) is not None  # a policy: its .adapter, checked


def test_check_adapter_lists_every_problem():
    class Broken(Adapter):
        objective_kind = "mse"
        capabilities = frozenset({"attention", "teleport"})

        def quantizable_modules(self):
            return [
                QuantizableModule("enc", self.model.out, "backbone"),  # not model.enc
                QuantizableModule("nope", self.model.out, "backbone"),
                QuantizableModule("out", self.model.out, "head"),
                QuantizableModule(
                    "blocks.0", self.model.blocks[0], "action_head", block=0
                ),  # block without stack
            ]

        def interface_modules(self):
            return [InterfaceModule("blocks", self.model.blocks, "vector")]

        def attention_layouts(self):
            return [
                AttentionLayout("blocks.1", 4, "action_head", out="blocks.2", q="enc", k="blocks.0", v="out")
            ]

        def smoothing_groups(self):
            return [SmoothingGroup("missing", ("out",), "linear")]

    with pytest.raises(ValueError) as e:
        check_adapter(Broken())
    msg = str(e.value)
    for part in (
        "objective_kind must be one of",
        "capabilities must be a frozenset",
        "'enc': the declared module is not model.enc",
        "'nope' is not a module",
        "role 'head'",
        "block 0 needs a stack",
        "interface module 'blocks' must be an nn.Linear",
        "'attention' is not in capabilities",
        "smoothing group source 'missing'",
    ):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match="is not a VLAAdapter"):
        check_adapter(object())
    with pytest.raises(ValueError, match="neither a VLAAdapter nor a policy"):
        as_adapter(object())


def test_attention_layout_needs_exactly_one_layout_and_consistent_heads():
    with pytest.raises(ValueError, match="either qkv"):
        AttentionLayout("a", 2, "backbone", out="o", qkv="qkv", q="q", k="k", v="v")
    with pytest.raises(ValueError, match="either qkv"):
        AttentionLayout("a", 2, "backbone", out="o", q="q", k="k")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttentionLayout("a", 4, "backbone", out="o", q="q", k="k", v="v", kv_heads=3)


def test_tied_pairs_needs_a_rope_head_dim():
    with pytest.raises(ValueError, match="rope_head_dim"):
        check_adapter(Adapter(fold="tied_pairs"))
    pairs = check_adapter(Adapter(fold="tied_pairs", rope_head_dim=8)).interface_modules()[0].rope_pairs()
    assert pairs[:4].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]] and pairs[4].tolist() == [8, 12]


# ---- ChunkedPolicy ----------------------------------------------------------------------------------------
class CountingPolicy(ChunkedPolicy):
    def __init__(self) -> None:
        super().__init__(SPACE, n_action_steps=2, seed=0)
        self.calls = 0

    def chunk_for_observation(self, observation, generator):
        self.calls += 1
        return torch.randn(3, 2, generator=generator).numpy()

    def info(self):
        raise NotImplementedError


def test_chunked_policy_queue_and_seeded_noise():
    p = CountingPolicy()
    p.reset(seed=5)
    a = [p.select_action({}) for _ in range(5)]
    assert p.calls == 3 and all(x.dtype == np.float32 and x.shape == (2,) for x in a)  # re-plans at 0, 2, 4
    p.reset(seed=5)
    assert np.array_equal(np.stack([p.select_action({}) for _ in range(5)]), np.stack(a))
    p.reset(seed=6)
    assert not np.array_equal(p.select_action({}), a[0])
    with pytest.raises(NotImplementedError, match="has no adapter"):
        p.predict_chunk({})


# ---- DA-PTQ reads blocks and fold exactness from the adapter ----------------------------------------------
def test_float_blocks_are_the_last_blocks_of_the_declared_stack():
    assert action_head_blocks(Adapter()) == {"blocks.0": 0, "blocks.1": 1, "blocks.2": 2}
    with pytest.raises(ValueError, match=r"action-head blocks in \['a', 'b'\]; set action_head_stack"):
        action_head_blocks(Adapter(stacks=("a", "b")))
    assert action_head_blocks(Adapter(stacks=("a", "b")), "b") == {"blocks.1": 1}
    adapter = Adapter()
    record = quantize_policy(
        adapter,
        DAPTQConfig(spec=QuantSpec(WeightSpec(4)), float_dit_blocks=1, sensitivity_batches=1),
        calibration(),
    )
    assert record.decisions["float_by_block"] == ["blocks.2"]
    assert module_place("head.blocks.1.adaLN") == ("dit", 1, "modulation")
    assert module_place("blocks.0.mlp.fc") == ("backbone", 0, "mlp")
    assert module_place("vision_proj") == (None, None, None)


def test_csrc_refuses_an_inexact_interface():
    with pytest.raises(ValueError, match=r"fold='none'; RoPE follows\). Set use_csrc=False"):
        quantize_policy(Adapter(fold="none"), DAPTQConfig(sensitivity_batches=1), calibration())
    adapter = Adapter(fold="none")
    quantize_policy(adapter, DAPTQConfig(use_csrc=False, sensitivity_batches=1), calibration())  # allowed


def test_csrc_ties_gains_across_rope_pairs():
    adapter = Adapter(fold="tied_pairs", rope_head_dim=8)
    record = quantize_policy(
        adapter, DAPTQConfig(spec=QuantSpec(WeightSpec(2)), sensitivity_batches=1), calibration()
    )
    assert "tied across each RoPE pair" in record.decisions["csrc_restricted"]["k_proj"]
    assert record.decisions["compensation"]["k_proj"]["rank"] == 0  # no cross-channel map
    # the gains themselves: one value per pair
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=gen).double(), torch.randn(200, 8, generator=gen).double() * 0.5
    fp, q = (Stats(x.mean(0), torch.cov(x.T, correction=0)) for x in (a, b))
    pairs = InterfaceModule("k", nn.Linear(2, 8), "vector", "tied_pairs", rope_head_dim=4).rope_pairs()
    comp = compensate(fp, q, pairs=pairs)
    assert torch.equal(comp.gain[pairs[:, 0]], comp.gain[pairs[:, 1]]) and comp.U.shape[1] == 0
    assert not torch.allclose(comp.gain, torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(comp.apply(b.float()).double().mean(0), fp.mean, rtol=0, atol=1e-5)
