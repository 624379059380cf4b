"""CogACT: architecture in the original's layout, loader, conventions, adapter, quantization (tiny runs)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from daptq.models.adapter import check_adapter
from daptq.models.cogact import (
    CogACTConfig,
    action_statistics,
    build_cogact,
    load_cogact,
    load_cogact_spec,
    read_checkpoint,
    save_cogact_run,
)
from daptq.models.cogact.action_model import ddim_timesteps
from daptq.models.cogact.model import CogACT
from daptq.models.cogact.policy import parse_spec
from daptq.models.cogact.processing import image_tensors, tokenize_prompts
from daptq.models.cogact.testing import tiny_cogact, tiny_statistics, tiny_tokenizer, write_tiny_run

INSTRUCTIONS = ["Pick the coke can", "open the drawer", "move the red block left", "put spoon on towel"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("cogact") / "run", seed=0)


@pytest.fixture(scope="module")
def policy(run_dir):
    return load_cogact(run_dir)


def _images(n: int, seed: int = 0, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size + 8, 3), dtype=np.uint8)


def _batch(adapter, n: int = 4):
    return adapter.model_inputs(_images(n), INSTRUCTIONS[:n])


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _rewrite_checkpoint(run: Path, edit, name: str = "latest-checkpoint.pt") -> Path:
    pt = run / "checkpoints" / name
    obj = torch.load(pt, weights_only=True)
    edit(obj["model"])
    buf = io.BytesIO()
    torch.save(obj, buf)
    pt.write_bytes(buf.getvalue())
    return pt


# ---- architecture ------------------------------------------------------------------------------------------
def test_default_config_is_cogact_base_with_the_original_key_layout():
    """The 7B defaults on the meta device: checkpoint groups, key names and shapes of the released model."""
    with torch.device("meta"):
        model = CogACT(CogACTConfig())
    shapes = {
        g: {k: tuple(v.shape) for k, v in getattr(model, g).state_dict().items()}
        for g in ("vision_backbone", "llm_backbone", "projector", "action_model")
    }
    assert shapes["vision_backbone"]["dino_featurizer.pos_embed"] == (1, 256, 1024)
    assert shapes["vision_backbone"]["dino_featurizer.reg_token"] == (1, 4, 1024)
    assert shapes["vision_backbone"]["dino_featurizer.blocks.23.ls2.gamma"] == (1024,)
    assert shapes["vision_backbone"]["siglip_featurizer.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["vision_backbone"]["siglip_featurizer.attn_pool.kv.weight"] == (2304, 1152)
    assert "siglip_featurizer.cls_token" not in shapes["vision_backbone"]
    assert shapes["projector"]["projector.0.weight"] == (8704, 2176)
    assert shapes["projector"]["projector.4.weight"] == (4096, 4096)
    assert shapes["llm_backbone"]["llm.model.embed_tokens.weight"] == (32064, 4096)
    assert shapes["llm_backbone"]["llm.model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert shapes["llm_backbone"]["llm.lm_head.weight"] == (32064, 4096)
    assert shapes["action_model"]["net.positional_embedding"] == (17, 768)
    assert shapes["action_model"]["net.z_embedder.uncondition"] == (1, 4096)
    assert shapes["action_model"]["net.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["action_model"]["net.final_layer.linear.weight"] == (7, 768)
    total = sum(p.numel() for p in model.parameters())
    assert 7.5e9 < total < 7.8e9  # CogACT-Base: ~7.6B parameters


def test_tiny_model_builds_and_samples_a_chunk(policy):
    adapter = policy.adapter
    c = adapter.config
    batch = _batch(adapter)
    chunk = adapter.sample(batch, torch.Generator().manual_seed(0))
    assert chunk.shape == (4, c.chunk_size, 7) and torch.isfinite(chunk).all()
    assert chunk.requires_grad  # differentiable sampler
    again = adapter.predict_chunk(batch, torch.Generator().manual_seed(0))
    assert torch.equal(chunk.detach(), again) and not again.requires_grad
    other = adapter.predict_chunk(batch, torch.Generator().manual_seed(1))
    assert not torch.equal(again, other)


def test_cognition_feature_is_padding_invariant(policy):
    """z of a right-padded row equals z of the same row alone (the cognition token is the last real one)."""
    adapter = policy.adapter
    batch = _batch(adapter)
    assert not batch["attention_mask"].all()  # the instructions have different lengths
    z = adapter.condition(batch)
    for i in range(4):
        alone = adapter.model_inputs(_images(4)[i : i + 1], INSTRUCTIONS[i : i + 1])
        torch.testing.assert_close(adapter.condition(alone)[0], z[i], rtol=1e-5, atol=1e-5)


def test_guidance_uses_the_unconditional_embedding(policy):
    adapter = policy.adapter
    batch = _batch(adapter, 2)
    model = adapter.model
    z = adapter.condition(batch)[:, None]
    noise = torch.randn(2, adapter.config.chunk_size, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        guided = model.action_model.sample(z, noise, 1.5)
        plain = model.action_model.sample(z, noise, 1.0)
        uncond = model.action_model.net.z_embedder.uncondition.clone()
        model.action_model.net.z_embedder.uncondition.add_(1.0)
        moved = model.action_model.sample(z, noise, 1.5)
        model.action_model.net.z_embedder.uncondition.copy_(uncond)
    assert not torch.allclose(guided, plain) and not torch.allclose(guided, moved)


def test_ddim_recovers_x0_from_an_oracle_denoiser(policy):
    """With the exact epsilon of a known x0 at every original timestep, DDIM (guided or not) lands on x0."""
    action_model = policy.adapter.model.action_model
    schedule = action_model.schedule
    x0 = torch.rand(2, 4, 7) * 2 - 1
    ab = torch.from_numpy(schedule.alphas_cumprod).float()

    def oracle(x, t, z):
        a = ab[t].view(-1, 1, 1)
        return (x - a.sqrt() * x0.repeat(x.shape[0] // 2, 1, 1)) / (1 - a).sqrt()

    net = action_model.net
    original = net.forward
    net.forward = oracle
    try:
        noise = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
        z = torch.zeros(2, 1, policy.config.hidden_size)
        for cfg in (1.0, 1.5):
            torch.testing.assert_close(action_model.sample(z, noise, cfg), x0, rtol=1e-4, atol=1e-4)
    finally:
        net.forward = original


def test_ddim_respacing_matches_the_original():
    assert ddim_timesteps(100, 10).tolist() == list(range(0, 100, 10))
    assert ddim_timesteps(100, 5).tolist() == list(range(0, 100, 20))
    assert ddim_timesteps(100, 1).tolist() == [50]
    with pytest.raises(ValueError, match="integer stride"):
        ddim_timesteps(100, 60)


# ---- observation conventions -------------------------------------------------------------------------------
def test_image_preprocessing_resizes_bicubic_and_normalizes_per_tower():
    from PIL import Image

    config = CogACTConfig.tiny()
    img = _images(1, size=50)[0]
    dino, siglip = image_tensors(img, config)
    assert dino.shape == siglip.shape == (1, 3, 28, 28)
    ref = np.asarray(Image.fromarray(img).resize((28, 28), Image.BICUBIC)).astype(np.float32) / 255.0
    ref = torch.from_numpy(ref).permute(2, 0, 1)
    imagenet = (ref - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    torch.testing.assert_close(dino[0], imagenet)
    torch.testing.assert_close(siglip[0], (ref - 0.5) / 0.5)
    with pytest.raises(ValueError, match="uint8"):
        image_tensors(img.astype(np.float32), config)


def test_prompt_is_the_original_format_with_cognition_suffix():
    config = CogACTConfig.tiny()
    tok = tiny_tokenizer()
    ids, mask = tokenize_prompts(tok, ["Open the DRAWER", "pick the cup"], config)
    expected = tok("In: What action should the robot take to open the drawer?\nOut: ")["input_ids"] + [3, 2]
    assert ids[0, : len(expected)].tolist() == expected and ids[0, 0].item() == 1  # <s> first
    assert mask[0].sum().item() == len(expected)
    n1 = int(mask[1].sum())
    assert ids[1, n1 - 2 : n1].tolist() == [3, 2] and (ids[1, n1:] == config.pad_token_id).all()
    assert not mask[1, n1:].any()


# ---- actions -----------------------------------------------------------------------------------------------
def test_actions_are_unnormalized_with_the_run_statistics():
    stats = action_statistics(tiny_statistics(), None)
    q01, q99 = stats.q01, stats.q99
    normalized = np.array([[-1, 1, 0, 2.0, -3.0, 0.5, 0.4], [0, 0, 0, 0, 0, 0, 0.6]])
    out = stats.unnormalize(normalized, gripper_dims=[6])
    np.testing.assert_allclose(
        out[0, :6],
        [q01[0], q99[1], (q01[2] + q99[2]) / 2, q99[3], q01[4], q01[5] + 0.75 * (q99[5] - q01[5])],
        rtol=1e-6,
    )
    assert out[0, 6] == 0.0 and out[1, 6] == 1.0  # gripper binarized at 0.5, not rescaled (mask False)
    robot = np.array([[0.01, -0.02, 0.0, 0.05, -0.05, 0.1, 1.0]])
    back = stats.unnormalize(stats.normalize(robot), gripper_dims=[6])
    np.testing.assert_allclose(back, robot, atol=1e-6)


def test_statistics_key_must_be_named_when_several_datasets():
    stats = {**tiny_statistics("bridge_orig"), **tiny_statistics("fractal20220817_data")}
    with pytest.raises(ValueError, match="fractal20220817_data"):
        action_statistics(stats, None)
    assert action_statistics(stats, "fractal20220817_data").key == "fractal20220817_data"
    with pytest.raises(ValueError, match="no dataset 'libero'"):
        action_statistics(stats, "libero")


def test_select_action_returns_robot_units(policy):
    obs = {"image": _images(1)[0], "instruction": "pick the coke can", "state": np.zeros(4, np.float32)}
    policy.reset(seed=3)
    action = policy.select_action(obs)
    assert action.shape == (7,) and action.dtype == np.float32
    chunk = policy.adapter.predict_chunk(policy.observation_batch(obs), torch.Generator().manual_seed(3))
    expected = policy.statistics.unnormalize(chunk[0].numpy(), [6])[0]
    np.testing.assert_array_equal(action, expected)
    q01, q99 = policy.statistics.q01, policy.statistics.q99
    assert np.all(action[:6] >= q01[:6] - 1e-6) and np.all(action[:6] <= q99[:6] + 1e-6)
    assert action[6] in (0.0, 1.0)


# ---- loader ------------------------------------------------------------------------------------------------
def test_loader_round_trips_a_checkpoint_in_the_original_layout(run_dir, tmp_path):
    pt = run_dir / "checkpoints" / "latest-checkpoint.pt"
    raw = torch.load(pt, weights_only=True)
    assert set(raw) == {"model"}
    assert set(raw["model"]) == {"vision_backbone", "llm_backbone", "projector", "action_model"}
    assert "llm.model.layers.0.self_attn.q_proj.weight" in raw["model"]["llm_backbone"]
    assert "net.z_embedder.linear.weight" in raw["model"]["action_model"]
    original = tiny_cogact(seed=0)  # the model write_tiny_run saved
    loaded = load_cogact(run_dir)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    adapter = loaded.adapter
    batch = _batch(adapter)
    from daptq.models.cogact import CogACTAdapter

    reference = CogACTAdapter(original, tiny_tokenizer())
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(adapter.predict_chunk(batch, gen()), reference.predict_chunk(batch, gen()))
    files = loaded.meta["files"]
    assert set(files) >= {"config.json", "dataset_statistics.json", "checkpoints/latest-checkpoint.pt"}
    assert all(len(h) == 64 for h in files.values())
    # the same run read from the checkpoint path, as the original's load_vla takes it
    by_file = load_cogact(pt)
    assert torch.equal(by_file.adapter.predict_chunk(batch, gen()), adapter.predict_chunk(batch, gen()))


def test_loader_refuses_a_renamed_key(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)

    def rename(model):
        s = model["action_model"]
        s["net.z_embedder.lin.weight"] = s.pop("net.z_embedder.linear.weight")

    _rewrite_checkpoint(run, rename)
    with pytest.raises(ValueError) as e:
        load_cogact(run)
    assert "missing keys (1): ['action_model.net.z_embedder.linear.weight']" in str(e.value)
    assert "unexpected keys (1): ['action_model.net.z_embedder.lin.weight']" in str(e.value)


def test_loader_refuses_a_wrong_shape(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    key = "llm.model.layers.1.self_attn.o_proj.weight"

    def reshape(model):
        model["llm_backbone"][key] = torch.zeros(64, 32)

    _rewrite_checkpoint(run, reshape)
    with pytest.raises(ValueError) as e:
        load_cogact(run)
    assert f"wrong shapes (1): ['llm_backbone.{key}: checkpoint (64, 32), model (64, 64)']" in str(e.value)


def test_loader_refuses_non_tensor_objects(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)

    def inject(model):
        model["projector"]["projector.0.weight"] = [1.0, 2.0]

    _rewrite_checkpoint(run, inject)
    with pytest.raises(ValueError, match=r"model\.projector\.projector\.0\.weight \(list\)"):
        load_cogact(run)
    # anywhere in the file, ignored groups included
    _rewrite_checkpoint(run, lambda m: m.update(ema_diffusion={"net.step": 3}))
    with pytest.raises(ValueError, match=r"model\.ema_diffusion\.net\.step \(int\)"):
        load_cogact(run)


class _NotATensor:  # a pickled class: torch.load(weights_only=True) must refuse to build it
    pass


def test_loader_never_unpickles_objects(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    pt = run / "checkpoints" / "latest-checkpoint.pt"
    obj = torch.load(pt, weights_only=True)
    obj["model"]["action_model"]["net.x_embedder.linear.weight"] = _NotATensor()
    buf = io.BytesIO()
    torch.save(obj, buf)
    pt.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="weights_only=True") as e:
        read_checkpoint(pt)
    assert "_NotATensor" in str(e.value)


def test_loader_refuses_missing_groups_and_files(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    _rewrite_checkpoint(run, lambda m: m.pop("projector"))
    with pytest.raises(ValueError, match=r"missing the groups \['projector'\]"):
        load_cogact(run)
    run2 = tmp_path / "run2"
    shutil.copytree(run_dir, run2)
    shutil.rmtree(run2 / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_cogact(run2)
    (run2 / "dataset_statistics.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset_statistics.json"):
        load_cogact(run2)


def test_run_config_without_sizes_uses_the_released_architectures():
    config = CogACTConfig.from_run_config(
        {
            "vla": {"base_vlm": "prism-dinosiglip-224px+7b"},
            "action_model_type": "DiT-L",
            "future_action_window_size": 15,
            "action_dim": 7,
        }
    )
    assert (config.dit_depth, config.dit_hidden_size, config.dit_num_heads) == (24, 1024, 16)
    assert config.hidden_size == 4096 and config.chunk_size == 16 and config.num_ddim_steps == 10
    with pytest.raises(ValueError, match="base VLM 'prism-clip"):
        CogACTConfig.from_run_config({"vla": {"base_vlm": "prism-clip+7b"}})
    assert CogACTConfig.from_dict(CogACTConfig().to_dict()) == CogACTConfig()
    assert (
        CogACTConfig.from_dict(json.loads(json.dumps(CogACTConfig.tiny().to_dict()))) == CogACTConfig.tiny()
    )


def test_dit_size_is_read_from_the_checkpoint():
    """A released run's config.json may name the trainer's default DiT-B; the weights decide."""
    from daptq.models.cogact.checkpoint import dit_type_of

    for name, (depth, hidden, heads) in (("DiT-S", (6, 384, 4)), ("DiT-L", (24, 1024, 16))):
        config = CogACTConfig.tiny(dit_depth=depth, dit_hidden_size=hidden, dit_num_heads=heads)
        with torch.device("meta"):
            state = CogACT(config).action_model.state_dict()
        assert dit_type_of(state) == name
    assert dit_type_of({k: v for k, v in tiny_cogact().action_model.state_dict().items()}) is None
    run = {"vla": {"base_vlm": "prism-dinosiglip-224px+7b"}, "action_model_type": "DiT-B"}
    assert CogACTConfig.from_run_config(run, action_model_type="DiT-S").dit_hidden_size == 384


def test_spec_options(run_dir, tmp_path):
    assert parse_spec("cogact:/x/run?unnorm_key=bridge_orig&n_action_steps=4") == (
        "/x/run",
        {"unnorm_key": "bridge_orig", "n_action_steps": "4"},
    )
    with pytest.raises(ValueError, match="unknown options"):
        parse_spec("cogact:/x/run?unorm=1")
    policy = load_cogact_spec(f"cogact:{run_dir}?unnorm_key=bridge_orig&n_action_steps=2&cfg_scale=1.0")
    assert policy.n_action_steps == 2 and policy.adapter.cfg_scale == 1.0
    with pytest.raises(ValueError, match="no dataset 'oops'"):
        load_cogact_spec(f"cogact:{run_dir}?unnorm_key=oops")


def test_cogact_source_resolves_through_the_resolver(run_dir):
    sources = pytest.importorskip("daptq.sources")
    policy = sources.load_policy(f"cogact:{run_dir}?n_action_steps=3")
    assert type(policy).__name__ == "CogACTPolicy" and policy.n_action_steps == 3
    names = {p.relative_to(run_dir).as_posix() for p in policy.source_files()}
    assert names == set(policy.meta["files"]) and "checkpoints/latest-checkpoint.pt" in names


def test_writer_round_trips_a_fresh_model(tmp_path):
    model = build_cogact(CogACTConfig.tiny(num_ddim_steps=2))
    save_cogact_run(
        model,
        tmp_path / "r",
        tiny_statistics(),
        tiny_tokenizer(),
        checkpoint_name="step-000010-epoch-00-loss=0.1000.pt",
    )
    # a run trained with use_ema also holds an ema_diffusion group: ignored, as the original does by default
    _rewrite_checkpoint(
        tmp_path / "r",
        lambda m: m.update(ema_diffusion={k: v + 1 for k, v in m["action_model"].items()}),
        "step-000010-epoch-00-loss=0.1000.pt",
    )
    loaded = load_cogact(tmp_path / "r")
    assert loaded.config.num_ddim_steps == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


# ---- adapter and quantization ------------------------------------------------------------------------------
def test_adapter_honours_the_contract(policy):
    adapter = check_adapter(policy.adapter)
    assert adapter.objective_kind == "diffusion"
    modules = {m.name: m for m in adapter.quantizable_modules()}
    assert [i.name for i in adapter.interface_modules()] == ["action_model.net.z_embedder.linear"]
    assert modules["action_model.net.z_embedder.linear"].role == "interface"
    assert modules["projector.projector.0"].role == "backbone"
    q = modules["llm_backbone.llm.model.layers.1.self_attn.q_proj"]
    assert (q.role, q.block, q.stack) == ("backbone", 1, "backbone")
    assert modules["action_model.net.blocks.0.mlp.fc2"].stack == "dit"
    assert modules["vision_backbone.dino_featurizer.patch_embed.proj"].meta["kind"] == "conv2d"
    for unused in (
        "llm_backbone.llm.lm_head",
        "action_model.net.history_embedder.linear",
        "vision_backbone.dino_featurizer.blocks.1.attn.qkv",
        "vision_backbone.siglip_featurizer.attn_pool.q",
    ):
        assert unused not in modules
    layouts = adapter.attention_layouts()
    c = adapter.config
    assert len(layouts) == (c.dino.depth - 1) + (c.siglip.depth - 1) + c.num_hidden_layers + c.dit_depth
    llm = [a for a in layouts if a.stack == "backbone"][0]
    assert not llm.fused and llm.heads == c.num_attention_heads and llm.kv_heads is None
    groups = {(g.source, g.layers) for g in adapter.smoothing_groups()}
    v, o = (
        "llm_backbone.llm.model.layers.0.self_attn.v_proj",
        "llm_backbone.llm.model.layers.0.self_attn.o_proj",
    )
    assert (v, (o,)) in groups
    batch = _batch(adapter)
    actions = torch.rand(4, c.chunk_size, 7) * 2 - 1
    loss = adapter.objective({**batch, "actions": actions}, generator=torch.Generator().manual_seed(0))
    again = adapter.objective({**batch, "actions": actions}, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.equal(loss, again)
    w = torch.tensor([1.0, 1, 1, 0, 0, 0, 0])
    weighted = adapter.objective({**batch, "actions": actions}, w, torch.Generator().manual_seed(0))
    assert weighted < loss


def test_grouped_query_attention_is_declared():
    from daptq.models.cogact import CogACTAdapter

    adapter = check_adapter(CogACTAdapter(build_cogact(CogACTConfig.tiny(num_key_value_heads=2))))
    llm = [a for a in adapter.attention_layouts() if a.stack == "backbone"]
    assert {a.kv_heads for a in llm} == {2}
    assert not any(
        g.source.endswith("v_proj") for g in adapter.smoothing_groups()
    )  # v rows feed 2 heads each


def test_calibration_batches_normalize_robot_actions(policy):
    stats = policy.statistics
    robot = np.tile(
        np.array([0.03, -0.04, 0.0, 0.0, 0.1, -0.2, 1.0], np.float32), (2, policy.config.chunk_size, 1)
    )
    raw = {"image": _images(2), "instruction": INSTRUCTIONS[:2], "state": np.zeros((2, 4)), "actions": robot}
    (batch,) = list(policy.adapter.calibration_batches(iter([raw])))
    assert set(batch) == {"dino_pixels", "siglip_pixels", "input_ids", "attention_mask", "actions"}
    np.testing.assert_allclose(batch["actions"][0, 0].numpy(), stats.normalize(robot[0, 0]), atol=1e-6)
    np.testing.assert_allclose(
        batch["actions"][0, 0, :3].numpy(), [1.0, -1.0, (0 - -0.03) / 0.035 - 1], atol=1e-5
    )
    with pytest.raises(ValueError, match="delta end-effector"):
        list(policy.adapter.calibration_batches(iter([{**raw, "actions": robot[..., :4]}])))


def test_rtn_w8a8_keeps_the_sampled_chunk_close(run_dir):
    """RTN W8A8 (per-channel weights, per-token activations) on backbone, interface and DiT keeps the sampled
    chunk at >= 25 dB SQNR from FP with the same noise (measured 33.7 dB on this tiny model)."""
    from daptq.methods import quantize_policy
    from daptq.methods.rtn import RTNConfig
    from daptq.quant.spec import ActivationSpec, QuantSpec, WeightSpec

    policy = load_cogact(run_dir)
    adapter = policy.adapter
    batch = _batch(adapter)
    fp = adapter.predict_chunk(batch, torch.Generator().manual_seed(0))
    record = quantize_policy(
        policy, RTNConfig(spec=QuantSpec(WeightSpec(8, granularity="per_channel"), ActivationSpec(8)))
    )
    q = adapter.predict_chunk(batch, torch.Generator().manual_seed(0))
    assert not torch.equal(fp, q)
    sqnr = 10 * torch.log10(fp.pow(2).sum() / (fp - q).pow(2).sum())
    assert sqnr > 25, f"SQNR {sqnr:.1f} dB"
    expected = {
        m.name for m in adapter.quantizable_modules() if m.role in ("backbone", "interface", "action_head")
    }
    assert set(record.modules) == expected and "action_model.net.z_embedder.linear" in expected
