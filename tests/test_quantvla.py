import copy
import math

import pytest
import torch
from torch import nn

from daptq.methods.quantvla import (
    band_and_clip,
    capture_attention_stats,
    collect_stats,
    fold_output_gain_,
    fold_temperature_,
    match_attention_,
)
from daptq.models.adapter import AttentionLayout
from daptq.models.transformer import SelfAttention
from daptq.quant import QuantLinear, QuantSpec, WeightSpec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The reference-VLA passes are small; several threads on a shared machine only slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class AttnNet(nn.Module):
    """A linear feeding a float attention: quantizing ``up`` changes the attention's logits and output."""

    def __init__(self, d_in=16, d=32, n_head=4):
        super().__init__()
        self.up = nn.Linear(d_in, d)
        self.attn = SelfAttention(d, n_head)

    def forward(self, x, mask=None):
        return self.attn(self.up(x), mask)


LAYOUT = AttentionLayout("attn", 4, "backbone", out="attn.proj", qkv="attn.qkv")


def make_pair(shrink, seed=0):
    torch.manual_seed(seed)
    fp = AttnNet()
    with torch.no_grad():  # spread the heads so each has its own logit scale
        fp.attn.qkv.weight.mul_(2.0)
    q = copy.deepcopy(fp)
    with torch.no_grad():
        q.up.weight.mul_(shrink)
        q.up.bias.mul_(shrink)
    return fp, q


