"""Each lowered layer on ONNX Runtime against the fake-quant module it came from.

Tolerances (relative max-abs error, max|y - ref| / max|ref|):
- weight-only MatMulNBits at accuracy_level 1, emulated activations, MatMulInteger, dequantized fp32: 1e-5
  (the same numbers; only fp32 summation order differs).
- W4A8 on MatMulNBits' int8 path (accuracy_level 4): ONNX Runtime rounds the activation per block of the
  K axis, daptq per token. Each rounding moves an input by at most half its step, and a block's step is at
  most the token's, so |y_ort - y_fake| <= sum_k |w_nk| * amax_token / 127 (+ fp32 slack), checked per
  output element; and the SQNR against fake-quant stays above 30 dB.
"""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from daptq.deploy import export_onnx, lower_layer, make_session
from daptq.quant import (
    ActivationSpec,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    WeightSpec,
    quantize_,
    sqnr_db,
    w4a8,
)

torch.set_num_threads(1)


def rel_err(y, ref):
    y, ref = torch.as_tensor(y).detach().double(), torch.as_tensor(ref).detach().double()
    return float((y - ref).abs().max() / ref.abs().max())


def quant_linear(spec, k=128, n=48, seed=0, calibrate=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, n))
    batches = [torch.randn(4, 6, k) for _ in range(3)] if calibrate else None
    quantize_(model, spec, batches)
    return model[0]


def run_lowered(layer, x, name="layer"):
    module, plan = lower_layer(layer, name)
    graph = export_onnx(module, (x,), ["x"], ["y"], {"x": {0: "b", 1: "t"}})
    session = make_session(graph.SerializeToString(), threads=1)
    return session.run(None, {"x": x.numpy()})[0], plan, graph


def initializer_bytes(graph):
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)


EXACT = [
    ("w4-g32-sym", QuantSpec(WeightSpec(4, granularity="per_group", group_size=32)), 128, "matmul_nbits"),
    (
        "w4-g64-affine",
        QuantSpec(WeightSpec(4, symmetric=False, granularity="per_group", group_size=64)),
        128,
        "matmul_nbits",
    ),
    ("w4-channel-sym-k100", QuantSpec(WeightSpec(4)), 100, "matmul_nbits"),
    ("w4-channel-affine-k100", QuantSpec(WeightSpec(4, symmetric=False)), 100, "matmul_nbits"),
    ("w4-tensor-sym", QuantSpec(WeightSpec(4, granularity="per_tensor")), 96, "matmul_nbits"),
    ("w8-channel-sym", QuantSpec(WeightSpec(8)), 128, "matmul_nbits"),
    (
        "w8-g32-affine",
        QuantSpec(WeightSpec(8, symmetric=False, granularity="per_group", group_size=32)),
        128,
        "matmul_nbits",
    ),
    ("w8a8-dynamic", QuantSpec(WeightSpec(8), ActivationSpec(8)), 128, "matmul_integer"),
    (
        "w8a8-tensor",
        QuantSpec(WeightSpec(8, granularity="per_tensor"), ActivationSpec(8)),
        128,
        "matmul_integer",
    ),
    ("w3-channel", QuantSpec(WeightSpec(3)), 128, "dequantized_fp32"),
    ("w4-g24", QuantSpec(WeightSpec(4, granularity="per_group", group_size=24)), 96, "dequantized_fp32"),
    ("w8a4-emulated", QuantSpec(WeightSpec(8), ActivationSpec(4, symmetric=False)), 128, "matmul_nbits"),
]


@pytest.mark.parametrize("label,spec,k,kernel", EXACT, ids=[c[0] for c in EXACT])
def test_lowered_linear_matches_fake_quant(label, spec, k, kernel):
    layer = quant_linear(spec, k=k)
    x = torch.randn(2, 5, k)
    y, plan, _ = run_lowered(layer, x)
    assert plan.kernel == kernel
    if kernel == "matmul_nbits":
        assert plan.accuracy_level == 1
    assert rel_err(y, layer(x)) < 1e-5


