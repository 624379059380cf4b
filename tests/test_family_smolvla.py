"""SmolVLA (lerobot's SmolVLM + interleaved cross/self-attention expert): the module tree with lerobot's
names, the checkpoint layout read key for key (and refused when it does not match), the adapter's
declarations and every registered method on the tiny model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from lerobot_vla_helpers import adapter_of, base_model, check_method, raw_batch
from safetensors.torch import load_file, save_file

from daptq.models.adapter import check_adapter
from daptq.models.lerobot_vla import LeRobotVLAConfig, load_lerobot, load_lerobot_checkpoint
from daptq.models.lerobot_vla.checkpoint import save_lerobot_checkpoint
from daptq.models.lerobot_vla.testing import tiny_model, tiny_statistics, write_tiny_checkpoint
from daptq.sources import load_policy

VLM = "vlm_with_expert.vlm.model."
EXPERT = "vlm_with_expert.lm_expert.layers."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("smolvla"), "smolvla")


def test_released_config_is_smolvlm2_cut_to_16_layers_with_a_075_expert(tmp_path):
    raw = {
        "type": "smolvla",
        "output_features": {"action": {"type": "ACTION", "shape": [6]}},
        "input_features": {"observation.state": {"type": "STATE", "shape": [6]}},
    }
    c = LeRobotVLAConfig.from_lerobot(raw)
    assert (c.text.hidden, c.text.layers, c.text.heads, c.text.kv_heads) == (960, 16, 15, 5)
    assert (c.expert.hidden, c.expert.intermediate, c.expert.layers) == (720, 2048, 16)
    assert [c.is_cross_layer(j) for j in range(4)] == [False, True, False, True]
    assert c.vision.image == 512 and c.scale_factor == 4
    # a local copy of the VLM's config.json overrides the built-in SmolVLM2-500M sizes
    vlm = {
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 8,
            "vocab_size": 100,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "patch_size": 8,
            "image_size": 64,
        },
        "scale_factor": 2,
    }
    c2 = LeRobotVLAConfig.from_lerobot({**raw, "num_vlm_layers": 4, "num_expert_layers": 2}, vlm)
    assert (c2.text.hidden, c2.text.layers, c2.text.head_dim, c2.expert.layers, c2.expert.hidden) == (
        64,
        4,
        16,
        2,
        48,
    )
    assert [c2.expert_layer_of(i) for i in range(4)] == [0, None, 1, None]


def test_checkpoint_has_lerobots_layout(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    c = tiny_model("smolvla").config
    assert all(k.startswith("model.") for k in tensors)
    assert f"model.{VLM}vision_model.encoder.layers.0.self_attn.q_proj.weight" in tensors
    assert f"model.{VLM}connector.modality_projection.proj.weight" in tensors
    assert f"model.{VLM}text_model.layers.{c.text.layers - 1}.mlp.up_proj.weight" in tensors
    assert f"model.{VLM}text_model.layers.{c.text.layers}.mlp.up_proj.weight" not in tensors  # layers cut
    assert "model.vlm_with_expert.vlm.lm_head.weight" in tensors  # SmolVLM does not tie it
    assert not any("lm_expert.embed_tokens" in k for k in tensors)
    cross = tensors[f"model.{EXPERT}1.self_attn.k_proj.weight"]  # VLM kv width -> expert kv width
    assert tuple(cross.shape) == (c.expert.kv_heads * c.expert.head_dim, c.text.kv_heads * c.text.head_dim)
    own = tensors[f"model.{EXPERT}0.self_attn.k_proj.weight"]  # self-attention layer: from the expert's width
    assert own.shape[1] == c.expert.hidden
    assert (
        "model.state_proj.weight" in tensors
        and json.loads((ckpt / "config.json").read_text())["type"] == "smolvla"
    )


def test_loader_round_trips_the_checkpoint(ckpt):
    policy = load_policy(f"lerobot:{ckpt}")
    assert policy.config.type == "smolvla" and policy.meta["tied_weights"] == {}
    original = adapter_of(tiny_model("smolvla"))
    batch = next(original.calibration_batches(iter([raw_batch(5, 3)])))
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert torch.equal(original.predict_chunk(batch, g()), policy.adapter.predict_chunk(batch, g()))
    obs = {"image": np.zeros((30, 50, 3), np.uint8), "state": np.zeros(8, np.float32), "instruction": "push"}
    policy.reset(seed=2)
    a = policy.select_action(obs)
    assert a.shape == (7,) and np.isfinite(a).all()


def _rewrite(d, edit):
    save_file(edit(load_file(str(d / "model.safetensors"))), str(d / "model.safetensors"))


def test_loader_refuses_a_renamed_key_and_a_wrong_shape(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "a", "smolvla")
    key = f"model.{EXPERT}1.self_attn.v_proj.weight"
    _rewrite(d, lambda t: {(key.replace("v_proj", "value") if k == key else k): v for k, v in t.items()})
    with pytest.raises(ValueError, match=r"1 missing: .*layers\.1\.self_attn\.v_proj\.weight; 1 unexpected"):
        load_lerobot_checkpoint(d)
    d = write_tiny_checkpoint(tmp_path / "b", "smolvla")
    _rewrite(d, lambda t: {k: (v[:, :-1].contiguous() if k == key else v) for k, v in t.items()})
    with pytest.raises(
        ValueError, match=r"mis-shaped: .*layers\.1\.self_attn\.v_proj\.weight: file \(16, 15\)"
    ):
        load_lerobot_checkpoint(d)


def test_a_tied_smolvlm_refuses_a_tied_weight_mismatch(tmp_path):
    model = tiny_model("smolvla", tie_word_embeddings=True)
    vlm = model.vlm_with_expert.vlm
    assert vlm.lm_head.weight is vlm.model.text_model.embed_tokens.weight
    d = save_lerobot_checkpoint(model, tmp_path / "t", tiny_statistics(model.config), store_tied="both")
    assert load_lerobot_checkpoint(d).tie["stored"] == [
        "vlm_with_expert.vlm.lm_head.weight",
        f"{VLM}text_model.embed_tokens.weight",
    ]
    head = "model.vlm_with_expert.vlm.lm_head.weight"
    _rewrite(d, lambda t: {k: (v * 2 if k == head else v) for k, v in t.items()})
    with pytest.raises(ValueError, match="tied weights differ"):
        load_lerobot_checkpoint(d)


def test_adapter_declarations():
    adapter = check_adapter(adapter_of(base_model("smolvla")))
    c = adapter.config
    mods = {m.name: m for m in adapter.quantizable_modules()}
    assert (mods["state_proj"].role, mods["state_proj"].stream) == ("backbone", "prefix")
    assert (
        mods[f"{VLM}text_model.layers.0.self_attn.k_proj"].role,
        mods[f"{VLM}text_model.layers.0.mlp.up_proj"].stack,
    ) == ("backbone", "backbone")
    assert mods[f"{VLM}connector.modality_projection.proj"].role == "backbone"
    assert mods[f"{VLM}vision_model.embeddings.patch_embedding"].meta["kind"] == "conv2d"
    assert mods[f"{EXPERT}0.self_attn.k_proj"].role == "action_head"  # a self-attention layer's own keys
    assert (mods[f"{EXPERT}1.self_attn.k_proj"].role, mods[f"{EXPERT}1.self_attn.k_proj"].stream) == (
        "interface",
        "expert",
    )
    last = f"{VLM}text_model.layers.{c.text.layers - 1}"
    assert f"{last}.self_attn.q_proj" not in mods and f"{last}.self_attn.k_proj" in mods
    iface = adapter.interface_modules()
    assert [i.name for i in iface] == [f"{EXPERT}{j}.self_attn.{w}_proj" for j in (1, 3) for w in "kv"]
    assert {(i.kind, i.fold) for i in iface} == {("prefix_kv", "exact")}  # no rotary after the cross keys
    assert adapter.objective_kind == "flow_matching" and adapter.action_space.dim == 7


def test_fewer_expert_layers_than_vlm_layers_sample(tmp_path):
    model = tiny_model(
        "smolvla", expert=tiny_model("smolvla").config.expert.__class__(24, 256, 4, 2, 8, 2, 64, 1e-5)
    )
    adapter = check_adapter(adapter_of(model))
    assert [model.config.expert_layer_of(i) for i in range(4)] == [0, None, 1, None]
    batch = next(adapter.calibration_batches(iter([raw_batch(3, 2)])))
    out = adapter.sample(batch, torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 7) and torch.isfinite(out).all()
    out.sum().backward()  # differentiable through every Euler step
    assert model.vlm_with_expert.lm_expert.layers[1].self_attn.k_proj.weight.grad is not None


def test_objective_weights_dimensions():
    adapter = adapter_of(copy.deepcopy(base_model("smolvla")))
    batch = next(adapter.calibration_batches(iter([raw_batch(1, 2)])))
    with torch.no_grad():
        loss = lambda w: adapter.objective(batch, w, torch.Generator().manual_seed(3))  # noqa: E731
        w = torch.zeros(7)
        w[6] = 7.0
        assert torch.equal(loss(None), loss(None)) and not torch.isclose(loss(None), loss(w))
        with pytest.raises(ValueError, match="expected \\(7,\\)"):
            loss(torch.ones(3))


def _method_configs():
    from test_generic_adapter import small_configs

    return small_configs()


@pytest.mark.parametrize("name", sorted(_method_configs()))
def test_every_method_on_smolvla(name):
    out = check_method("smolvla", name, _method_configs()[name])
    record, adapter = out["record"], out["adapter"]
    if name == "daptq":  # "float the last two DiT blocks" = the expert's last two layers
        n = adapter.config.expert.layers
        last = {m.name for m in adapter.quantizable_modules() if m.stack == "expert" and m.block >= n - 2}
        iface = {i.name for i in adapter.interface_modules()}
        # ... but for their cross-attention k/v: the interface stays quantized (CSRC compensates it)
        assert set(record.decisions["float_by_block"]) == last - iface and last & iface
        assert last & iface <= set(record.modules)
    if name.startswith("daptq"):  # CSRC folds into the cross-attention k/v exactly: no restriction
        assert "csrc_restricted" not in record.decisions
        assert {i.name for i in adapter.interface_modules()} <= set(record.decisions["compensation"])
    if name == "quantvla":
        assert all(a.startswith(EXPERT) for a in record.decisions["attention_modules"])


def test_lerobot_spec_options(ckpt):
    p = load_lerobot(ckpt, n_action_steps=1)
    assert p.n_action_steps == 1
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_policy(f"lerobot:{ckpt}?dtype=int8")


def test_cli_quantize_inspect_and_load_back(ckpt, tmp_path, capsys):
    from daptq.cli import main

    out = tmp_path / "q"
    assert main(["quantize", f"lerobot:{ckpt}", "--method", "rtn", "--w-bits", "8", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"| {EXPERT}1.self_attn.k_proj | interface |" in text and "| state_proj | backbone |" in text
    loaded = load_policy(str(out))
    assert loaded.config.type == "smolvla" and loaded.quant_record.method == "rtn"


def test_prefix_pass_matches_transformers_llama_layers():
    """The rebuilt prefix pass (lerobot's half-split RoPE at wavelength 1e4 in float32) equals SmolVLM's
    Llama layers run by transformers under the same block mask."""
    from lerobot_vla_helpers import prefix_matches_transformers_layers

    errs = prefix_matches_transformers_layers("smolvla")
    assert max(errs) < 1e-6, errs
