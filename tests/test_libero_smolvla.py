"""The second reference VLA (SmolVLA's layout on the bundled frozen encoders, daptq.models.libero_smolvla):
training lowers the flow-matching loss, the checkpoint round-trips in lerobot's layout through the specs,
the adapter passes the contract with SmolVLA's interface, every registered method runs at W8A8 within its
scope, and the policy acts on an observation of the LIBERO suite's shape."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
from family_helpers import check_method, method_configs
from safetensors.torch import load_file

from daptq.data.format import Episode, shard_path, write_shard
from daptq.models.adapter import check_adapter
from daptq.models.libero_smolvla import (
    LiberoSmolVLA,
    LiberoSmolVLAAdapter,
    LiberoSmolVLAPolicy,
    build_config,
    compute_statistics,
    load_checkpoint,
    parameters_by_role,
    pixel_shuffle,
    save_checkpoint,
    statistics_of,
)
from daptq.sources import load_policy

TINY = {
    "d_model": 32,
    "n_layer": 2,
    "n_head": 2,
    "kv_heads": 1,
    "head_dim": 16,
    "intermediate": 64,
    "expert_width": 24,
    "expert_layers": 2,
    "chunk_size": 4,
    "n_action_steps": 2,
    "num_steps": 3,
    "max_state_dim": 10,
    "max_action_dim": 8,
}
EXPERT = "vlm_with_expert.lm_expert.layers."
TEXT = "vlm_with_expert.vlm.model.text_model.layers."
INSTRUCTIONS = ("pick up the black bowl and place it on the plate", "put the cream cheese in the basket")


SMALL = 64  # px: the method matrix runs the frozen encoders at every forward pass; 4 image tokens suffice


@functools.cache
def _base(size: int = 128) -> LiberoSmolVLA:
    """A tiny random member (LIBERO's 128 px by default), output projection re-drawn larger so quantization
    errors show in the chunk (as in a trained model)."""
    torch.manual_seed(0)
    model = LiberoSmolVLA(*build_config(image_size=size, **TINY)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.action_out_proj.weight, std=0.3)
    return model


def _raw(seed: int, b: int = 4, size: int = 128, k: int = 4) -> dict:
    r = np.random.default_rng(seed)
    return {
        "image": r.integers(0, 255, (b, size, size, 3), dtype=np.uint8),
        "state": (r.normal(size=(b, 8)) * 0.2).astype(np.float32),
        "instruction": [INSTRUCTIONS[i % 2] for i in range(b)],
        "actions": np.clip(r.normal(size=(b, k, 7)) * 0.4, -1, 1).astype(np.float32),
    }


def _stats() -> dict:
    r = _raw(5, 64)
    return compute_statistics(torch.as_tensor(r["state"]), torch.as_tensor(r["actions"]).reshape(-1, 7))


def _adapter(model=None) -> LiberoSmolVLAAdapter:
    model = model if model is not None else copy.deepcopy(_base(SMALL))
    return LiberoSmolVLAAdapter(model, statistics_of(_stats(), model.config))


def _chunks(adapter) -> torch.Tensor:
    batch = next(adapter.calibration_batches(iter([_raw(99, 3, adapter.config.image_size)])))
    return adapter.predict_chunk(batch, generator=torch.Generator().manual_seed(7))


# ---- structure ---------------------------------------------------------------------------------
def test_pixel_shuffle_is_smolvlms():
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    x = torch.randn(2, 64, 5)
    assert torch.equal(pixel_shuffle(x, 2), SmolVLMConnector.pixel_shuffle(None, x, 2))


def test_adapter_declarations():
    adapter = check_adapter(_adapter())
    mods = {m.name: m for m in adapter.quantizable_modules()}
    assert (mods["language_proj"].role, mods["language_proj"].stream) == ("backbone", "prefix")
    assert mods["vlm_with_expert.vlm.model.connector.modality_projection.proj"].role == "backbone"
    assert (mods[f"{TEXT}0.mlp.up_proj"].stack, mods[f"{TEXT}0.mlp.up_proj"].block) == ("backbone", 0)
    assert mods[f"{EXPERT}0.self_attn.k_proj"].role == "action_head"  # self-attention: the expert's own keys
    assert (mods[f"{EXPERT}1.self_attn.k_proj"].role, mods[f"{EXPERT}1.self_attn.k_proj"].stream) == (
        "interface",
        "expert",
    )
    assert {m.role for n, m in mods.items() if n.startswith("vlm_with_expert.vlm.model.vision_model.")} == {
        "vision"
    }
    assert mods["language.bert.encoder.layer.3.attention.self.query"].stack == "language"
    assert (
        f"{TEXT}1.self_attn.q_proj" not in mods and f"{TEXT}1.self_attn.k_proj" in mods
    )  # last layer: kv only
    iface = adapter.interface_modules()
    assert [i.name for i in iface] == [f"{EXPERT}1.self_attn.k_proj", f"{EXPERT}1.self_attn.v_proj"]
    assert {(i.kind, i.fold) for i in iface} == {("prefix_kv", "exact")}
    assert adapter.objective_kind == "flow_matching"
    from daptq.envs.libero_suite import LIBERO_ACTION_SPACE

    assert adapter.action_space == LIBERO_ACTION_SPACE  # 7-D delta EEF with rotation, as the suite declares


def test_objective_weights_dimensions_and_sampler_is_differentiable():
    adapter = _adapter()
    batch = next(adapter.calibration_batches(iter([_raw(1, 2, SMALL)])))
    with torch.no_grad():
        loss = lambda w: adapter.objective(batch, w, torch.Generator().manual_seed(3))  # noqa: E731
        w = torch.zeros(7)
        w[3] = 7.0
        assert torch.equal(loss(None), loss(None)) and not torch.isclose(loss(None), loss(w))
        with pytest.raises(ValueError, match=r"expected \(7,\)"):
            loss(torch.ones(4))
    out = adapter.sample(batch, torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 7)
    out.sum().backward()
    cross = adapter.model.vlm_with_expert.lm_expert.layers[1].self_attn.k_proj.weight
    assert cross.grad is not None and cross.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(method_configs()))
def test_every_method_at_w8a8(name):
    raw = [_raw(100 + i, 3, SMALL) for i in range(2)]
    out = check_method(name, method_configs()[name], _adapter, raw, _chunks, 30.0)
    record, adapter = out["record"], out["adapter"]
    iface = {i.name for i in adapter.interface_modules()}
    if name.startswith("daptq"):  # CSRC folds into the cross-attention k/v exactly: no restriction
        assert "csrc_restricted" not in record.decisions
        assert iface <= set(record.decisions["compensation"])
    if name == "quantvla":
        assert all(a.startswith(EXPERT) for a in record.decisions["attention_modules"])


# ---- policy and checkpoint ---------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_select_action_on_a_libero_observation(tmp_path, monkeypatch):
    from daptq.envs.suite import get_suite
    from daptq.models import reference

    model = copy.deepcopy(_base())
    monkeypatch.setattr(reference, "CHECKPOINTS_DIR", tmp_path / "checkpoints")  # as if bundled
    d = save_checkpoint(
        model, tmp_path / "checkpoints" / "libero-smolvla", _stats(), {"training": {"steps": 0}}
    )
    tensors = load_file(str(d / "model.safetensors"))
    assert all(k.startswith("model.") for k in tensors)
    assert f"model.{EXPERT}1.self_attn.k_proj.weight" in tensors and "model.state_proj.weight" in tensors
    assert not any(
        ".vision_model." in k or k.startswith("model.language.") for k in tensors
    )  # frozen encoders
    config = json.loads((d / "config.json").read_text())
    assert config["type"] == "smolvla" and config["daptq_reference"]["stand_ins"]["camera"] == "agentview"
    assert (d / "policy_preprocessor.json").is_file() and (d / "policy_postprocessor.json").is_file()

    obs_spec = get_suite("libero").observations
    r = np.random.default_rng(0)
    size = obs_spec.default_image_size
    obs = {
        "image": r.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "state": (r.normal(size=len(obs_spec.state)) * 0.1).astype(np.float32),
        "instruction": INSTRUCTIONS[0],
    }
    original = LiberoSmolVLAPolicy(model, statistics_of(_stats(), model.config))
    for policy in (load_policy(f"libero-smolvla:{d}"), load_policy("ref:libero-smolvla")):
        assert isinstance(policy, LiberoSmolVLAPolicy)
        info = policy.info()
        assert (info.image_size, info.camera) == (size, obs_spec.default_camera)
        assert info.digest == original.info().digest
        acts = []
        for p in (original, policy):
            p.reset(seed=3)
            acts.append(np.stack([p.select_action(obs) for _ in range(3)]))
        assert acts[0].shape == (3, 7) and np.isfinite(acts[0]).all() and np.array_equal(acts[0], acts[1])
    # batched evaluation: row i samples what select_action queues from the same seed, features shareable
    other = {**obs, "instruction": INSTRUCTIONS[1], "state": obs["state"] + 0.05}
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    batched = original.predict_chunks([obs, other], gens, slots=3)
    shared = original.predict_chunks(
        [obs, other],
        [torch.Generator().manual_seed(s) for s in (3, 4)],
        slots=3,
        vision_features=policy.vision_features([obs, other], slots=3),
    )
    assert batched.shape == (2, 2, 7) and np.array_equal(batched, shared)
    assert policy.vision_key() == original.vision_key()
    for row, (o, seed) in enumerate(((obs, 3), (other, 4))):
        original.reset(seed=seed)
        single = np.stack([original.select_action(o) for _ in range(2)])
        np.testing.assert_allclose(batched[row], single, atol=1e-5)
    original.reset(seed=0)
    with pytest.raises(ValueError, match="agentview"):
        original.select_action({**obs, "image": obs["image"][:64]})

    from daptq.cli import main

    q = tmp_path / "q"
    assert main(["quantize", "ref:libero-smolvla", "--method", "rtn", "--w-bits", "8", "--out", str(q)]) == 0
    loaded = load_policy(str(q))
    assert isinstance(loaded, LiberoSmolVLAPolicy) and loaded.quant_record.method == "rtn"
    assert f"{EXPERT}1.self_attn.k_proj" in loaded.quant_record.modules
    loaded.reset(seed=3)
    assert np.isfinite(loaded.select_action(obs)).all()


def test_loader_names_a_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    d = save_checkpoint(copy.deepcopy(_base()), tmp_path / "ck", _stats())
    key = f"model.{EXPERT}1.self_attn.v_proj.weight"
    save_file(
        {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k != key},
        str(d / "model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"1 missing .*layers\.1\.self_attn\.v_proj\.weight"):
        load_checkpoint(d)


# ---- training ---------------------------------------------------------------------------------
def _dataset(root, size: int = 64, episodes: int = 2, steps: int = 12):
    """A LIBERO-shaped dataset (8-D proprio, 7-D actions, agentview) written with daptq's shard writer."""
    r = np.random.default_rng(0)
    tasks = {"spatial-0": INSTRUCTIONS[0], "object-0": INSTRUCTIONS[1]}
    for split in ("train", "val"):
        for t, (task, instruction) in enumerate(tasks.items()):
            eps = []
            for e in range(episodes):
                state = np.cumsum(r.normal(size=(steps, 8)) * 0.05, 0).astype(np.float32)
                actions = np.tanh(np.roll(state[:, :7], -1, 0) * 3 + (t - 0.5)).astype(np.float32)
                eps.append(
                    Episode(
                        task,
                        instruction,
                        e,
                        True,
                        r.integers(0, 255, (steps, size, size, 3), dtype=np.uint8),
                        state,
                        actions,
                        state[:, :3].copy(),
                        actions.copy(),
                        np.zeros(steps, bool),
                    )  # fmt: skip
                )
            write_shard(shard_path(root, split, task, 0), eps, [])
    (root / "meta").mkdir(parents=True, exist_ok=True)
    info = {
        "format_version": 1,
        "complete": True,
        "tasks": list(tasks),
        "splits": {s: {"episodes": 2 * episodes} for s in ("train", "val")},
        "image_size": size,
        "camera": "agentview",
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "stats.json").write_text("{}")
    return root


def test_training_lowers_the_loss_and_the_checkpoint_loads(tmp_path):
    from daptq.train import TrainConfig
    from daptq.train.smolvla import train_smolvla

    data = _dataset(tmp_path / "libero")
    cfg = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), max_steps=40, batch_size=16, n_noise=2, lr=2e-3,
        warmup_steps=0, ema_decay=0.5, precision="fp32", threads=1, val_every=1000, model=dict(TINY),
    )  # fmt: skip
    out = train_smolvla(cfg)
    trained = load_checkpoint(out)
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 40
    torch.manual_seed(cfg.seed)  # the initial weights of the run
    fresh = LiberoSmolVLAAdapter(LiberoSmolVLA(*build_config(image_size=64, **TINY)), trained.statistics)
    shard = load_file(str(next((tmp_path / "libero-features" / "train").glob("object-0-*.safetensors"))))
    batches = []
    for a in (trained.adapter, fresh):
        batches.append(
            {
                "vision_features": shard["vision_features"][:12].float(),
                **a.model.language.tokenize([INSTRUCTIONS[1]] * 12),
                "state": a.normalized_state(shard["states"][:12].numpy()),
                "actions": a.normalized_actions(
                    np.stack([shard["actions"][i : i + 4].numpy() for i in range(12)])
                ),
            }
        )
    with torch.no_grad():
        after = float(trained.adapter.flow_objective(batches[0], None, torch.Generator().manual_seed(0), 8))
        before = float(fresh.flow_objective(batches[1], None, torch.Generator().manual_seed(0), 8))
    assert after < 0.7 * before, (before, after)
    # fine-tuning from the checkpoint keeps its architecture and statistics
    tuned = train_smolvla(
        dataclasses.replace(cfg, out=str(tmp_path / "tuned"), max_steps=1, init=str(out), model={})
    )
    again = load_checkpoint(tuned)
    assert again.statistics.to_dict() == trained.statistics.to_dict() and again.config == trained.config
    from daptq.train.trainer import train  # the Meta-World reference's trainer names the right --arch

    with pytest.raises(ValueError, match=r"not the Meta-World reference's architecture.*--arch smolvla"):
        train(dataclasses.replace(cfg, out=str(tmp_path / "wrong"), max_steps=1, init=str(out), model={}))


