"""pi0 / pi0.5 (lerobot's PaliGemma + Gemma-expert flow-matching VLAs): the module tree with lerobot's names,
the checkpoint layout read key for key (and refused when it does not match), the tie of the LM head, the
adapter's declarations and every registered method on the tiny models."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from lerobot_vla_helpers import adapter_of, base_model, check_method, chunks, raw_batch
from safetensors.torch import load_file, save_file

from daptq.models.adapter import check_adapter
from daptq.models.lerobot_vla import LeRobotVLAConfig, load_lerobot, load_lerobot_checkpoint
from daptq.models.lerobot_vla.testing import tiny_model, write_tiny_checkpoint
from daptq.sources import available_sources, load_policy

PG = "model.paligemma_with_expert.paligemma."
HEAD, EMB = PG + "lm_head.weight", PG + "model.language_model.embed_tokens.weight"


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    write_tiny_checkpoint(d, request.param)
    return request.param, d


def _chunk(policy, seed: int = 3) -> torch.Tensor:
    batch = policy.adapter.model_inputs(
        np.full((2, 40, 30, 3), 90, np.uint8), ["pick up the red cup", "push"], np.zeros((2, 8), np.float32)
    )
    return policy.adapter.predict_chunk(batch, torch.Generator().manual_seed(seed))


def test_released_config_maps_to_paligemma_3b_and_gemma_300m():
    raw = {
        "type": "pi0",
        "output_features": {"action": {"type": "ACTION", "shape": [7]}},
        "input_features": {
            "observation.state": {"type": "STATE", "shape": [8]},
            "observation.images.image": {"type": "VISUAL", "shape": [3, 256, 256]},
        },
    }
    c = LeRobotVLAConfig.from_lerobot(raw)
    assert (c.text.hidden, c.text.layers, c.text.kv_heads, c.text.head_dim) == (2048, 18, 1, 256)
    assert (c.expert.hidden, c.expert.intermediate, c.vision.hidden, c.vision.image) == (
        1024,
        4096,
        1152,
        224,
    )
    assert c.num_steps == 10 and c.chunk_size == 50
    with pytest.raises(ValueError, match="'type' is 'act'"):
        LeRobotVLAConfig.from_lerobot({**raw, "type": "act"})


def test_checkpoint_has_lerobots_layout(ckpt):
    kind, d = ckpt
    keys = set(load_file(str(d / "model.safetensors")))
    assert all(k.startswith("model.") for k in keys)
    assert PG + "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.k_proj.weight" in keys
    assert HEAD in keys and EMB not in keys  # lerobot's files hold the head of the tied pair
    assert ("model.state_proj.weight" in keys) == (kind == "pi0")
    assert ("model.action_time_mlp_in.weight" in keys) == (kind == "pi0")
    assert ("model.time_mlp_in.weight" in keys) == (kind == "pi05")
    if kind == "pi05":  # adaptive RMSNorm of the expert
        assert "model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight" in keys
    assert json.loads((d / "config.json").read_text())["type"] == kind
    steps = json.loads((d / "policy_postprocessor.json").read_text())["steps"]
    assert steps[0]["registry_name"] == "unnormalizer_processor"
    assert "action.mean" in load_file(str(d / steps[0]["state_file"]))


def test_loader_round_trips_the_checkpoint(ckpt):
    kind, d = ckpt
    policy = load_policy(f"lerobot:{d}")
    assert policy.config.type == kind and "lerobot" in available_sources()
    original = adapter_of(tiny_model(kind))
    batch = next(original.calibration_batches(iter([raw_batch(5, 3)])))
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    assert torch.equal(original.predict_chunk(batch, g()), policy.adapter.predict_chunk(batch, g()))
    for k, v in tiny_model(kind).state_dict().items():
        assert torch.equal(policy.model.state_dict()[k], v), k
    pg = policy.model.paligemma_with_expert.paligemma
    assert pg.lm_head.weight is pg.model.language_model.embed_tokens.weight
    assert policy.meta["tied_weights"]["stored"] == [HEAD.removeprefix("model.")]
    assert set(policy.meta["files"]) >= {str(d / "config.json"), str(d / "model.safetensors")}


def test_openpi_converted_layout_and_legacy_statistics_load(tmp_path):
    """No 'model.' prefix, SigLIP under vision_tower.vision_model., time_mlp_* names, only the embedding of
    the tied pair, statistics as buffers inside model.safetensors (lerobot < 0.4): the same model."""
    d = write_tiny_checkpoint(tmp_path / "a", "pi0", store_tied="embed", legacy_statistics=True)
    tensors = load_file(str(d / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("model."):
            k = k.removeprefix("model.").replace(".vision_tower.", ".vision_tower.vision_model.")
            k = k.replace("action_time_mlp_", "time_mlp_")
        renamed[k] = v
    save_file(renamed, str(d / "model.safetensors"))
    ck = load_lerobot_checkpoint(d)
    assert any("openpi" in n for n in ck.key_notes) and "time_mlp_* -> action_time_mlp_*" in ck.key_notes
    assert ck.tie["stored"] == [EMB.removeprefix("model.")]
    assert set(ck.statistics.stats) == {"observation.state", "action"}
    for k, v in tiny_model("pi0").state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k


def _rewrite(d, edit):
    tensors = load_file(str(d / "model.safetensors"))
    save_file(edit(tensors), str(d / "model.safetensors"))


def test_loader_refuses_a_renamed_key(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "a", "pi0")
    key = "model.action_in_proj.weight"
    _rewrite(d, lambda t: {("model.action_in_projection.weight" if k == key else k): v for k, v in t.items()})
    with pytest.raises(
        ValueError, match=r"1 missing: action_in_proj\.weight; 1 unexpected: action_in_projection"
    ):
        load_lerobot_checkpoint(d)


def test_loader_refuses_a_wrong_shape(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "a", "pi0")
    key = "model.paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    _rewrite(d, lambda t: {k: (v[:-1] if k == key else v) for k, v in t.items()})
    with pytest.raises(ValueError, match=r"mis-shaped: .*layers\.1\.mlp\.up_proj\.weight: file \(47, 24\)"):
        load_lerobot_checkpoint(d)


def test_loader_refuses_a_tied_weight_mismatch(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "a", "pi0", store_tied="both")
    assert load_lerobot_checkpoint(d).tie["stored"] == [HEAD[6:], EMB[6:]]  # equal copies are accepted
    _rewrite(d, lambda t: {k: (v + 1e-3 if k == EMB else v) for k, v in t.items()})
    with pytest.raises(ValueError, match="tied weights differ"):
        load_lerobot_checkpoint(d)


def test_loader_refuses_missing_statistics_and_files(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "a", "pi0")
    for f in d.glob("policy_*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no normalization statistics for 'observation.state'"):
        load_lerobot_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lerobot_checkpoint(d)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_lerobot_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unknown options"):
        load_policy(f"lerobot:{d}?unnorm_key=x")


def test_tie_survives_quantize_save_and_load(ckpt, tmp_path):
    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.models.quantized import load_quantized_policy, model_digest, save_quantized_policy
    from daptq.quant import QuantSpec, WeightSpec
    from daptq.quant.spec import ActivationSpec

    kind, d = ckpt
    spec = f"lerobot:{d}"
    policy = load_policy(spec)
    config = RTNConfig(spec=QuantSpec(WeightSpec(4), ActivationSpec(8)))
    record = quantize_policy(policy, config, base_model={"spec": spec, "digest": model_digest(policy.model)})
    q = _chunk(policy)
    assert not torch.equal(q, _chunk(load_policy(spec)))
    for self_contained in (False, True):
        out = save_quantized_policy(
            policy, record, tmp_path / f"q{self_contained}", spec, self_contained=self_contained
        )
        loaded = load_quantized_policy(out)
        pg = loaded.model.paligemma_with_expert.paligemma
        assert pg.lm_head.weight is pg.model.language_model.embed_tokens.weight
        assert torch.equal(_chunk(loaded), q)


def test_select_action_returns_robot_units(ckpt):
    kind, d = ckpt
    policy = load_lerobot(d, n_action_steps=2)
    obs = {"image": np.zeros((64, 48, 3), np.uint8), "state": np.zeros(8, np.float32), "instruction": "open"}
    policy.reset(seed=1)
    first = [policy.select_action(obs) for _ in range(3)]
    policy.reset(seed=1)
    assert np.array_equal(np.stack(first), np.stack([policy.select_action(obs) for _ in range(3)]))
    normalized = policy.adapter.predict_chunk(policy.observation_batch(obs), torch.Generator().manual_seed(0))
    stats = policy.statistics.stats["action"]
    robot = normalized[0, 0].double() * stats["std"].double() + stats["mean"].double()
    policy.reset(seed=0)
    np.testing.assert_allclose(policy.select_action(obs), robot.numpy(), rtol=1e-5, atol=1e-6)
    policy.reset(seed=0)
    with pytest.raises(ValueError, match="state has 4 values, the .* checkpoint takes 8"):
        policy.select_action({**obs, "state": np.zeros(4)})


def test_adapter_declarations(ckpt):
    kind, _ = ckpt
    adapter = check_adapter(adapter_of(base_model(kind)))
    mods = {m.name: m for m in adapter.quantizable_modules()}
    lm = "paligemma_with_expert.paligemma.model.language_model.layers."
    ex = "paligemma_with_expert.gemma_expert.model.layers."
    assert (mods[f"{lm}0.self_attn.q_proj"].role, mods[f"{lm}0.self_attn.q_proj"].stream) == (
        "backbone",
        "prefix",
    )
    assert mods[f"{lm}1.self_attn.k_proj"].role == "interface" and mods[f"{lm}1.self_attn.k_proj"].block == 1
    assert (mods[f"{ex}2.mlp.up_proj"].role, mods[f"{ex}2.mlp.up_proj"].stack) == ("action_head", "expert")
    assert (
        mods["paligemma_with_expert.paligemma.model.vision_tower.encoder.layers.1.mlp.fc1"].role == "vision"
    )
    assert mods["action_out_proj"].stream == "expert"
    # never run at inference: not offered (the last PaliGemma layer's query/output/MLP, the LM heads)
    assert f"{lm}2.self_attn.q_proj" not in mods and f"{lm}2.mlp.up_proj" not in mods
    assert f"{lm}2.self_attn.v_proj" in mods and not any("lm_head" in n for n in mods)
    folds = {i.name: i.fold for i in adapter.interface_modules()}
    assert len(folds) == 6 and {i.kind for i in adapter.interface_modules()} == {"prefix_kv"}
    assert folds[f"{lm}0.self_attn.k_proj"] == "tied_pairs" and folds[f"{lm}0.self_attn.v_proj"] == "exact"
    assert (
        adapter.action_space.kinds[3:6] == ("rotation",) * 3 and adapter.action_space.control == "delta-eef"
    )
    layouts = {a.name: a for a in adapter.attention_layouts()}
    assert layouts[f"{ex}0.self_attn"].kv_heads == 1 and not layouts[f"{ex}0.self_attn"].fused


def test_key_fold_is_exact_only_with_gains_tied_per_rope_pair():
    """Why k_proj is 'tied_pairs': a gain per output channel commutes with the rotary embedding that follows
    exactly when the two channels of each rotated pair share it."""
    from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

    adapter = adapter_of(base_model("pi0"))
    iface = next(i for i in adapter.interface_modules() if i.fold == "tied_pairs")
    model = adapter.model
    hd = model.config.text.head_dim
    k = torch.randn(2, 5, iface.module.out_features)
    pos = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.vlm.rotary_emb(k, pos)

    def rope(x):
        x = x.view(2, 5, -1, hd).transpose(1, 2)
        return apply_rotary_pos_emb(x, x, cos, sin)[1].transpose(1, 2).reshape(2, 5, -1)

    pairs = iface.rope_pairs()
    tied = torch.ones(k.shape[-1])
    gains = torch.rand(len(pairs)) + 0.5
    tied[pairs[:, 0]], tied[pairs[:, 1]] = gains, gains
    torch.testing.assert_close(rope(k * tied), rope(k) * tied)
    untied = torch.rand(k.shape[-1]) + 0.5
    assert not torch.allclose(rope(k * untied), rope(k) * untied, atol=1e-3)


def test_sampler_is_differentiable_and_the_objective_weights_dimensions():
    adapter = adapter_of(copy.deepcopy(base_model("pi0")))
    batch = next(adapter.calibration_batches(iter([raw_batch(1, 2)])))
    out = adapter.sample(batch, torch.Generator().manual_seed(0))
    out.sum().backward()
    assert adapter.model.action_in_proj.weight.grad is not None
    loss = lambda w: adapter.objective(batch, w, torch.Generator().manual_seed(3))  # noqa: E731
    w = torch.zeros(7)
    w[0] = 7.0
    with torch.no_grad():
        assert float(loss(None)) > 0 and not torch.isclose(loss(None), loss(w))
    assert torch.equal(loss(None), loss(None))  # the generator fixes noise and time
    assert torch.isclose(loss(torch.ones(7)), loss(None))


def _method_configs():
    from test_generic_adapter import small_configs

    return small_configs()


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
@pytest.mark.parametrize("name", sorted(_method_configs()))
def test_every_method_on_pi0(kind, name):
    out = check_method(kind, name, _method_configs()[name])
    record, adapter = out["record"], out["adapter"]
    if name == "daptq":  # "float the last two DiT blocks" = the expert's last two layers, from the adapter
        last = {m.name for m in adapter.quantizable_modules() if m.stack == "expert" and m.block >= 1}
        assert set(record.decisions["float_by_block"]) == last
    if name.startswith("daptq"):  # CSRC on the prefix keys only with gains tied per RoPE pair
        restricted = set(record.decisions["csrc_restricted"])
        assert restricted == {i.name for i in adapter.interface_modules() if i.fold == "tied_pairs"}
    if name == "quantvla":
        assert all(".gemma_expert." in a for a in record.decisions["attention_modules"])


def test_chunks_helper_is_deterministic():
    a = adapter_of(base_model("pi0"))
    assert torch.equal(chunks(a), chunks(a))


def test_prompts_follow_the_originals_processors():
    state = torch.zeros(1, 10)  # normalized and padded to max_state_dim
    state[0, 0], state[0, 1] = -1.0, 0.999
    assert adapter_of(base_model("pi0")).prompts(["pick up the cup"], state) == ["pick up the cup\n"]
    (p,) = adapter_of(base_model("pi05")).prompts(["pick_up the cup\n"], state)
    digits = " ".join(["0", "255"] + ["128"] * 6)  # 256 bins over [-1, 1] of the 8 real state values
    assert p == f"Task: pick up the cup, State: {digits};\nAction: "


def test_pi05_drops_the_experts_plain_norm_weights_as_lerobot(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "a", "pi05")
    stale = "model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.weight"
    _rewrite(d, lambda t: {**t, stale: torch.zeros(24)})
    ck = load_lerobot_checkpoint(d)
    assert any("adaptive" in n for n in ck.key_notes)
    for k, v in tiny_model("pi05").state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    _rewrite(
        d,
        lambda t: {
            **t,
            "model.paligemma_with_expert.gemma_expert.model.layers.0.extra.weight": t[stale].clone(),
        },
    )
    with pytest.raises(ValueError, match=r"1 unexpected: .*layers\.0\.extra\.weight"):
        load_lerobot_checkpoint(d)


def test_daptq_directory_round_trips_the_bias_csrc_adds(tmp_path):
    """CSRC folds its correction into the bias-free Gemma k/v projections, giving them a bias: a quantized
    directory stores it and loading gives the layer one again (same chunks)."""
    from lerobot_vla_helpers import calibration

    from daptq.methods import quantize_policy
    from daptq.methods.daptq import DAPTQConfig
    from daptq.models.quantized import load_quantized_policy, model_digest, save_quantized_policy

    d = write_tiny_checkpoint(tmp_path / "a", "pi0")
    spec = f"lerobot:{d}"
    policy = load_policy(spec)
    config = DAPTQConfig(sensitivity_batches=2, csrc_max_iter=20)
    record = quantize_policy(
        policy, config, calibration(), base_model={"spec": spec, "digest": model_digest(policy.model)}
    )
    k = policy.model.paligemma_with_expert.paligemma.model.language_model.layers[0].self_attn.k_proj
    assert k.bias is not None
    out = save_quantized_policy(policy, record, tmp_path / "q", spec)
    assert torch.equal(_chunk(load_quantized_policy(out)), _chunk(policy))


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_prefix_pass_matches_transformers_gemma_layers(kind):
    from lerobot_vla_helpers import prefix_matches_transformers_layers

    errs = prefix_matches_transformers_layers(kind)
    assert max(errs) < 1e-6, errs  # float64; cos/sin are float32 in both
