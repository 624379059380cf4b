import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from daptq.methods.qvla import (
    QVLA_BITS,
    LayerSensitivity,
    MixedBitLinear,
    allocate_bits,
    average_bits,
    jacobian_and_gram,
    layer_sensitivities,
    load_mixed_state,
    mixed_bytes,
    mixed_state,
    spearman,
)
from daptq.quant import ActivationSpec, WeightSpec, fake_quantize_weight


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The reference-VLA passes are small; several threads on a shared machine only slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Toy(nn.Module):
    """Three linears; the last one's columns span two decades, so channels of ``l2`` differ in how much they
    move the output (their Jacobian norms), not only in their rounding error."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2, self.l3 = nn.Linear(8, 24), nn.Linear(24, 32), nn.Linear(32, 6)
        with torch.no_grad():
            self.l3.weight.mul_(torch.logspace(-1, 1, 32)[torch.randperm(32)])

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def action_fn(model):
    return lambda batch, _gen: model(batch)


BATCHES = [torch.randn(16, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]


def exact_rms_deviation(model, name, channel, bits):
    """Independent reference: quantize one row of a copy with the core RTN, compare outputs."""
    q = copy.deepcopy(model)
    layer = q.get_submodule(name)
    with torch.no_grad():
        row = layer.weight[channel : channel + 1]
        layer.weight[channel] = 0 if bits == 0 else fake_quantize_weight(row, WeightSpec(bits))[0]
        diff = sum(float((q(x) - model(x)).double().square().sum()) for x in BATCHES)
    return math.sqrt(diff / (16 * 4))


def test_jacobian_norms_match_the_full_jacobian():
    model = Toy()
    jac_sq, gram, n = jacobian_and_gram(model, ["l2"], action_fn(model), BATCHES, n_probes=256)
    assert n == 64
    ref = torch.zeros(32, dtype=torch.float64)
    h = torch.zeros(24, 24, dtype=torch.float64)
    for x in BATCHES:
        for s in range(x.shape[0]):
            xs = torch.tanh(model.l1(x[s])).detach()
            h += xs.double().T @ xs.double()
            J = torch.autograd.functional.jacobian(
                lambda y: model.l3(torch.tanh(y)), model.l2(xs)
            )  # (5,6,5,32)
            ref += J.double().square().sum(dim=(0, 1, 2))
    assert torch.allclose(gram["l2"], h / 64, rtol=1e-9)
    rel = (jac_sq["l2"] / (ref / 64) - 1).abs()
    assert rel.max() < 0.15  # Gaussian probes: unbiased, ~1/sqrt(256*30) relative noise
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_proxy_ranks_channels_like_the_exact_deviation():
    model = Toy()
    sens, _ = layer_sensitivities(model, ["l1", "l2"], action_fn(model), BATCHES, n_probes=16, exact_top_k=0)
    j2 = QVLA_BITS.index(2)
    proxy, exact, no_jacobian = [], [], []
    for name, s in sens.items():
        for c in range(s.proxy.shape[0]):
            proxy.append(float(s.proxy[c, j2]))
            no_jacobian.append(float(s.output_error[c, j2]))
            exact.append(exact_rms_deviation(model, name, c, 2))
    rho = spearman(proxy, exact)
    rho_without_j = spearman(no_jacobian, exact)
    print(f"Spearman(proxy, exact) = {rho:.3f}; without the Jacobian = {rho_without_j:.3f}")
    assert rho > 0.85
    assert rho > rho_without_j + 0.1  # the Jacobian factor is what makes the ranking action-centric


def test_top_channels_are_checked_exactly():
    model = Toy()
    sens, check = layer_sensitivities(model, ["l2"], action_fn(model), BATCHES, n_probes=8, exact_top_k=10)
    assert check["checked"] == 10 and check["spearman_proxy_vs_exact"] > 0.5
    for item in check["top"]:
        assert item["exact"] == pytest.approx(
            exact_rms_deviation(model, "l2", item["channel"], item["bits"]), rel=1e-5
        )
        j = QVLA_BITS.index(item["bits"])
        assert float(sens["l2"].used[item["channel"], j]) == pytest.approx(item["exact"])
    checked = {(i["channel"], i["bits"]) for i in check["top"]}
    smallest_checked = min(i["proxy"] for i in check["top"])
    for c in range(32):
        for j in range(1, 5):  # every unchecked candidate has a smaller proxy than every checked one
            if (c, QVLA_BITS[j]) not in checked:
                assert float(sens["l2"].proxy[c, j]) <= smallest_checked


def synthetic(fan_ins, outs, seed=0):
    g = torch.Generator().manual_seed(seed)
    sens = {}
    for k, (f, o) in enumerate(zip(fan_ins, outs, strict=True)):
        base = torch.rand(o, 1, generator=g, dtype=torch.float64) * 10 ** (k % 2)
        growth = torch.tensor([[0.0, 1.0, 4.0, 16.0, 256.0]], dtype=torch.float64)
        used = base * growth
        sens[f"l{k}"] = LayerSensitivity(f"l{k}", f, base[:, 0], used, used, used.clone())
    return sens


@pytest.mark.parametrize("avg", [8.0, 4.0, 3.0, 2.5, 2.0, 1.0])
def test_budget_is_met_exactly(avg):
    sens = synthetic([24, 32, 48], [32, 24, 16])
    bits = allocate_bits(sens, avg)
    fan = {n: s.fan_in for n, s in sens.items()}
    assert average_bits(bits, fan) == avg  # to the bit: total bits == avg * weights
    assert sum(int(b.long().sum()) * fan[n] for n, b in bits.items()) == avg * sum(
        b.numel() * fan[n] for n, b in bits.items()
    )
    assert all(set(b.tolist()) <= set(QVLA_BITS) for b in bits.values())


def _uneven(fans, outs, seed, zero_frac):
    """Increasing per-step sensitivities spanning decades, some steps free: greedy demotion plus one exchange
    ended 1-3 bits per row of the fan-in-7 layer off the budget on these (the tiny CogACT's x_embedder)."""
    gen = torch.Generator().manual_seed(seed)
    sens = {}
    for k, (f, o) in enumerate(zip(fans, outs, strict=True)):
        scale = 10.0 ** torch.randint(-3, 3, (o, 1), generator=gen)
        steps = torch.rand(o, 4, generator=gen, dtype=torch.float64) * torch.tensor([1, 4, 16, 256.0]) * scale
        steps[torch.rand(o, 4, generator=gen) < zero_frac] = 0
        used = torch.cat([torch.zeros(o, 1, dtype=torch.float64), steps.cumsum(1)], 1)
        sens[f"l{k}"] = LayerSensitivity(f"l{k}", f, used[:, 0], used, used, used.clone())
    return sens


@pytest.mark.parametrize(("seed", "zero_frac", "avg"), [(0, 0.0, 4.0), (0, 0.3, 8.0), (1, 0.0, 4.0)])
def test_budget_is_met_exactly_beside_a_fan_in_7_layer(seed, zero_frac, avg):
    sens = _uneven([7, 64], [64, 7], seed, zero_frac)
    bits = allocate_bits(sens, avg)
    fan = {n: s.fan_in for n, s in sens.items()}
    assert sum(int(b.long().sum()) * fan[n] for n, b in bits.items()) == avg * (64 * 7 + 7 * 64)
    assert all(set(b.tolist()) <= set(QVLA_BITS) for b in bits.values())


def test_less_sensitive_channels_are_demoted_first():
    sens = synthetic([16], [8])
    sens["l0"].used[0] *= 1e6  # one channel is far more sensitive than the rest
    bits = allocate_bits(sens, 4.0)["l0"]
    assert bits[0] == 16 and bits[1:].float().mean() < 4


def test_impossible_budgets_are_clear_errors():
    sens = synthetic([3], [1])  # one row of 3 weights: totals 48, 24, 12, 6, 0 bits only
    with pytest.raises(ValueError, match="cannot be met exactly"):
        allocate_bits(sens, 1.0)
    with pytest.raises(ValueError, match=r"in \[0, 16\]"):
        allocate_bits(sens, 17)
    with pytest.raises(ValueError, match="not a whole number of bits"):
        allocate_bits(synthetic([3], [2]), 1.1)
    assert average_bits(allocate_bits(sens, 2.0), {"l0": 3}) == 2.0


def test_mixed_layer_forward_and_storage_round_trip():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10)
    row_bits = torch.tensor([16, 8, 4, 2, 0, 4, 4, 2, 8, 16])
    layer = MixedBitLinear.from_float(copy.deepcopy(lin), row_bits, ActivationSpec(8))
    expected = torch.zeros(10, 24)
    for c, b in enumerate(row_bits.tolist()):
        w = lin.weight[c : c + 1].detach()
        if b == 16:
            expected[c] = w.half().float()[0]
        elif b != 0:
            expected[c] = fake_quantize_weight(w, WeightSpec(b))[0]
    assert torch.equal(layer.dequantized_weight(), expected)
    x = torch.randn(3, 24)
    from daptq.quant.fake import fake_quantize_activation

    xq = fake_quantize_activation(x, ActivationSpec(8), None, None, -1)
    assert torch.allclose(layer(x), F.linear(xq, expected, lin.bias), atol=1e-6)

    blob = st_save(mixed_state(layer, "m"))  # through the file format, no pickle
    fresh = MixedBitLinear.from_float(nn.Linear(24, 10), torch.full((10,), 16), ActivationSpec(8))
    with torch.no_grad():
        fresh.bias.copy_(lin.bias)
    load_mixed_state(fresh, st_load(blob), "m")
    assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.row_bits, layer.row_bits)

    counted = mixed_bytes(layer)
    # bit map 10 B; 8-bit: 2 rows x 24 B; 4-bit: 3 rows x 12 B; 2-bit: 2 rows x 6 B; 16-bit: 2 rows x 48 B;
    # one bf16 scale per quantized row (7 rows)
    assert counted["stored_bytes"] == 10 + 48 + 36 + 12 + 96 + 7 * 2
    assert counted["ideal_bytes"] == math.ceil(sum(row_bits.tolist()) * 24 / 8) + 7 * 2
    assert counted["fp16_bytes"] == 480