def test_w8a8_static_scale_uses_the_calibrated_scale():
    spec = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))
    layer = quant_linear(spec, calibrate=True)
    x = torch.randn(2, 5, 128) * 1.5  # some inputs beyond the calibrated range: clipping must match too
    y, plan, _ = run_lowered(layer, x)
    assert plan.kernel == "matmul_integer"
    assert rel_err(y, layer(x)) < 1e-5
    layer.act_scale = layer.act_scale * 2  # a different static scale must change the deployed output
    assert rel_err(run_lowered(layer, x)[0], y) > 1e-3


def test_w4a8_int8_kernel_within_the_rounding_bound():
    layer = quant_linear(w4a8(32), k=256, n=64)
    x = torch.randn(3, 7, 256)
    y, plan, _ = run_lowered(layer, x)
    assert (plan.kernel, plan.accuracy_level) == ("matmul_nbits", 4)
    ref = layer(x).detach().double()
    w = layer.dequantized_weight().detach().double()
    step = x.double().abs().amax(dim=-1, keepdim=True) / 127
    bound = step * w.abs().sum(dim=1) + 1e-4 * ref.abs().max()
    diff = (torch.from_numpy(y).double() - ref).abs()
    assert bool((diff <= bound).all()), float((diff / bound).max())
    assert sqnr_db(ref, torch.from_numpy(y)) > 30
    assert float(diff.max()) > 0  # it really is another rounding (not the emulated path)


def test_w4a8_emulated_is_exact():
    layer = quant_linear(w4a8(32), k=128)
    module, plan = lower_layer(layer, "layer", w4a8_kernel="emulate")
    assert (plan.kernel, plan.accuracy_level) == ("matmul_nbits", 1)
    x = torch.randn(2, 5, 128)
    graph = export_onnx(module, (x,), ["x"], ["y"], {"x": {0: "b"}})
    y = make_session(graph.SerializeToString(), 1).run(None, {"x": x.numpy()})[0]
    assert rel_err(y, layer(x)) < 1e-5


def test_w4_graph_stores_codes_not_floats():
    """The deployed graph holds packed nibbles + scales, about an eighth of the fp32 weight, and they are
    daptq's codes: unpacked by hand (float64) they give the fake-quant weight."""
    layer = quant_linear(QuantSpec(WeightSpec(4, granularity="per_group", group_size=32)), k=128, n=64)
    _, plan, graph = run_lowered(layer, torch.randn(1, 2, 128))
    fp32_bytes = 128 * 64 * 4
    assert initializer_bytes(graph) < fp32_bytes / 6
    assert plan.stored_bytes == 64 * 128 // 2 + 64 * 4 * 4  # nibbles + fp32 scales
    node = next(n for n in graph.graph.node if n.op_type == "MatMulNBits")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    packed, scales = inits[node.input[1]].astype(np.int64), inits[node.input[2]].astype(np.float64)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(64, 4, 32) - 8
    w = (codes * scales.reshape(64, 4, 1)).reshape(64, 128)
    np.testing.assert_array_equal(w, layer.dequantized_weight().detach().double().numpy())


def test_conv_is_exported_with_the_dequantized_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    quantize_(model, QuantSpec(WeightSpec(4), ActivationSpec(8)))
    layer = model[0]
    assert isinstance(layer, QuantConv2d)
    x = torch.randn(1, 8, 10, 10)
    y, plan, _ = run_lowered(layer, x)
    assert plan.kernel == "dequantized_fp32" and plan.activation.endswith("(emulated)")
    assert rel_err(y, layer(x)) < 1e-5


def test_lower_layer_refuses_bad_input():
    layer = quant_linear(QuantSpec(WeightSpec(4)))
    with pytest.raises(ValueError, match="w4a8_kernel"):
        lower_layer(layer, "layer", w4a8_kernel="fast")
    spec = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))
    uncal = QuantLinear.from_float(nn.Linear(16, 8), spec)
    with pytest.raises(ValueError, match="not calibrated"):
        lower_layer(uncal, "uncal")