BATCHES = [torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def run(model):
    for x in BATCHES:
        model(x)


def reference_logit_std(model):
    """Per-head std of q k^T / sqrt(d) over all batches, float64, written out independently of the hooks."""
    vals = []
    for x in BATCHES:
        h = model.up(x).double()
        qkv = h @ model.attn.qkv.weight.double().T + model.attn.qkv.bias.double()
        C = h.shape[-1]
        H = model.attn.n_head
        q = qkv[..., :C].reshape(*h.shape[:2], H, C // H).transpose(1, 2)
        k = qkv[..., C : 2 * C].reshape(*h.shape[:2], H, C // H).transpose(1, 2)
        vals.append((q @ k.transpose(-1, -2) / math.sqrt(C // H)).transpose(0, 1).reshape(H, -1))
    return torch.cat(vals, dim=1).std(dim=1, correction=0)


def out_rms(model):
    with torch.no_grad():
        return math.sqrt(sum(float(model(x).double().square().sum()) for x in BATCHES) / (3 * 4 * 10 * 32))


def test_band_and_clip():
    r = torch.tensor([math.exp(0.02), math.exp(-0.029), math.exp(0.1), math.exp(0.6), math.exp(-0.6)])
    out = band_and_clip(r).log()
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.1, 0.4, -0.4], dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="finite and > 0"):
        band_and_clip(torch.tensor([0.0]))


def test_captured_logit_std_matches_reference():
    fp, _ = make_pair(1.0)
    stats = collect_stats(fp, [LAYOUT], lambda: run(fp))
    assert torch.allclose(stats["attn"].logit_std(), reference_logit_std(fp), rtol=1e-9)


def test_masked_keys_are_left_out():
    fp, _ = make_pair(1.0)
    x = BATCHES[0]
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 6:] = False
    with capture_attention_stats(fp, [LAYOUT]) as st, torch.no_grad():
        fp(x, mask)
    assert torch.equal(st["attn"].logit_n, torch.full((4,), 4.0 * 10 * 6, dtype=torch.float64))


def test_atm_restores_logit_std_and_ohb_restores_output_rms():
    fp, q = make_pair(0.85)  # logits shrink by 0.85^2 (log 0.33, inside the clip)
    std_fp = reference_logit_std(fp)
    assert (reference_logit_std(q) / std_fp).max() < 0.75  # the quantization did shrink them
    decisions = match_attention_(fp, q, [LAYOUT], run, ohb=False)
    assert torch.allclose(reference_logit_std(q), std_fp, rtol=1e-5)
    assert len(decisions["alpha"]["attn"]) == 4 and not decisions["beta"]
    assert abs(out_rms(q) / out_rms(fp) - 1) > 0.05  # ATM alone does not fix the output energy
    match_attention_(fp, q, [LAYOUT], run, atm=False)
    assert out_rms(q) == pytest.approx(out_rms(fp), rel=1e-5)
    assert torch.allclose(reference_logit_std(q), std_fp, rtol=1e-5)  # OHB leaves the logits alone


def test_ratios_are_clipped():
    fp, q = make_pair(0.5)  # logits shrink 4x: log ratio 1.39, clipped to 0.4
    before = reference_logit_std(q)
    decisions = match_attention_(fp, q, [LAYOUT], run, ohb=False)
    assert decisions["alpha"]["attn"] == pytest.approx([math.exp(0.4)] * 4)
    assert torch.allclose(reference_logit_std(q), before * math.exp(0.4), rtol=1e-5)


def test_neutral_band_leaves_weights_alone():
    fp, q = make_pair(0.99)  # log ratio of logits 0.02 < 0.03
    w = q.attn.qkv.weight.detach().clone()
    decisions = match_attention_(fp, q, [LAYOUT], run, ohb=False)
    assert decisions["alpha"]["attn"] == [1.0] * 4
    assert torch.equal(q.attn.qkv.weight, w)


def unfolded_forward(model, x, alpha, beta):
    """The attention with explicit per-head logit and output multipliers (what folding must reproduce)."""
    attn = model.attn
    h = model.up(x).double()
    B, T, C = h.shape
    H = attn.n_head
    qkv = h @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(C // H) * alpha.double()[None, :, None, None]
    y = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(B, T, C)
    return beta * (y @ attn.proj.weight.double().T + attn.proj.bias.double())


def test_folded_equals_unfolded_and_adds_nothing():
    fp, _ = make_pair(1.0)
    folded = copy.deepcopy(fp)
    alpha, beta = torch.tensor([1.3, 0.8, 1.0, 1.1]), 0.9
    types = [type(m) for m in folded.modules()]
    n_params = sum(p.numel() for p in folded.parameters())
    fold_temperature_(folded, LAYOUT, alpha)
    fold_output_gain_(folded, LAYOUT, beta)
    assert [type(m) for m in folded.modules()] == types
    assert sum(p.numel() for p in folded.parameters()) == n_params
    x = BATCHES[0]
    with torch.no_grad():
        assert torch.allclose(folded(x).double(), unfolded_forward(fp, x, alpha, beta), atol=1e-5)
        assert not torch.allclose(fp(x).double(), unfolded_forward(fp, x, alpha, beta), atol=1e-3)


def test_fold_into_fake_quant_projection_rounds_the_folded_weight():
    fp, _ = make_pair(1.0)
    spec = QuantSpec(WeightSpec(8))
    fp.attn.qkv = QuantLinear.from_float(fp.attn.qkv, spec)
    unrounded = fp.attn.qkv.weight.detach().clone()
    alpha = torch.tensor([1.3, 0.8, 1.0, 1.1])
    fold_temperature_(fp, LAYOUT, alpha)
    C = 32
    unrounded[:C] *= alpha.repeat_interleave(C // 4)[:, None]
    expected = QuantLinear.from_float(nn.Linear(C, 3 * C), spec)
    with torch.no_grad():
        expected.weight.copy_(unrounded)
    expected.requantize()
    assert torch.equal(fp.attn.qkv.dequantized_weight(), expected.dequantized_weight())


def test_hooks_are_removed_also_on_error():
    fp, _ = make_pair(1.0)

    def failing():
        fp(BATCHES[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_stats(fp, [LAYOUT], failing)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in fp.modules())
    with pytest.raises(ValueError, match="is not a module"):
        collect_stats(
            fp, [AttentionLayout("attn", 4, "backbone", out="attn.missing", qkv="attn.qkv")], lambda: None
        )
    with pytest.raises(ValueError, match="is not a Linear"):
        collect_stats(fp, [AttentionLayout("attn", 4, "backbone", out="attn", qkv="attn.qkv")], lambda: None)


# ---- on the reference VLA, through quantize_policy ---------------------------------------------------------
def random_calibration(n_batches=2, n=4, seed=0):
    """Random images and states: enough to drive every layer (the numbers are not the point here)."""
    import numpy as np

    from daptq.data.calibration import CalibrationSet

    rng = np.random.default_rng(seed)
    tasks = ["reach the goal", "push the puck to the goal", "open the drawer", "press the button"]
    return CalibrationSet(
        [
            {
                "image": rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
                "state": rng.uniform(-0.2, 0.8, (n, 4)).astype(np.float32),
                "instruction": [tasks[i % 4] for i in range(n)],
            }
            for _ in range(n_batches)
        ],
        {"split": "test", "action_space": {"names": ["dx", "dy", "dz", "grip"]}},
    )


def test_quantvla_on_the_reference_vla():
    from daptq.methods import config_from_dict, quantize_policy
    from daptq.methods.quantvla import QuantVLAConfig
    from daptq.methods.rtn import RTNConfig
    from daptq.models.reference import load_reference_policy
    from daptq.quant import ActivationSpec, QuantSpec, WeightSpec

    spec = QuantSpec(WeightSpec(4), ActivationSpec(4))  # W4A4 moves the head's logits enough to fold
    config = QuantVLAConfig(spec=spec)
    assert config_from_dict(config.to_dict()) == config
    policy = load_reference_policy("metaworld-mt10")
    model = policy.model
    fp_qkv = model.head.blocks[0].attn.qkv.weight.detach().clone()
    n_params = sum(p.numel() for p in model.parameters())
    calibration = random_calibration()
    record = quantize_policy(policy, config, calibration)

    for i in range(3):
        block = model.head.blocks[i]
        assert type(block.attn.qkv) is nn.Linear and type(block.attn.proj) is nn.Linear  # float, no new op
        assert isinstance(block.mlp.fc, QuantLinear) and isinstance(block.mlp.proj, QuantLinear)
        assert type(block.adaLN) is nn.Linear
        assert (
            "attention projections stay float" in record.decisions["kept_float"][f"head.blocks.{i}.attn.qkv"]
        )
        assert len(record.decisions["alpha"][f"head.blocks.{i}.attn"]) == 6
    assert all(isinstance(model.blocks[i].attn.qkv, QuantLinear) for i in range(6))
    assert sum(p.numel() for p in model.parameters()) == n_params
    alpha = torch.tensor(record.decisions["alpha"]["head.blocks.0.attn"])
    assert (alpha != 1).any(), record.decisions["alpha"]
    beta = record.decisions["beta"]
    assert set(beta) == {f"head.blocks.{i}.attn" for i in range(3)}
    gain = alpha.repeat_interleave(32)[:, None]
    assert torch.allclose(model.head.blocks[0].attn.qkv.weight[:192], fp_qkv[:192] * gain, rtol=1e-6)
    assert torch.equal(model.head.blocks[0].attn.qkv.weight[192:], fp_qkv[192:])

    # without ATM/OHB the method is RTN on the selective layout, layer for layer
    plain = load_reference_policy("metaworld-mt10")
    quantize_policy(plain, QuantVLAConfig(spec=spec, atm=False, ohb=False), calibration)
    rtn = load_reference_policy("metaworld-mt10")
    quantize_policy(rtn, RTNConfig(spec=spec), calibration)
    assert torch.equal(
        plain.model.blocks[2].mlp.fc.dequantized_weight(), rtn.model.blocks[2].mlp.fc.dequantized_weight()
    )
    assert type(plain.model.head.blocks[1].attn.qkv) is nn.Linear and isinstance(
        rtn.model.head.blocks[1].attn.qkv, QuantLinear
    )


def test_quantvla_on_a_smoothquant_base():
    from daptq.methods import quantize_policy
    from daptq.methods.quantvla import QuantVLAConfig
    from daptq.models.reference import load_reference_policy

    policy = load_reference_policy("metaworld-mt10")
    record = quantize_policy(policy, QuantVLAConfig(base="smoothquant"), random_calibration(1))
    assert record.decisions["base"] == "smoothquant"
    smoothed = record.decisions["base_smoothing"]
    assert any(k.startswith("blocks.0.") for k in smoothed) and any(k.startswith("head.") for k in smoothed)
    assert not any("attn.qkv" in k and k.startswith("head.") for k in smoothed)  # float head attention
    assert type(policy.model.head.blocks[0].attn.qkv) is nn.Linear
    assert set(record.decisions["alpha"]) == {f"head.blocks.{i}.attn" for i in range(3)}