def test_cli_trains_the_default_model_and_refuses_a_wrong_dataset(tmp_path):
    from daptq.train.__main__ import main

    data = _dataset(tmp_path / "libero", episodes=1, steps=6)
    out = tmp_path / "run"
    argv = ["--arch", "smolvla", "--data", str(data), "--out", str(out), "--max-steps", "1"]
    main([*argv, "--batch-size", "2", "--n-noise", "1", "--precision", "fp32", "--threads", "1"])
    policy = load_policy(f"libero-smolvla:{out}?n_action_steps=3")
    assert policy.n_action_steps == 3 and policy.config.image_size == 64
    # the default model: SmolVLA's tree with ~7 M trained parameters, most of them in the text layers
    config, stand_ins = build_config()
    assert (policy.config.text, policy.config.expert) == (config.text, config.expert)
    assert (config.text.hidden, config.text.layers, config.expert.hidden, config.expert.layers) == (
        256,
        6,
        192,
        6,
    )
    assert (config.chunk_size, config.num_steps, config.action_dim, config.state_dim) == (10, 10, 7, 8)
    assert (config.image_size, stand_ins.camera, config.scale_factor) == (128, "agentview", 2)
    roles = parameters_by_role(policy.model)
    trained = sum(v for k, v in roles.items() if k != "unused")
    assert 5e6 < trained < 8e6 and roles["backbone"] > roles["action_head"] > 0 and roles["interface"] > 0
    with pytest.raises(ValueError, match="unknown libero-smolvla model keys"):
        build_config(width=3)
    info = json.loads((data / "meta" / "info.json").read_text())
    (data / "meta" / "info.json").write_text(json.dumps({**info, "camera": "corner3,topview"}))
    with pytest.raises(ValueError, match="sees one camera"):
        main([*argv, "--max-steps", "1"])


def test_lerobot_spec_on_this_checkpoint_names_the_right_spec(tmp_path):
    d = save_checkpoint(copy.deepcopy(_base()), tmp_path / "ck", _stats())
    with pytest.raises(ValueError, match=r"daptq_reference.*load it as libero-smolvla:"):
        load_policy(f"lerobot:{d}")
