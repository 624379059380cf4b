"""Sequential (block-by-block) calibration of the VLA methods (QuantVLA, QVLA, DA-PTQ): the block loop's
quantized model equals the whole-model path's on the tiny reference VLA (weights bitwise where the rounding
sees the same numbers; scales and corrections to float tolerance)."""

from __future__ import annotations

import pytest
import torch
from baseline_helpers import n_hooks, reference_calibration, tiny_reference_policy

from daptq.methods import quantize_policy
from daptq.methods.sequential import quantize_policy_sequential
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

pytestmark = pytest.mark.usefixtures("single_thread")
from baseline_helpers import single_thread  # noqa: E402,F401 (fixture)

STATIC = QuantSpec(
    WeightSpec(4, granularity="per_group", group_size=16), ActivationSpec(8, mode="static_per_tensor")
)


def _both(config, cal=None, make=tiny_reference_policy, **kwargs):
    cal = cal or reference_calibration()
    whole, seq = make(), make()
    whole_record = quantize_policy(whole, config, cal)
    record = quantize_policy_sequential(seq, config, cal, **kwargs)
    assert n_hooks(seq.model) == 0
    return whole, whole_record, seq, record


def _assert_same_model(whole, seq, exact=("qweight", "weight_scale")):
    a, b = whole.model.state_dict(), seq.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(exact):
            assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(b[k].double(), a[k].double(), rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("base", ["rtn", "smoothquant"])
def test_quantvla_sequential_equals_whole_model(base):
    from daptq.methods.quantvla import QuantVLAConfig

    config = QuantVLAConfig(spec=STATIC, base=base, neutral_band=0.0)  # every ratio folded
    whole, whole_record, seq, record = _both(config, max_in_memory_bytes=0)
    _assert_same_model(whole, seq)
    d, w = record.decisions, whole_record.decisions
    assert d["attention_modules"] == w["attention_modules"] and d["attention_modules"]
    for key in ("alpha", "fp_logit_std", "q_logit_std"):
        for name, values in w[key].items():
            torch.testing.assert_close(torch.tensor(d[key][name]), torch.tensor(values), rtol=1e-6, atol=0)
    for key in ("beta", "fp_out_rms", "q_out_rms"):
        for name, value in w[key].items():
            assert d[key][name] == pytest.approx(value, rel=1e-6)
    assert all(v != [1.0] * len(v) for v in d["alpha"].values()) and all(v != 1.0 for v in d["beta"].values())
    assert d["base_activation_scales"].keys() == w["base_activation_scales"].keys()


def test_whole_model_methods_refuse_a_streamed_loader():
    """QuantVLA (ATM/OHB fold into blocks after the loop), QVLA and DA-PTQ budget (whole-model gradients)."""
    from daptq.methods.daptq import DAPTQConfig
    from daptq.methods.quantvla import QuantVLAConfig
    from daptq.methods.qvla import QVLAConfig

    class Loader:
        def load_block(self, name, module):
            raise AssertionError("not reached")

        free_block = load_block

    for config in (QuantVLAConfig(), QVLAConfig(), DAPTQConfig.budget(average_bits=3.0)):
        policy = tiny_reference_policy()
        with pytest.raises(ValueError, match="needs its whole model in memory"):
            quantize_policy_sequential(policy, config, reference_calibration(), loader=Loader())


def test_qvla_sequential_equals_whole_model():
    """Sensitivities and the global allocation on the whole float model before the loop: the same rows."""
    from daptq.methods.qvla import QVLAConfig

    config = QVLAConfig(avg_bits=4.0, n_probes=1, exact_top_k=4)
    whole, whole_record, seq, record = _both(config)
    _assert_same_model(whole, seq, exact=("qweight", "weight_scale", "row_bits", "row_float"))
    for key in ("row_bits", "rows_by_bits", "average_bits", "weight_bytes"):
        assert record.decisions[key] == whole_record.decisions[key], key
    assert record.decisions["sequential"]["blocks"]


def _two_block_policy():
    import dataclasses

    from baseline_helpers import TINY

    return tiny_reference_policy(config=dataclasses.replace(TINY, n_layer=2, dit_n_layer=2))


def test_blockwise_gradients_equal_the_whole_model_backward():
    """The budget preset's per-block estimate (checkpointed forward, one backward for the block outputs'
    gradients, each block's weights differentiated from its recorded inputs) against one whole backward:
    measured bitwise equal here (96 of 96 layers, one thread); the tolerance, 1e-5 of each layer's largest
    value, leaves room for other kernels' summation orders."""
    from daptq.methods.daptq.blockwise import blockwise_gradient_stats
    from daptq.methods.daptq.sensitivity import bit_sensitivities, gradient_stats
    from daptq.quant.spec import WeightSpec

    policy = _two_block_policy()
    adapter = policy.adapter
    batches = list(adapter.calibration_batches(iter(reference_calibration().batches)))
    names = [m.name for m in adapter.quantizable_modules() if m.role != "encoder"]
    assert any(n.startswith("blocks.1.") for n in names) and any(
        n.startswith("head.blocks.1.") for n in names
    )
    w = torch.tensor([1.8, 1.8, 0.15, 1.0])
    flags = [p.requires_grad for p in policy.model.parameters()]
    whole = gradient_stats(adapter, batches, names, dim_weights=w, seed=3)
    got = blockwise_gradient_stats(adapter, batches, names, dim_weights=w, seed=3)
    assert got.n_batches == whole.n_batches == len(batches)
    for n in names:
        assert got.phi[n] == pytest.approx(whole.phi[n], rel=1e-5), n
        for a, b in ((got.grad_mean[n], whole.grad_mean[n]), (got.grad_sq_mean[n], whole.grad_sq_mean[n])):
            scale = float(b.abs().max())
            assert scale > 0 and float((a - b).abs().max()) <= 1e-5 * scale, n
    # with ``reduce``: each group's statistics handed over once, no gradient tensor kept
    seen, costs = [], {}
    specs = {b: WeightSpec(b, granularity="per_channel") for b in (2, 4)}

    def reduce(stats):
        seen.append(list(stats.grad_sq_mean))
        costs.update(bit_sensitivities(policy.model, stats, specs))

    lean = blockwise_gradient_stats(adapter, batches, names, dim_weights=w, seed=3, reduce=reduce)
    assert not lean.grad_mean and lean.phi == got.phi
    assert sorted(n for g in seen for n in g) == sorted(names) and len(seen) > 4
    expected = bit_sensitivities(policy.model, whole, specs)
    for n in names:
        for b in specs:
            assert costs[n][b] == pytest.approx(expected[n][b], rel=1e-5), (n, b)
    assert [p.requires_grad for p in policy.model.parameters()] == flags and n_hooks(policy.model) == 0
    assert all("forward" not in m.__dict__ for m in policy.model.modules())


W4G16 = QuantSpec(WeightSpec(4, granularity="per_group", group_size=16), ActivationSpec(8))


def test_daptq_paper_sequential_equals_whole_model(rounding="gptq"):  # RTN: the bundled-VLA test below
    """Bit map from head-only gradients, GPTQ Hessians from each block's recorded inputs, CSRC measured on
    the quantized policy after the loop: the whole-model path's model (codes and scales bitwise)."""
    from daptq.methods.daptq import DAPTQConfig

    config = DAPTQConfig(spec=W4G16, rounding=rounding, float_dit_blocks=1, sensitivity_batches=2)
    whole, w, seq, d = _both(config, make=_two_block_policy, max_in_memory_bytes=0)
    _assert_same_model(whole, seq)
    d, w = d.decisions, w.decisions
    assert d["bit_map"] == w["bit_map"] and 16 in d["bit_map"].values() and 4 in d["bit_map"].values()
    assert d["ranking"] == w["ranking"] and d["float_by_block"] == w["float_by_block"]
    assert d["phi"].keys() == w["phi"].keys()
    assert all(d["phi"][n] == pytest.approx(v, rel=1e-6) for n, v in w["phi"].items())
    assert d["compensation"].keys() == w["compensation"].keys() and len(d["compensation"]) > 1
    assert set(seq.adapter.block_modules().values()) >= set(d["sequential"]["blocks"])


def test_daptq_budget_sequential_equals_whole_model():
    """The allocation from block-wise gradients (blockwise.py) is the whole-model one: same bit widths."""
    from daptq.methods.daptq import DAPTQConfig

    config = DAPTQConfig.budget(average_bits=3.0, sensitivity_batches=2)
    whole, w, seq, d = _both(config, make=_two_block_policy)
    _assert_same_model(whole, seq)
    d, w = d.decisions, w.decisions
    assert d["bit_map"] == w["bit_map"] and len(set(d["bit_map"].values())) > 2
    for n, row in w["allocation"]["costs"].items():
        for c, v in row.items():
            assert d["allocation"]["costs"][n][c] == pytest.approx(v, rel=1e-5, abs=1e-12), (n, c)


def test_daptq_sequential_refuses_static_activation_scales():
    from daptq.methods.daptq import DAPTQConfig

    policy = tiny_reference_policy()
    with pytest.raises(ValueError, match="static activation scales.*whole model"):
        quantize_policy_sequential(
            policy, DAPTQConfig(spec=STATIC, float_dit_blocks=0), reference_calibration()
        )
    assert n_hooks(policy.model) == 0


def _reference_vla_calibration(n_batches=2, n=2, seed=0):
    import numpy as np

    from daptq.data.calibration import CalibrationSet

    rng = np.random.default_rng(seed)
    tasks = ["reach the goal", "push the puck to the goal", "open the drawer", "press the button"]
    batches = [
        {
            "image": rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
            "state": rng.uniform(-0.2, 0.8, (n, 4)).astype(np.float32),
            "instruction": [tasks[(i + j) % 4] for j in range(n)],
            "actions": rng.uniform(-1, 1, (n, 8, 4)).astype(np.float32),
        }
        for i in range(n_batches)
    ]
    return CalibrationSet(
        batches, {"split": "calibration", "action_space": {"names": ["dx", "dy", "dz", "grip"]}}
    )


def test_daptq_quantize_sequential_on_the_bundled_reference_vla(tmp_path):
    """``daptq quantize ref:metaworld-mt10 --method daptq --sequential`` (the workflow under the CLI): the
    saved policy loads back equal to the whole-model path's (DA-PTQ paper, W4A8)."""
    from daptq.methods.daptq import DAPTQConfig
    from daptq.methods.workflow import quantize_to_directory
    from daptq.models.quantized import load_quantized_policy
    from daptq.quant import QuantLinear

    cal = _reference_vla_calibration(n_batches=1)
    config = DAPTQConfig(sensitivity_batches=1)
    loaded = {}
    for sequential in (False, True):
        out = quantize_to_directory(
            "ref:metaworld-mt10", config, tmp_path / str(sequential), lambda _p: cal, sequential=sequential
        )
        loaded[sequential] = load_quantized_policy(out)
    _assert_same_model(loaded[False], loaded[True])
    assert any(isinstance(m, QuantLinear) for m in loaded[True].model.modules())


def test_qvla_blockwise_jacobians_equal_the_whole_model_backward():
    """QVLA's Jacobians block by block (checkpointed forward, per-probe block-output gradients, each block
    recomputed from its inputs) against the whole backward: Grams bitwise, Jacobians measured within 4e-16
    relative (float64 summation order); tolerance 1e-12."""
    from daptq.methods.qvla import blockwise_jacobian_and_gram, differentiable_action, jacobian_and_gram

    policy = _two_block_policy()
    adapter = policy.adapter
    batches = list(adapter.calibration_batches(iter(reference_calibration().batches)))
    names = [
        m.name
        for m in adapter.quantizable_modules()
        if m.role not in ("vision", "language") and isinstance(adapter.module(m.name), torch.nn.Linear)
    ]
    assert {"blocks.1.mlp.fc", "head.blocks.1.mlp.fc"} <= set(names)
    flags = [p.requires_grad for p in policy.model.parameters()]
    action = differentiable_action(adapter)
    jac, gram, n = jacobian_and_gram(policy.model, names, action, batches, 2, 0)
    jac2, gram2, n2 = blockwise_jacobian_and_gram(adapter, names, action, batches, 2, 0)
    assert n == n2 == 8
    for name in names:
        assert torch.equal(gram[name], gram2[name]), name
        scale = float(jac[name].abs().max())
        assert scale > 0 and float((jac2[name] - jac[name]).abs().max()) <= 1e-12 * scale, name
    assert [p.requires_grad for p in policy.model.parameters()] == flags and n_hooks(policy.model) == 0
    assert all("forward" not in m.__dict__ for m in policy.model.modules())


def test_blockwise_gradients_name_blocks_that_never_run_as_modules(monkeypatch):
    """An adapter whose declared blocks are not called as modules (their layers run another way) gets an
    error naming them, not a silent zero sensitivity."""
    from daptq.methods.daptq.blockwise import blockwise_gradient_stats
    from daptq.methods.qvla import blockwise_jacobian_and_gram, differentiable_action

    policy = tiny_reference_policy()
    adapter = policy.adapter
    block = policy.model.head.blocks[0]
    monkeypatch.setattr(type(block), "__call__", lambda self, *a, **k: type(block).forward(self, *a, **k))
    batches = list(adapter.calibration_batches(iter(reference_calibration(n_batches=1).batches)))
    names = ["head.blocks.0.mlp.fc", "head.action_out"]
    with pytest.raises(ValueError, match=r"blocks \['head.blocks.0'\] never ran as modules"):
        blockwise_gradient_stats(adapter, batches, names)
    with pytest.raises(ValueError, match=r"blocks \['head.blocks.0'\] never ran as modules"):
        blockwise_jacobian_and_gram(adapter, names, differentiable_action(adapter), batches, 1)


def test_daptq_paper_streamed_equals_the_in_memory_whole_model_path(tmp_path):
    """DA-PTQ `paper` with weights streamed from safetensors shards (the tiny CogACT): the action head's
    blocks stay loaded through the gradient pass, the CSRC pass reloads each rounded block; the written
    blocks and the in-memory rest equal the whole-model path's (codes and scales bitwise)."""
    from safetensors.torch import load_file
    from test_streaming import _raw

    from daptq.data.calibration import CalibrationSet
    from daptq.methods.daptq import DAPTQConfig
    from daptq.models.cogact.adapter import CogACTAdapter
    from daptq.models.cogact.streamed import load_streamed_cogact, write_streamed_cogact
    from daptq.models.cogact.testing import tiny_cogact, tiny_tokenizer
    from daptq.models.streaming import save_block_state

    cal = CalibrationSet([_raw(0), _raw(1)], {"source": "test"})
    config = DAPTQConfig(spec=W4G16, float_dit_blocks=1, sensitivity_batches=2, rounding="gptq")
    write_streamed_cogact(tiny_cogact(), tmp_path / "ckpt", max_shard_bytes=200_000)
    whole = CogACTAdapter(tiny_cogact(), tiny_tokenizer())
    whole_record = quantize_policy(whole, config, cal)
    adapter, loader = load_streamed_cogact(tmp_path / "ckpt", tiny_tokenizer())
    saved = {}

    def done(block, module):
        saved[block.name] = save_block_state(module, tmp_path / f"{block.name}.safetensors")

    record = quantize_policy_sequential(adapter, config, cal, loader=loader, on_block_done=done)
    assert all(p.is_meta for b in saved for p in adapter.model.get_submodule(b).parameters())
    assert record.decisions["bit_map"] == whole_record.decisions["bit_map"]
    assert record.decisions["compensation"].keys() == whole_record.decisions["compensation"].keys()
    ref = whole.model.state_dict()
    compared = 0
    for name, path in saved.items():
        for k, v in load_file(str(path)).items():
            if k.endswith(("qweight", "weight_scale")):
                assert torch.equal(v, ref[f"{name}.{k}"]), k
            torch.testing.assert_close(v.double(), ref[f"{name}.{k}"].double(), rtol=1e-5, atol=1e-6)
            compared += 1
    for k, v in adapter.model.state_dict().items():
        if not v.is_meta:
            torch.testing.assert_close(v.double(), ref[k].double(), rtol=1e-5, atol=1e-6, msg=k)
            compared += 1
    assert compared > 100


def test_a_rounded_block_reloads_as_it_was_saved(tmp_path):
    """The CSRC pass over streamed blocks reloads each rounded block; a cache filled after saving and left
    on meta by the loader's free must come back empty (a meta weight is read as garbage, silently)."""
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.sequential import load_rounded_block, save_rounded_block
    from daptq.models.streaming import StreamingLoader

    policy = tiny_reference_policy()
    quantize_policy(policy, RTNConfig(spec=W4G16))
    block = policy.model.head.blocks[0]
    layer = block.mlp.fc
    layer._dequant_cache = None
    save_rounded_block(block, tmp_path / "block.safetensors")
    x = torch.randn(3, layer.in_features)
    ref = layer(x)  # fills the cache
    for _ in range(2):
        StreamingLoader.free_block(None, "head.blocks.0", block)
        assert layer._dequant_cache is not None and layer._dequant_cache.is_meta
        load_rounded_block(block, tmp_path / "block.safetensors")
        assert torch.equal(layer(x), ref)