def test_bad_row_bits_are_rejected():
    with pytest.raises(ValueError, match="not in"):
        MixedBitLinear.from_float(nn.Linear(4, 2), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="entries"):
        MixedBitLinear.from_float(nn.Linear(4, 2), torch.tensor([4]))


def test_reference_differentiable_chunk_matches_predict_chunk_and_has_gradients():
    import numpy as np

    from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig

    torch.manual_seed(0)
    cfg = ReferenceVLAConfig(
        image_size=32,
        d_model=32,
        n_layer=1,
        n_head=2,
        dit_d_model=32,
        dit_n_layer=1,
        dit_n_head=2,
        num_inference_steps=4,
    )
    model = ReferenceVLA(cfg)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    policy = ReferencePolicy(model)
    rng = np.random.default_rng(0)
    raw = {
        "image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        "state": rng.normal(size=(2, 4)).astype(np.float32),
        "instruction": ["open the door", "close the drawer"],
    }
    batch = next(policy.adapter.calibration_batches(iter([raw])))
    expected = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(3))
    chunk = policy.adapter.sample(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(chunk.detach(), expected)
    (grad,) = torch.autograd.grad(chunk.square().sum(), [model.blocks[0].mlp.fc.weight])
    assert grad.abs().sum() > 0  # the action depends on the backbone through every denoising step


def random_calibration(n_batches=1, n=2, seed=0):
    """Random images and states: enough to drive every layer (the numbers are not the point here)."""
    import numpy as np

    from daptq.data.calibration import CalibrationSet

    rng = np.random.default_rng(seed)
    return CalibrationSet(
        [
            {
                "image": rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
                "state": rng.uniform(-0.2, 0.8, (n, 4)).astype(np.float32),
                "instruction": ["reach the goal", "open the drawer"][:n],
            }
            for _ in range(n_batches)
        ],
        {"split": "test", "action_space": {"names": ["dx", "dy", "dz", "grip"]}},
    )


def test_qvla_on_the_reference_vla_meets_the_budget_and_reloads_bit_exactly(tmp_path):
    import numpy as np

    from daptq.methods import config_from_dict, quantize_policy
    from daptq.methods.qvla import QVLAConfig, load_mixed_layers, mixed_layers, save_mixed_layers
    from daptq.models.reference import load_reference_policy

    config = QVLAConfig(avg_bits=3.0, n_probes=1, exact_top_k=4)
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="per_channel, symmetric, minmax"):
        QVLAConfig(spec=__import__("daptq.quant", fromlist=["w4a8"]).w4a8())
    policy = load_reference_policy("metaworld-mt10")
    calibration = random_calibration()
    batch = next(policy.adapter.calibration_batches(iter(calibration.batches)))
    fp_actions = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0))
    record = quantize_policy(policy, config, calibration)
    layers = mixed_layers(policy.model)
    planned = [n for n, m in record.modules.items()]
    assert sorted(layers) == sorted(planned) and len(layers) > 40
    fan = {n: m.in_features for n, m in layers.items()}
    assert average_bits({n: m.row_bits for n, m in layers.items()}, fan) == 3.0
    assert record.decisions["average_bits"] == 3.0
    assert record.decisions["exact_check"]["checked"] == 4
    assert record.modules["blocks.0.mlp.fc"].note.startswith("QVLA rows by width")
    q_actions = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(q_actions).all() and not torch.equal(q_actions, fp_actions)
    counted = record.decisions["weight_bytes"]
    assert counted["ideal_bytes"] <= counted["stored_bytes"] < counted["fp16_bytes"] * 3 / 16 * 1.05

    sha = save_mixed_layers(policy.model, tmp_path / "qvla.safetensors")
    fresh = load_reference_policy("metaworld-mt10")
    assert sorted(load_mixed_layers(fresh.model, tmp_path / "qvla.safetensors", sha256=sha)) == sorted(layers)
    again = fresh.predict_chunk(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, q_actions)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_mixed_layers(
            load_reference_policy("metaworld-mt10").model, tmp_path / "qvla.safetensors", "0" * 64
        )
    assert np.isfinite(record.decisions["exact_check"]["exact_over_proxy_median"])

    # a quantized policy directory (what `daptq quantize` writes and `daptq eval DIR` loads)
    from daptq.models.quantized import save_quantized_policy
    from daptq.models.registry import load_policy

    save_quantized_policy(policy, record, tmp_path / "policy", "ref:metaworld-mt10")
    loaded = load_policy(str(tmp_path / "policy"))
    assert sorted(mixed_layers(loaded.model)) == sorted(layers)
    assert torch.equal(loaded.predict_chunk(batch, generator=torch.Generator().manual_seed(0)), q_actions)


def test_avg_bits_option_builds_a_qvla_config():
    from daptq.methods.workflow import config_from_options

    assert config_from_options("qvla", avg_bits=2.5).avg_bits == 2.5
    assert config_from_options("qvla", w_bits=4, a_bits=4, avg_bits=3).spec.activation.bits == 4
    with pytest.raises(ValueError, match="no bit budget"):
        config_from_options("rtn", avg_bits=3)
