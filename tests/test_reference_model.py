"""The reference VLA: shapes, seeded sampling, the adapter contract, checkpoints and the bundled policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from daptq.models.adapter import METAWORLD_ACTION_SPACE, Policy, VLAAdapter, check_adapter
from daptq.models.reference import (
    CHECKPOINTS_DIR,
    ReferencePolicy,
    ReferenceVLA,
    ReferenceVLAConfig,
    load_reference_checkpoint,
    load_reference_policy,
    save_reference_checkpoint,
)

TINY = ReferenceVLAConfig(
    image_size=32,
    d_model=32,
    n_layer=1,
    n_head=2,
    dit_d_model=32,
    dit_n_layer=1,
    dit_n_head=2,
    num_inference_steps=4,
)
INSTRUCTION = "push the puck to the red goal marker"


@pytest.fixture(scope="module")
def policy() -> ReferencePolicy:
    torch.manual_seed(0)
    model = ReferenceVLA(TINY)
    # adaLN-Zero starts the head at exactly zero output; randomise it so outputs depend on inputs and noise.
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    return ReferencePolicy(model)


def _obs(seed: int = 0, instruction: str = INSTRUCTION) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "state": rng.normal(size=4).astype(np.float32),
        "instruction": instruction,
    }


def _batch(policy: ReferencePolicy, n: int = 3) -> dict[str, torch.Tensor]:
    raw = {
        "image": np.stack([_obs(i)["image"] for i in range(n)]),
        "state": np.stack([_obs(i)["state"] for i in range(n)]),
        "instruction": [INSTRUCTION, "open the door", "close the drawer"][:n],
        "actions": np.random.default_rng(0).uniform(-1, 1, (n, TINY.chunk_size, 4)).astype(np.float32),
    }
    return next(policy.adapter.calibration_batches(iter([raw])))


def test_satisfies_both_protocols(policy):
    assert isinstance(policy, Policy) and isinstance(policy.adapter, VLAAdapter)
    assert check_adapter(policy.adapter) is policy.adapter and policy.adapter.model is policy.model
    assert policy.action_space == METAWORLD_ACTION_SPACE == policy.adapter.action_space
    assert policy.adapter.objective_kind == "diffusion"


def test_predict_chunk_and_condition_shapes(policy):
    batch = _batch(policy)
    assert policy.adapter.condition(batch).shape == (3, TINY.d_model)
    chunk = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (3, TINY.chunk_size, 4)
    assert chunk.abs().max() <= 1.0


def test_select_action_replans_every_n_action_steps(policy, monkeypatch):
    calls = []
    original = policy.adapter.predict_chunk
    monkeypatch.setattr(
        policy.adapter, "predict_chunk", lambda b, generator=None: calls.append(1) or original(b, generator)
    )
    policy.reset(seed=0)
    actions = [policy.select_action(_obs(t)) for t in range(9)]
    assert all(a.shape == (4,) and a.dtype == np.float32 for a in actions)
    assert len(calls) == 3  # steps 0, 4 and 8 re-plan with chunk 8, execute 4


def test_seeded_reset_reproduces_actions_and_other_seeds_differ(policy):
    def rollout(seed):
        policy.reset(seed=seed)
        return np.stack([policy.select_action(_obs(t)) for t in range(6)])

    assert np.array_equal(rollout(7), rollout(7))
    assert not np.allclose(rollout(7), rollout(8))


def test_observation_errors_are_clear(policy):
    bad = _obs()
    del bad["state"]
    policy.reset(seed=0)  # an empty queue, so the next call re-plans from the observation
    with pytest.raises(ValueError, match="state"):
        policy.select_action(bad)
    with pytest.raises(ValueError, match="uint8"):
        policy.observation_to_batch({**_obs(), "image": np.zeros((32, 32, 3), np.float32)})
    with pytest.raises(ValueError, match=r"camera 'corner3' at 32 px: \(32, 32, 3\)"):
        policy.observation_to_batch({**_obs(), "image": np.zeros((2, 32, 32, 3), np.uint8)})


def test_two_camera_model_encodes_each_view_and_grows_from_a_one_camera_model(policy):
    from dataclasses import replace

    from daptq.models.reference import transfer_weights

    with pytest.raises(ValueError, match="duplicate camera"):
        replace(TINY, camera="corner3,corner3")
    two = ReferenceVLA(replace(TINY, camera="corner3,topview"))
    assert two.config.num_vision_tokens == 2 * TINY.num_vision_tokens == 8
    assert two.config.image_shape == (2, 32, 32, 3)
    transfer_weights(policy.model, two)
    one_state, two_state = policy.model.trainable_state_dict(), two.trainable_state_dict()
    for name, value in one_state.items():
        if name != "pos_emb":
            assert torch.equal(value, two_state[name]), name
    n = TINY.num_vision_tokens
    assert torch.equal(two.pos_emb[:, :n], policy.model.pos_emb[:, :n])  # corner3 keeps its positions
    assert torch.equal(two.pos_emb[:, 2 * n :], policy.model.pos_emb[:, n:])  # language, state, cognition
    assert not torch.equal(two.pos_emb[:, n : 2 * n], policy.model.pos_emb[:, :n])  # topview: fresh
    # The views are encoded one by one: view v's tokens are what the encoder gives for that image alone.
    images = torch.from_numpy(np.stack([_obs(0)["image"], _obs(1)["image"]]))[None]
    tokens = two.vision(images)
    assert tokens.shape == (1, 2 * n, two.vision.out_channels)
    assert torch.allclose(tokens[:, n:], two.vision(images[:, 1]), rtol=1e-4, atol=1e-3)
    observation = {**_obs(), "image": images[0].numpy()}
    chunk = ReferencePolicy(two).predict_chunk(
        ReferencePolicy(two).observation_to_batch(observation), generator=torch.Generator().manual_seed(0)
    )
    assert chunk.shape == (1, TINY.chunk_size, 4)
    # Evaluation renders what the policy declares.
    from daptq.eval.runner import _observation_settings

    assert _observation_settings([ReferencePolicy(two)], None, None) == (32, "corner3,topview")
    # Growing into a model of another size is refused, naming the tensor.
    with pytest.raises(ValueError, match="shape"):
        transfer_weights(policy.model, ReferenceVLA(replace(TINY, camera="corner3,topview", d_model=16)))


def test_roles_cover_every_linear_layer(policy):
    modules = policy.adapter.quantizable_modules()
    named = {m.name: m for m in modules}
    for name, module in policy.model.named_modules():
        if isinstance(module, nn.Linear):
            assert name in named, name
    roles = {m.role for m in modules}
    assert roles == {"vision", "language", "backbone", "interface", "action_head"}
    assert named["head.z_proj"].role == "interface"
    assert all(m.role == "vision" for m in modules if m.name.startswith("vision."))
    assert all(m.role == "backbone" for m in modules if m.name.startswith("blocks."))
    # the backbone holds more trainable parameters than the action head (CogACT's proportions)
    default = ReferenceVLAConfig()
    backbone = default.n_layer * 12 * default.d_model**2
    head = default.dit_n_layer * 18 * default.dit_d_model**2
    assert backbone > 2 * head


def test_z_enters_the_head_only_through_the_interface_module(policy):
    (interface,) = policy.adapter.interface_modules()
    assert (interface.kind, interface.fold) == ("vector", "exact")
    assert interface.module is policy.model.head.z_proj
    head, x, t = policy.model.head, torch.randn(2, TINY.chunk_size, 4), torch.tensor([3, 50])
    z1, z2 = torch.randn(2, TINY.d_model), torch.randn(2, TINY.d_model)
    with torch.no_grad():
        assert not torch.allclose(head(x, t, z1), head(x, t, z2))
        original = head.z_proj
        head.z_proj = ConstantLinear(original)
        try:
            assert torch.equal(
                head(x, t, z1), head(x, t, z2)
            )  # with the interface's output fixed, z is invisible
        finally:
            head.z_proj = original


class ConstantLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out = linear(torch.zeros(1, linear.in_features))

    def forward(self, z):
        return self.out.expand(z.shape[0], -1)


def test_denoising_loss_dim_weights_split_the_loss(policy):
    batch = _batch(policy)

    def loss(w):
        return policy.adapter.objective(batch, w, generator=torch.Generator().manual_seed(3)).item()

    per_dim = [loss(torch.eye(4)[j]) for j in range(4)]
    assert sum(per_dim) == pytest.approx(loss(None), rel=1e-5)
    assert loss(torch.ones(4)) == pytest.approx(loss(None), rel=1e-6)
    with pytest.raises(ValueError, match="dim_weights"):
        loss(torch.ones(3))


def test_language_cache_is_reused_and_invalidated_by_weight_changes(policy):
    policy.clear_language_cache()
    f1, _ = policy.language_features(INSTRUCTION)
    assert policy.language_features(INSTRUCTION)[0] is f1  # cached
    weight = policy.model.language.bert.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.mul_(2.0)
    try:
        f2, _ = policy.language_features(INSTRUCTION)
        assert f2 is not f1 and not torch.allclose(f1, f2)
    finally:
        with torch.no_grad():
            weight.mul_(0.5)
    # swapping a module (what quantization does) also invalidates it
    layer = policy.model.language.bert.encoder.layer[0].output
    original = layer.dense
    layer.dense = nn.Linear(original.in_features, original.out_features)
    try:
        assert not torch.allclose(policy.language_features(INSTRUCTION)[0], f1)
    finally:
        layer.dense = original
    assert torch.allclose(policy.language_features(INSTRUCTION)[0], f1)


def test_checkpoint_round_trip_gives_identical_actions(policy, tmp_path):
    save_reference_checkpoint(policy.model, tmp_path, {"note": "test"})
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    loaded = load_reference_checkpoint(tmp_path)
    assert loaded.meta["note"] == "test"
    batch = _batch(policy)
    a = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(1))
    b = loaded.predict_chunk(batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_missing_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_reference_policy("no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_reference_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="plain name"):
        load_reference_policy("../etc")


@pytest.mark.slow
def test_bundled_checkpoint_runs_a_short_episode():
    from daptq.data.format import DEMO_VERSION
    from daptq.envs import SCENE_VERSION, make_env

    policy = load_reference_policy("metaworld-mt10")
    assert (CHECKPOINTS_DIR / "metaworld-mt10" / "model.safetensors").stat().st_size < 60e6
    # Changing what the camera sees (SCENE_VERSION) without retraining the bundled model would silently
    # invalidate every published success rate.
    assert policy.scene_version == SCENE_VERSION
    # Trained on the current demonstrations (aim-corrected experts, correct first images).
    assert policy.demo_version == DEMO_VERSION
    env = make_env("reach", image_size=policy.config.image_size, camera=policy.config.camera, max_steps=8)
    obs, _ = env.reset(seed=1_000_000)
    policy.reset(seed=0)
    for _ in range(8):
        action = policy.select_action(obs)
        assert action.shape == (4,) and np.all(np.abs(action) <= 1.0)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    assert truncated or terminated
    env.close()


def test_model_config_validates_cameras_without_loading_the_simulator():
    import subprocess
    import sys

    code = (
        "import sys; from daptq.models.reference import ReferenceVLAConfig; "
        "assert ReferenceVLAConfig(camera='corner3,topview').num_vision_tokens == 72; "
        "assert 'mujoco' not in sys.modules and 'metaworld' not in sys.modules, 'simulator imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
