"""The u8s8 ``MatMulInteger`` lowering (W4A8 per-channel at the int8 rate) against daptq's fake-quant layer.

Exact to 1e-5 relative (max|y - ref| / max|ref|): the same integer products and rescale; only the fp32
rescale order differs. Codes beyond +-64 are refused: without VNNI the kernel's int16 pair sums saturate.
"""

import pytest
import torch
from torch import nn

from daptq.deploy import export_onnx, make_session
from daptq.deploy.lowering import (
    U8S8MatMulIntegerLinear,
    lower_layer,
    lower_model_,
    matmul_integer_u8s8_fits,
)
from daptq.quant import ActivationSpec, QuantSpec, WeightSpec, quantize_, w4a8
from daptq.quant.kernels import LayerCost

torch.set_num_threads(1)

PER_TOKEN = ActivationSpec(8)
STATIC = ActivationSpec(8, mode="static_per_tensor")


def rel_err(y, ref):
    y, ref = torch.as_tensor(y).detach().double(), torch.as_tensor(ref).detach().double()
    return float((y - ref).abs().max() / ref.abs().max())


def quant_linear(spec, k=96, n=40, seed=0, codes=None):
    """A fake-quant linear; ``codes`` (lo, hi): random codes in [lo, hi] with both extremes in every row."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, n))
    static = spec.activation.mode != "dynamic_per_token"
    batches = [torch.randn(4, 6, k) * 2 for _ in range(3)] if static else None
    quantize_(model, spec, batches)
    layer = model[0]
    if codes is not None:
        lo, hi = codes
        q = torch.randint(lo, hi + 1, (n, k), dtype=torch.int32)
        q[:, 0], q[:, 1] = lo, hi
        layer.set_quantized_weight(q, layer.weight_scale.clone())
    return layer


def run_lowered(layer, x):
    module, plan = lower_layer(layer, "layer")
    graph = export_onnx(module, (x,), ["x"], ["y"], {"x": {0: "b", 1: "t"}})
    session = make_session(graph.SerializeToString(), threads=1)
    return session.run(None, {"x": x.numpy()})[0], plan, graph


CASES = [
    ("w4-channel-extremes-token", WeightSpec(4), PER_TOKEN, (-8, 7)),
    ("w4-channel-extremes-static", WeightSpec(4), STATIC, (-8, 7)),
    ("w4-tensor-token", WeightSpec(4, granularity="per_tensor"), PER_TOKEN, (-8, 7)),
    ("w4-channel-rtn-token", WeightSpec(4), PER_TOKEN, None),
    ("w2-channel-token", WeightSpec(2), PER_TOKEN, None),
    ("w3-channel-static", WeightSpec(3), STATIC, None),
    ("7bit-codes-token", WeightSpec(8), PER_TOKEN, (-64, 63)),
    ("7bit-codes-static", WeightSpec(8), STATIC, (-64, 63)),
    ("w8-codes-64-token", WeightSpec(8), PER_TOKEN, (-64, 64)),
]


@pytest.mark.parametrize("label,weight,act,codes", CASES, ids=[c[0] for c in CASES])
def test_u8s8_equals_fake_quant(label, weight, act, codes):
    layer = quant_linear(QuantSpec(weight, act), codes=codes)
    x = torch.randn(2, 5, layer.in_features) * 2  # static: some inputs beyond the calibrated range (clipped)
    x[0, 0, 0] = 0.0
    y, plan, graph = run_lowered(layer, x)
    assert plan.kernel == "matmul_integer_u8s8"
    assert plan.stored_bytes == layer.in_features * layer.out_features + layer.weight_scale.numel() * 4
    ops = [n.op_type for n in graph.graph.node]
    assert "MatMulInteger" in ops and "MatMul" not in ops
    matmul = next(n for n in graph.graph.node if n.op_type == "MatMulInteger")
    assert len(matmul.input) == 3  # uint8 activations with their zero point 128
    assert rel_err(y, layer(x)) < 1e-5


def test_u8s8_refuses_codes_beyond_64():
    layer = quant_linear(QuantSpec(WeightSpec(8), PER_TOKEN), codes=(-65, 63))
    assert not matmul_integer_u8s8_fits(layer)
    with pytest.raises(ValueError, match=r"codes in \[-64, 64\].*max \|code\| 65"):
        U8S8MatMulIntegerLinear(layer)
    x = torch.randn(2, 5, layer.in_features)
    y, plan, _ = run_lowered(layer, x)
    assert plan.kernel == "matmul_integer"  # the full-range int8 x int8 kernel instead, still exact
    assert rel_err(y, layer(x)) < 1e-5
    small = quant_linear(QuantSpec(WeightSpec(8), PER_TOKEN), codes=(-3, 3))
    assert matmul_integer_u8s8_fits(small)
    q = small.qweight.to(torch.int32)
    q[0, 5] = -128  # one code at int8's minimum: int8 abs(-128) wraps to -128, must still be refused
    small.set_quantized_weight(q, small.weight_scale.clone())
    assert not matmul_integer_u8s8_fits(small)
    full = quant_linear(QuantSpec(WeightSpec(8), PER_TOKEN))  # RTN 8-bit: codes up to 127
    assert int(full.qweight.abs().max()) > 64 and lower_layer(full)[1].kernel == "matmul_integer"


def test_u8s8_not_for_groups_affine_or_weight_only():
    grouped = quant_linear(w4a8(32))
    assert lower_layer(grouped)[1].kernel == "matmul_nbits"  # per-group scales do not factor out
    affine = quant_linear(QuantSpec(WeightSpec(4, symmetric=False), PER_TOKEN))
    assert not matmul_integer_u8s8_fits(affine)
    asym_act = quant_linear(QuantSpec(WeightSpec(4), ActivationSpec(8, symmetric=False)))
    assert not matmul_integer_u8s8_fits(asym_act)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16))
    quantize_(model, QuantSpec(WeightSpec(4)))
    assert lower_layer(model[0])[1].kernel == "matmul_nbits"  # weight-only: no int8 activations


def test_cost_model_keeps_or_drops_u8s8():
    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
        quantize_(m, QuantSpec(WeightSpec(4), PER_TOKEN))
        return m

    plans = lower_model_(model(), cost_model={"0": LayerCost(1e-4, 2e-4), "2": LayerCost(3e-4, 2e-4)})
    assert [p.kernel for p in plans] == ["matmul_integer_u8s8", "dequantized_fp32"]
    assert "matmul_integer_u8s8 0.100 ms vs fp32 0.200 ms" in plans[0].decision
    assert "does not pay" in plans[1].decision


def test_per_channel_w4a8_policy_exports_to_u8s8_and_matches_fake_quant(tmp_path):
    """bench's ort-w4a8-pc recipe on a toy reference VLA: every quantized layer in the manifest is u8s8, and
    the deployed policy equals its fake-quant twin (same noise seed)."""
    import numpy as np

    from daptq.deploy.bench import (
        BASE_VARIANTS,
        base_policy,
        per_channel_w4a8_recipe,
        reference_w4a8_recipe,
    )
    from daptq.deploy.export import export_reference_policy, read_manifest
    from daptq.deploy.runtime import OnnxPolicy

    assert "ort-w4a8-pc" in BASE_VARIANTS
    policy = base_policy("toy-vla")
    grouped = reference_w4a8_recipe(policy.model, 128)
    recipe = per_channel_w4a8_recipe(policy.model, 128)
    assert [r.target for r in recipe.rules] == [r.target for r in grouped.rules]  # the same layers
    assert {r.spec for r in recipe.rules} == {QuantSpec(WeightSpec(4), PER_TOKEN)}
    quantize_(policy.model, recipe)
    out = export_reference_policy(policy, tmp_path / "pc")
    plans = [p for g in read_manifest(out)["layers"].values() for p in g]
    assert len(plans) == len(recipe.rules)
    assert {p["kernel"] for p in plans} == {"matmul_integer_u8s8"}, {p["name"]: p["kernel"] for p in plans}
    deployed = OnnxPolicy(out, threads=1)
    rng = np.random.default_rng(0)
    size = policy.model.config.image_size
    obs = {
        "image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "state": np.array([0.0, 0.6, 0.2, 0.5], np.float32),
        "instruction": "push the puck to the goal",
    }
    with torch.no_grad():
        batch, deployed_batch = policy.observation_to_batch(obs), deployed.observation_to_batch(obs)
        z = policy.model.condition(batch)
        assert rel_err(deployed.condition(deployed_batch), z) < 1e-4
        a = policy.predict_chunk(batch, torch.Generator().manual_seed(3))
        b = deployed.predict_chunk(deployed_batch, torch.Generator().manual_seed(3))
    assert rel_err(torch.as_tensor(np.asarray(b)), a) < 1e-4