# ---- mixed-width layers (QVLA) ----------------------------------------------------------------------------
def mixed_linear(row_bits, k, activation=None, seed=0):
    from daptq.methods.qvla import MixedBitLinear

    torch.manual_seed(seed)
    return MixedBitLinear.from_float(nn.Linear(k, len(row_bits)), torch.tensor(row_bits), activation)


MIXED_BITS = [16, 8, 4, 2, 0, 4, 4, 2, 8, 16, 2, 4]


@pytest.mark.parametrize("k,activation", [(64, None), (40, ActivationSpec(8)), (40, ActivationSpec(4))])
def test_mixed_width_layer_runs_on_matmul_nbits_per_width_group(k, activation):
    """One MatMulNBits per integer width (2-bit included), fp16 rows, pruned rows, K padded to the block."""
    from daptq.deploy.lowering import lower_mixed_layer

    layer = mixed_linear(MIXED_BITS, k, activation)
    x = torch.randn(2, 5, k)
    module, plan = lower_mixed_layer(layer, "mixed")
    graph = export_onnx(module, (x,), ["x"], ["y"], {"x": {0: "b", 1: "t"}})
    y = make_session(graph.SerializeToString(), threads=1).run(None, {"x": x.numpy()})[0]
    assert rel_err(y, layer(x)) < 1e-5
    assert np.all(y[..., 4] == layer.bias[4].item())  # the pruned row: bias only
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(a.i for n in nodes for a in n.attribute if a.name == "bits")
    assert bits == [2, 4, 8] and plan.kernel == "matmul_nbits_mixed"
    assert plan.spec == "mixed rows 16:2 8:2 4:4 2:3 0:1 (avg 5.83 b)"
    blocks = -(-k // 32)
    # codes (8-bit 1, 4-bit 1/2, 2-bit 1/4 byte each, K padded to blocks of 32) + fp32 scale per block + fp16
    codes = 2 * blocks * 32 + 4 * blocks * 16 + 3 * blocks * 8
    assert plan.stored_bytes == codes + 9 * blocks * 4 + 2 * k * 2
    assert initializer_bytes(graph) < 12 * k * 4 / 2


def test_export_lowers_mixed_width_layers_of_the_reference_vla(tmp_path):
    """A reference VLA with QVLA layers in its head exports, and the deployed policy's denoiser matches."""
    from baseline_helpers import tiny_reference_policy

    from daptq.deploy.export import export_graphs
    from daptq.methods.qvla import MixedBitLinear, mixed_layers
    from daptq.quant._util import set_module

    policy = tiny_reference_policy()
    model = policy.model
    names = [n for n, m in model.head.named_modules() if type(m) is nn.Linear][:3]
    gen = torch.Generator().manual_seed(0)
    for n in names:
        lin = model.head.get_submodule(n)
        bits = torch.tensor([16, 8, 4, 2, 0])[torch.randint(0, 5, (lin.out_features,), generator=gen)]
        set_module(model.head, n, MixedBitLinear.from_float(lin, bits))
    assert len(mixed_layers(model)) == 3
    graphs, plans = export_graphs(model)
    assert sum(p.kernel == "matmul_nbits_mixed" for p in plans) == 3
    c = model.config
    noisy, t, z = torch.randn(2, c.chunk_size, c.action_dim), torch.tensor([3, 7]), torch.randn(2, c.d_model)
    session = make_session(graphs["denoiser"].SerializeToString(), threads=1)
    feeds = {"noisy_actions": noisy.numpy(), "t": t.numpy(), "z": z.numpy()}
    y = session.run(None, feeds)[0]
    with torch.no_grad():
        assert rel_err(y, model.head(noisy, t, z)) < 1e-4
