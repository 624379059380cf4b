"""Rotations folded into the weights (daptq.methods.rotation): exact on the float model, recorded, saved."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from baseline_helpers import reference_calibration, single_thread, tiny_reference_policy  # noqa: F401

from daptq.methods import quantize_policy
from daptq.methods.base import forward_batch
from daptq.methods.gptq import GPTQConfig
from daptq.methods.rotation import random_hadamard, rotate_model, stream_rotation
from daptq.methods.rtn import RTNConfig
from daptq.models.adapter import check_adapter
from daptq.models.reference import ReferenceAdapter
from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

W8A8 = QuantSpec(WeightSpec(8, granularity="per_channel"), ActivationSpec(8))


def _chunks(policy, calibration):
    batches = policy.adapter.calibration_batches(iter(calibration.batches))
    return torch.cat([forward_batch(policy.adapter, b, seed=i) for i, b in enumerate(batches)])


@pytest.mark.parametrize("n", [8, 32, 192, 12])
def test_rotations_are_orthogonal_and_stream_rotation_keeps_the_ones_vector(n):
    g = torch.Generator().manual_seed(0)
    h, construction = random_hadamard(n, g)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, eye, atol=1e-12)
    assert ("random_orthogonal" in construction) == (n & (n - 1) != 0)  # odd factor: 192 = 64 x 3
    q, _ = stream_rotation(n, g)
    assert torch.allclose(q @ q.T, eye, atol=1e-12)
    ones = torch.ones(n, dtype=torch.float64)
    assert torch.allclose(q @ ones, ones, atol=1e-12)  # what keeps LayerNorm's mean subtraction exact
    # and it mixes: no row is (close to) a basis vector
    assert float(q.abs().max()) < 0.9


def test_layernorm_commutes_with_a_stream_rotation():
    q, _ = stream_rotation(16, torch.Generator().manual_seed(1))
    x = torch.randn(5, 16, dtype=torch.float64) * 3 + 2  # not centred
    ln = torch.nn.functional.layer_norm
    assert torch.allclose(ln(x @ q, (16,)), ln(x, (16,)) @ q, atol=1e-12)


def test_rotated_reference_vla_equals_the_original(single_thread):  # noqa: F811
    policy, reference = tiny_reference_policy(), tiny_reference_policy()
    calibration = reference_calibration()
    before = _chunks(reference, calibration)
    record = rotate_model(policy.adapter)
    assert set(record["streams"]) == {"backbone"} and record["online"] == []
    assert "head.blocks.0.attn" in record["value_output"]
    assert record["not_rotated"]  # the DiT stream, recorded with its reason
    m = policy.model
    assert not torch.equal(m.blocks[0].attn.qkv.weight, reference.model.blocks[0].attn.qkv.weight)
    assert not torch.equal(m.head.blocks[0].attn.proj.weight, reference.model.head.blocks[0].attn.proj.weight)
    assert torch.equal(m.ln_f.weight, torch.ones_like(m.ln_f.weight))  # affine fused into head.z_proj
    assert torch.equal(m.blocks[0].ln_1.bias, torch.zeros_like(m.blocks[0].ln_1.bias))
    after = _chunks(policy, calibration)
    assert (after - before).abs().max() < 1e-4


def test_rotation_is_an_option_of_rtn_and_gptq(single_thread):  # noqa: F811
    calibration = reference_calibration(n_batches=1)
    for config_type in (RTNConfig, GPTQConfig):
        config = config_type(spec=W8A8, rotation="hadamard")
        assert config_type.from_dict(config.to_dict()) == config
        policy, reference = tiny_reference_policy(), tiny_reference_policy()
        record = quantize_policy(policy, config, calibration)
        assert record.decisions["rotation"]["streams"]["backbone"]["width"] == 32
        # W8A8 after an exact rotation: about as close to the float model as without it
        plain = tiny_reference_policy()
        quantize_policy(plain, dataclasses.replace(config, rotation=None), calibration)
        fp = _chunks(reference, calibration)
        err = (_chunks(policy, calibration) - fp).norm() / fp.norm()
        assert err < 2 * (_chunks(plain, calibration) - fp).norm() / fp.norm() + 0.01
        with pytest.raises(ValueError, match="rotation must be one of"):
            config_type(spec=W8A8, rotation="givens")
    plain = quantize_policy(tiny_reference_policy(), RTNConfig(spec=W8A8), calibration)
    assert "rotation" not in plain.decisions


def test_rotation_without_the_capability_is_a_clear_error_and_changes_nothing():
    from daptq.models.registry import load_policy

    toy = load_policy("toy")
    before = {k: v.clone() for k, v in toy.model.state_dict().items()}
    with pytest.raises(ValueError, match="does not declare the 'rotation' capability"):
        quantize_policy(toy, RTNConfig(spec=QuantSpec(WeightSpec(8)), rotation="hadamard"))
    assert all(torch.equal(before[k], v) for k, v in toy.model.state_dict().items())


def test_check_adapter_names_a_wrong_rotation_declaration():
    class Broken(ReferenceAdapter):
        def rotation_layout(self):
            layout = super().rotation_layout()
            stream = dataclasses.replace(layout.streams[0], writers=("blocks.0.attn.qkv",))
            return dataclasses.replace(layout, streams=(stream,), value_output=("nope",))

    adapter = Broken(tiny_reference_policy().model)
    with pytest.raises(ValueError) as e:
        check_adapter(adapter)
    assert "writer 'blocks.0.attn.qkv'" in str(e.value) and "'nope'" in str(e.value)


def test_a_saved_rotated_policy_reloads_bit_exact(tmp_path, single_thread):  # noqa: F811
    from daptq.models.quantized import load_quantized_policy, model_digest, save_quantized_policy

    calibration = reference_calibration(n_batches=1)
    policy = tiny_reference_policy()
    provenance = {"spec": "tiny-ref", "digest": model_digest(policy.model)}
    config = RTNConfig(spec=W8A8, rotation="hadamard")
    record = quantize_policy(policy, config, calibration, base_model=provenance)
    out = save_quantized_policy(
        policy, record, tmp_path / "q", "tiny-ref", self_contained=True, base_factory=tiny_reference_policy
    )
    loaded = load_quantized_policy(out, base_factory=lambda: tiny_reference_policy(seed=1))
    assert torch.equal(_chunks(loaded, calibration), _chunks(policy, calibration))
    assert loaded.quant_record.decisions["rotation"]["kind"] == "hadamard"


def test_cli_rotate_and_step_scales_options():
    from daptq.cli import build_parser
    from daptq.methods.workflow import config_from_options

    args = build_parser().parse_args(
        ["quantize", "toy", "--method", "gptq", "--w-bits", "4", "--rotate", "--step-scales", "--out", "x"]
    )
    assert (args.method_rotation, args.method_step_scales) == ("hadamard", True)
    options = {"rotation": "hadamard", "step_scales": True}
    config = config_from_options("gptq", w_bits=4, method_options=options)
    assert config.rotation == "hadamard" and config.step_scales is True
    with pytest.raises(ValueError, match="has no option 'rotation'"):
        config_from_options("smoothquant", w_bits=4, method_options={"rotation": "hadamard"})


def test_rotated_tiny_cogact_equals_the_original(tmp_path, single_thread):  # noqa: F811
    """A second family: the Llama stream of a tiny CogACT (RMSNorm, GQA-capable separate q/k/v, an
    embedding table, the projector writing patches in, the final norm read by the DiT's condition layer and
    its classifier-free-guidance substitute). Declared here on a subclass of the family's adapter."""
    import numpy as np

    from daptq.models.adapter import NormReaders, ResidualStream, RotationLayout
    from daptq.models.cogact import load_cogact
    from daptq.models.cogact.adapter import CogACTAdapter
    from daptq.models.cogact.testing import write_tiny_run

    class RotatableCogACT(CogACTAdapter):
        capabilities = CogACTAdapter.capabilities | {"rotation"}

        def rotation_layout(self) -> RotationLayout:
            llm = "llm_backbone.llm.model"
            layers = [f"{llm}.layers.{i}" for i in range(len(self.model.llm_backbone.llm.model.layers))]
            stream = ResidualStream(
                "llm",
                self.model.config.hidden_size,
                writers=(
                    "projector.projector.4",
                    *(f"{b}.{m}" for b in layers for m in ("self_attn.o_proj", "mlp.down_proj")),
                ),
                norms=(
                    *(
                        NormReaders(f"{b}.input_layernorm", tuple(f"{b}.self_attn.{p}_proj" for p in "qkv"))
                        for b in layers
                    ),
                    *(
                        NormReaders(
                            f"{b}.post_attention_layernorm", (f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj")
                        )
                        for b in layers
                    ),
                    NormReaders(
                        f"{llm}.norm",
                        ("action_model.net.z_embedder.linear", "llm_backbone.llm.lm_head"),
                        substitutes=("action_model.net.z_embedder.uncondition",),
                    ),
                ),
                embeddings=(f"{llm}.embed_tokens.weight",),
            )
            return RotationLayout((stream,), tuple(a.name for a in self.attention_layouts()))

    run = write_tiny_run(tmp_path / "run")
    policy, reference = load_cogact(run), load_cogact(run)
    policy.adapter.__class__ = RotatableCogACT  # the declaration under test, on the family's own adapter
    check_adapter(policy.adapter)
    r = np.random.default_rng(0)
    raw = {
        "image": r.integers(0, 256, (3, 36, 44, 3), dtype=np.uint8),
        "state": np.zeros((3, 4), np.float32),
        "instruction": ["pick the coke can", "open the drawer", "put spoon on towel"],
    }
    batch = next(reference.adapter.calibration_batches(iter([raw])))
    before = reference.adapter.predict_chunk(batch, torch.Generator().manual_seed(7))
    record = rotate_model(policy.adapter)
    assert record["streams"]["llm"]["readers"] == 2 * (3 + 2) + 2  # q, k, v, gate, up per layer; 2 last
    llm = policy.model.llm_backbone.llm.model
    assert not torch.equal(
        llm.layers[0].self_attn.q_proj.weight,
        reference.model.llm_backbone.llm.model.layers[0].self_attn.q_proj.weight,
    )
    after = policy.adapter.predict_chunk(batch, torch.Generator().manual_seed(7))
    assert (after - before).abs().max() < 1e-4 * max(1.0, float(before.abs().max()))


def test_rotation_is_an_option_of_daptq_budget(single_thread):  # noqa: F811
    from daptq.methods.daptq import DAPTQConfig

    config = DAPTQConfig.budget(average_bits=6.0, sensitivity_batches=1, csrc_max_iter=5, rotation="hadamard")
    assert DAPTQConfig.from_dict(config.to_dict()) == config
    record = quantize_policy(tiny_reference_policy(), config, reference_calibration(n_batches=1))
    assert record.decisions["rotation"]["streams"]["backbone"]["width"] == 32
    with pytest.raises(ValueError, match="DAPTQConfig.rotation must be one of"):
        DAPTQConfig(rotation="random")
