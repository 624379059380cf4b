"""GR00T N1.x: the checkpoint directory (sharded safetensors + index, config, experiment_cfg/metadata.json)
read key for key and refused when it does not match, the embodiment-specific CategorySpecificLinear and its
registered quantized type (bytes, save, load, inspect; an unregistered module type is refused), the adapter's
declarations, and every registered method on the tiny model."""

from __future__ import annotations

import copy
import functools
import json

import numpy as np
import pytest
import torch
from family_helpers import check_method, method_configs
from safetensors.torch import load_file, save_file
from torch import nn

from daptq.models.adapter import check_adapter
from daptq.models.gr00t import Gr00tAdapter, embodiment_from_metadata, load_gr00t
from daptq.models.gr00t.testing import tiny_gr00t, tiny_metadata, write_tiny_checkpoint
from daptq.quant.category import CategorySpecificLinear, QuantCategorySpecificLinear
from daptq.sources import available_sources, load_policy

# SQNR of the sampled chunk (same noise) at W8A8 against FP, dB; every method must reach it. Measured on the
# tiny N1.5 model (one-Linear connector, 16 patch tokens per image; `pytest -s -k every_method`): RTN 47.0,
# GPTQ 47.3, SmoothQuant 46.4, AWQ 46.7, QuantVLA 64.0, QVLA 47.5, DA-PTQ paper 47.0, DA-PTQ budget 44.2
# (8 bits on average, its allocation over the category-specific layers included).
MIN_SQNR_DB = 20.0
CSL = (
    "state_encoder.layer1",
    "state_encoder.layer2",
    "action_encoder.W1",
    "action_encoder.W2",
    "action_encoder.W3",
    "action_decoder.layer1",
    "action_decoder.layer2",
)


@functools.cache
def _tokenizer():
    from daptq.models.cogact.testing import tiny_tokenizer

    return tiny_tokenizer()


@functools.cache
def _base():
    return tiny_gr00t()


def _adapter(model=None) -> Gr00tAdapter:
    return Gr00tAdapter(
        copy.deepcopy(model or _base()), embodiment_from_metadata(tiny_metadata(), None), _tokenizer()
    )


def _raw(seed: int, b: int = 3) -> dict:
    r = np.random.default_rng(seed)
    return {
        "image": r.integers(0, 255, (b, 32, 36, 3), dtype=np.uint8),
        "state": (r.normal(size=(b, 7)) * 0.3).astype(np.float32),
        "instruction": ["pick up the red cup"] * b,  # same length: GR00T's cross-attention reads padding too
        "actions": (r.normal(size=(b, 4, 8)) * 0.3).astype(np.float32),
    }


def _chunks(adapter) -> torch.Tensor:
    batch = next(adapter.calibration_batches(iter([_raw(99, 4)])))
    return adapter.predict_chunk(batch, torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gr00t") / "run")


def test_checkpoint_has_the_original_layout(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    e = "backbone.eagle_model."
    assert f"{e}vision_model.vision_model.encoder.layers.1.self_attn.q_proj.weight" in index
    assert {
        f"{e}mlp1.0.weight",  # N1.5's one-Linear connector (N1: LayerNorm, Linear, GELU, Linear)
        f"{e}language_model.model.layers.1.self_attn.q_norm.weight",
    } <= set(index)
    assert not any("lm_head" in k for k in index)  # GR00T drops the LLM head
    assert "action_head.model.transformer_blocks.0.attn1.to_out.0.weight" in index
    assert "action_head.model.transformer_blocks.0.ff.net.0.proj.weight" in index
    assert "action_head.vl_self_attention.transformer_blocks.0.norm1.weight" in index
    assert {
        "action_head.action_encoder.W2.W",
        "action_head.state_encoder.layer1.b",
        "action_head.future_tokens.weight",
        "action_head.position_embedding.weight",
    } <= set(index)
    tensors = load_file(str(ckpt / index["action_head.action_encoder.W2.W"]))
    assert tuple(tensors["action_head.action_encoder.W2.W"].shape) == (32, 128, 64)  # [categories, in, out]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert (
        cfg["model_type"] == "gr00t_n1_5" and cfg["action_head_cfg"]["diffusion_model_cfg"]["num_layers"] == 4
    )
    assert "new_embodiment" in json.loads((ckpt / "experiment_cfg" / "metadata.json").read_text())


def test_cross_attention_key_dims_follow_interleaving():
    dit = _base().action_head.model
    assert dit.cross_blocks() == [0, 2]
    assert dit.transformer_blocks[0].attn1.to_k.in_features == 64  # backbone width (cross_attention_dim)
    assert dit.transformer_blocks[1].attn1.to_k.in_features == 64  # self-attention: the DiT width


def test_loader_round_trips_and_resolves_the_spec(ckpt):
    assert "gr00t" in available_sources()
    policy = load_policy(f"gr00t:{ckpt}")
    for k, v in _base().state_dict().items():
        assert torch.equal(policy.model.state_dict()[k], v), k
    assert torch.equal(_chunks(policy.adapter), _chunks(_adapter()))
    with pytest.raises(ValueError, match="unknown options"):
        load_policy(f"gr00t:{ckpt}?unnorm_key=x")
    with pytest.raises(ValueError, match="no embodiment 'gr1'"):
        load_policy(f"gr00t:{ckpt}?embodiment=gr1")


def _rewrite(d, edit):
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = edit(load_file(str(d / shard)))
        save_file(tensors, str(d / shard))
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_file.write_text(json.dumps(index))


def test_refuses_a_renamed_key_and_a_wrong_shape(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "a")
    key = "action_head.action_decoder.layer2.W"
    _rewrite(d, lambda t: {(k + "eight" if k == key else k): v for k, v in t.items()})
    with pytest.raises(
        ValueError,
        match=r"GR00T architecture: 1 missing: action_head\.action_decoder\.layer2\.W \| 1 unexpected",
    ):
        load_gr00t(d)
    d = write_tiny_checkpoint(tmp_path / "b")
    _rewrite(d, lambda t: {k: (v[:, :, :-1].contiguous() if k == key else v) for k, v in t.items()})
    with pytest.raises(
        ValueError,
        match=r"mis-shaped: action_head\.action_decoder\.layer2\.W: file \(32, 48, 7\), model \(32, 48, 8\)",
    ):
        load_gr00t(d)
    (d / "experiment_cfg" / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        load_gr00t(d)


def test_select_action_returns_joint_targets(ckpt):
    policy = load_gr00t(ckpt, n_action_steps=2)
    assert policy.action_space.control == "joint" and policy.action_space.dim == 8
    assert policy.action_space.kinds[-1] == "gripper" and policy.action_space.names[0] == "arm.0"
    obs = {
        "image": np.full((30, 30, 3), 70, np.uint8),
        "state": np.zeros(7, np.float32),
        "instruction": "open",
    }
    policy.reset(seed=1)
    got = np.stack([policy.select_action(obs) for _ in range(2)])
    normalized = policy.adapter.predict_chunk(policy.observation_batch(obs), torch.Generator().manual_seed(1))
    want = policy.embodiment.action.unnormalize(normalized[0, :2].numpy())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="state has 4 values"):
        policy.reset()
        policy.select_action({**obs, "state": np.zeros(4)})


def test_adapter_declarations():
    adapter = check_adapter(_adapter())
    mods = {m.name: m for m in adapter.quantizable_modules()}
    for n in CSL:
        m = mods[f"action_head.{n}"]
        assert (m.role, m.meta["kind"]) == ("action_head", "category_linear"), n
    ifaces = {i.name for i in adapter.interface_modules()}
    assert ifaces == {f"action_head.model.transformer_blocks.{i}.attn1.to_{p}" for i in (0, 2) for p in "kv"}
    assert all(mods[n].role == "interface" and mods[n].stack == "dit" for n in ifaces)
    assert mods["action_head.model.transformer_blocks.1.attn1.to_k"].role == "action_head"
    assert mods["action_head.model.transformer_blocks.3.ff.net.2"].block == 3
    assert mods["backbone.eagle_model.mlp1.0"].role == "backbone"
    assert mods["backbone.eagle_model.language_model.model.layers.1.mlp.up_proj"].stack == "backbone"
    assert mods["backbone.eagle_model.vision_model.vision_model.encoder.layers.0.mlp.fc1"].role == "vision"
    assert adapter.objective_kind == "flow_matching"


def test_sampler_is_differentiable_and_the_objective_weights_dimensions():
    adapter = _adapter()
    batch = next(adapter.calibration_batches(iter([_raw(1, 2)])))
    out = adapter.sample(batch, torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8)
    out.sum().backward()
    assert adapter.model.action_head.action_decoder.layer2.W.grad is not None
    with torch.no_grad():
        loss = lambda w: adapter.objective(batch, w, torch.Generator().manual_seed(3))  # noqa: E731
        w = torch.zeros(8)
        w[0] = 8.0
        assert float(loss(None)) > 0 and not torch.isclose(loss(None), loss(w))
        assert torch.equal(loss(None), loss(None))
        torch.testing.assert_close(loss(torch.ones(8)), loss(None))


# ---- the registered quantized type -----------------------------------------------------------------------
def test_category_linear_quantizes_per_category_and_channel():
    from daptq.quant import QuantSpec, WeightSpec

    torch.manual_seed(0)
    f = CategorySpecificLinear(3, 16, 5)
    with torch.no_grad():
        f.W.normal_()
        f.W[1] *= 100.0  # a category with a much larger range must not coarsen the others' grid
    q = QuantCategorySpecificLinear(f, QuantSpec(WeightSpec(8), None), "layer")
    q.requantize()
    assert tuple(q.weight_scale.shape) == (15, 1)  # one scale per (category, output channel)
    x, ids = torch.randn(3, 2, 16), torch.tensor([0, 2, 0])
    with torch.no_grad():
        ref = f(x, ids)
        err = (q(x, ids) - ref).pow(2).sum() / ref.pow(2).sum()
    assert float(err) < 1e-4
    for c in range(3):  # each category's rows are rounded on their own scales
        w = f.W[c].T
        want = (w.abs().amax(dim=1) / 127).to(q.weight_scale.dtype)
        torch.testing.assert_close(q.weight_scale[c * 5 : (c + 1) * 5, 0], want, rtol=1e-2, atol=0)


def test_scope_refuses_a_module_no_handler_serves():
    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.models.adapter import QuantizableModule

    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.zeros(2, 3, 4))

    adapter = _adapter()
    adapter.model.action_head.mystery = Mystery()
    declared = adapter.quantizable_modules()
    adapter.quantizable_modules = lambda: [
        *declared,
        QuantizableModule("action_head.mystery", adapter.model.action_head.mystery, "action_head"),
    ]
    with pytest.raises(
        ValueError, match=r"action_head\.mystery: a Mystery; only Linear/Conv2d and registered"
    ):
        quantize_policy(adapter, RTNConfig())


def test_registered_type_bytes_save_load_and_inspect(ckpt, tmp_path):
    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.workflow import inspect_text
    from daptq.models.quantized import load_quantized_policy, model_digest, save_quantized_policy
    from daptq.quant import QuantSpec, WeightSpec
    from daptq.quant.bytes import model_bytes
    from daptq.quant.spec import ActivationSpec

    spec = f"gr00t:{ckpt}"
    policy = load_policy(spec)
    record = quantize_policy(
        policy,
        RTNConfig(spec=QuantSpec(WeightSpec(4), ActivationSpec(8))),
        base_model={"spec": spec, "digest": model_digest(policy.model)},
    )
    names = [f"action_head.{n}" for n in CSL]
    for n in names:
        assert isinstance(policy.model.get_submodule(n), QuantCategorySpecificLinear)
        assert record.modules[n].kind == "CategorySpecificLinear"
        assert "registered quantized type" in record.decisions["registered_types"][n]
    rows = {r.name: r for r in model_bytes(policy.model).rows}
    w2 = rows["action_head.action_encoder.W2"]
    assert w2.kind == "QuantCategorySpecificLinear" and w2.shape == (32 * 64, 128)
    assert w2.stored_bytes < w2.fp16_bytes / 3  # 4-bit codes
    q = _chunks(policy.adapter)
    for self_contained in (False, True):
        out = save_quantized_policy(
            policy, record, tmp_path / f"q{self_contained}", spec, self_contained=self_contained
        )
        loaded = load_quantized_policy(out)
        assert isinstance(loaded.model.get_submodule(names[0]), QuantCategorySpecificLinear)
        assert torch.equal(_chunks(loaded.adapter), q)
    text = inspect_text(tmp_path / "qTrue")
    assert "action_head.action_encoder.W2" in text and "CategorySpecificLinear" in text


@pytest.mark.parametrize("name", sorted(method_configs()))
def test_every_method(name):
    out = check_method(
        name, method_configs()[name], _adapter, [_raw(100 + i) for i in range(3)], _chunks, MIN_SQNR_DB
    )
    record, adapter = out["record"], out["adapter"]
    csl = {f"action_head.{n}" for n in CSL}
    quantized_csl = csl & set(record.modules)
    if name != "quantvla":  # QuantVLA's layout keeps the head's non-MLP layers float (recorded)
        assert quantized_csl == csl
        assert all(isinstance(adapter.model.get_submodule(n), QuantCategorySpecificLinear) for n in csl)
    if name == "daptq":  # the last two DiT blocks, from the adapter's "dit" stack
        last = {
            m.name
            for m in adapter.quantizable_modules()
            if m.stack == "dit" and m.block >= 2 and m.role == "action_head"  # interfaces: CSRC's targets
        }
        assert set(record.decisions["float_by_block"]) == last
    print(name, f"{out['sqnr']:.1f} dB")


def test_n1_names_and_llama_backbone_round_trip(tmp_path):
    """GR00T N1 keeps the Eagle model under ``backbone.model`` (SmolLM2: a Llama); N1.5 under
    ``backbone.eagle_model`` (Qwen3)."""
    d = write_tiny_checkpoint(tmp_path / "n1", model_type="gr00t_n1", llm_type="llama")
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert "backbone.model.language_model.model.layers.0.mlp.up_proj.weight" in index
    assert not any(k.startswith("backbone.eagle_model.") or "q_norm" in k for k in index)
    policy = load_gr00t(d)
    want = tiny_gr00t(model_type="gr00t_n1", llm_type="llama").state_dict()
    assert all(torch.equal(policy.model.state_dict()[k], v) for k, v in want.items())
    check_adapter(policy.adapter)


def test_category_linear_groups_and_static_activations():
    """Per-group rounding runs along each category's inputs; a static per-tensor activation spec has no
    per-category scale, so the scope is refused at planning, naming the layer."""
    from daptq.data.calibration import CalibrationSet
    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.quant import QuantSpec, WeightSpec
    from daptq.quant.spec import ActivationSpec

    f = CategorySpecificLinear(3, 16, 5)
    q = QuantCategorySpecificLinear(
        f, QuantSpec(WeightSpec(4, granularity="per_group", group_size=8), None), "g"
    )
    q.requantize()
    assert tuple(q.weight_scale.shape) == (15, 2)
    static = QuantSpec(WeightSpec(8), ActivationSpec(8, mode="static_per_tensor"))
    with pytest.raises(
        ValueError, match=r"action_head\.state_encoder\.layer1: a CategorySpecificLinear takes"
    ):
        quantize_policy(_adapter(), RTNConfig(spec=static), CalibrationSet([_raw(1)], {"source": "test"}))


def _released_config(model_type: str) -> dict:
    """A released checkpoint's ``config.json`` fields the loader reads (GR00T-N1.5-3B's action head)."""
    head = {
        "action_dim": 32,
        "action_horizon": 16,
        "max_state_dim": 64,
        "hidden_size": 1024,
        "input_embedding_dim": 1536,
        "backbone_embedding_dim": 2048,
        "diffusion_model_cfg": {
            "num_attention_heads": 32,
            "attention_head_dim": 48,
            "output_dim": 1024,
            "num_layers": 16,
            "interleave_self_attention": True,
            "cross_attention_dim": 2048,
            "positional_embeddings": None,
        },
        "vl_self_attention_cfg": {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 4},
    }
    backbone = {"select_layer": 12, "project_to_dim": None}
    if model_type == "gr00t_n1_5":
        backbone["eagle_path"] = "NVEagle/eagle_er-qwen3_1_7B-Siglip2_400M_stage1_5_128gpu_er_v7_1mlp_nops"
    return {"model_type": model_type, "backbone_cfg": backbone, "action_head_cfg": head}


@pytest.mark.parametrize(
    ("model_type", "tokens", "connector"),
    [
        # N1.5 (Eagle 2.5, "1mlp_nops"): 256 patch tokens, mlp1 = (Linear 1152 -> 2048,)
        ("gr00t_n1_5", 256, {"mlp1.0.weight": (2048, 1152), "mlp1.0.bias": (2048,)}),
        # N1 (Eagle 2): pixel shuffle 0.5 -> 64 tokens of 4 x 1152, mlp1 = (LayerNorm, Linear, GELU, Linear)
        (
            "gr00t_n1",
            64,
            {"mlp1.0.weight": (4608,), "mlp1.1.weight": (2048, 4608), "mlp1.3.weight": (2048, 2048)},
        ),
    ],
)
def test_released_configs_give_the_checkpoint_shapes(model_type, tokens, connector):
    """The layout is detected from ``config.json``'s ``model_type``; the shapes are the released checkpoints'
    (N1.5: Conv2d patch embedding [1152, 3, 14, 14], positions [256, 1152], mlp1.0 [2048, 1152])."""
    from daptq.models.gr00t.config import Gr00tConfig
    from daptq.models.gr00t.model import Gr00tN1

    c = Gr00tConfig.from_checkpoint_config(_released_config(model_type))
    assert c.tokens_per_image == tokens
    with torch.device("meta"):
        model = Gr00tN1(c)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    e = f"backbone.{'eagle_model' if model_type == 'gr00t_n1_5' else 'model'}."
    v = f"{e}vision_model.vision_model.embeddings."
    assert shapes[f"{v}patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes[f"{v}position_embedding.weight"] == (256, 1152)
    assert {k: s for k, s in shapes.items() if k.startswith(f"{e}mlp1.")} == {
        f"{e}{k}": s
        for k, s in {
            **connector,
            **{k.replace("weight", "bias"): s[:1] for k, s in connector.items()},
        }.items()
    }


def test_n15_connector_round_trips_and_an_n1_connector_is_refused(tmp_path):
    """A tiny N1.5 directory reads back tensor for tensor, its image tokens are the SigLIP patches; an
    N1-style connector (``mlp1.1``) or a pixel-shuffled input width in an N1.5 directory is refused."""
    d = write_tiny_checkpoint(tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["backbone_cfg"]["eagle_path"].endswith("_1mlp_nops")
    policy = load_gr00t(d)
    assert policy.config.tokens_per_image == 16  # 28 px / 7 px patches, no pixel shuffle
    for k, v in _base().state_dict().items():
        assert torch.equal(policy.model.state_dict()[k], v), k
    e = "backbone.eagle_model.mlp1."
    _rewrite(d, lambda t: {k.replace(f"{e}0.", f"{e}1."): v for k, v in t.items()})
    with pytest.raises(ValueError, match=rf"2 missing: {e}0\.weight; {e}0\.bias \| 2 unexpected: {e}1\."):
        load_gr00t(d)
    d = write_tiny_checkpoint(tmp_path / "b")
    _rewrite(d, lambda t: {k: (v.repeat(1, 4) if k == f"{e}0.weight" else v) for k, v in t.items()})
    with pytest.raises(ValueError, match=rf"mis-shaped: {e}0\.weight: file \(64, 128\), model \(64, 32\)"):
        load_gr00t(d)


def test_packed_int4_deployment_samples_like_the_fake_quant_model():
    """``to_deployable_`` swaps layers for int4 kernels that have no float ``weight``; the model must not read
    one (GR00T's timestep encoder took its dtype from ``linear_1.weight``: the packed call crashed)."""
    from daptq.quant import QuantSpec, WeightSpec, quantize_, to_deployable_

    adapter = _adapter()
    spec = QuantSpec(weight=WeightSpec(bits=4, granularity="per_group", group_size=32, symmetric=True))
    name = "action_head.model.timestep_encoder.timestep_embedder.linear_1"
    quantize_(adapter.model, {name: spec})
    fake = _chunks(adapter)
    report = to_deployable_(adapter.model)
    assert not hasattr(adapter.model.get_submodule(name), "weight"), report
    packed = _chunks(adapter)
    assert packed.shape == fake.shape
    assert torch.allclose(packed, fake, atol=0.05), (packed - fake).abs().max()
