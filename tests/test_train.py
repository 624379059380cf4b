"""Training the reference VLA on a tiny synthetic dataset written in daptq.data's on-disk format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from daptq.data.chunks import ChunkDataset
from daptq.data.format import FORMAT_VERSION, Episode, atomic_write_json, shard_path, write_shard
from daptq.models.reference import load_reference_checkpoint
from daptq.train.features import encode_shards, is_cached
from daptq.train.trainer import TrainConfig, lr_at, train

TINY_MODEL = {
    "image_size": 32,
    "d_model": 32,
    "n_layer": 1,
    "n_head": 2,
    "dit_d_model": 32,
    "dit_n_layer": 1,
    "dit_n_head": 2,
}
INSTRUCTIONS = {
    "reach": "reach the red goal marker with the gripper",
    "push": "push the puck to the red goal marker",
}


def _episode(task: str, seed: int, length: int) -> Episode:
    rng = np.random.default_rng(seed)
    # The action label depends on the task, so a model has something to learn from the instruction.
    sign = 1.0 if task == "reach" else -1.0
    actions = np.tile(np.array([0.5 * sign, -0.3, 0.2, sign], dtype=np.float32), (length, 1))
    return Episode(
        task=task,
        instruction=INSTRUCTIONS[task],
        seed=seed,
        success=True,
        images=rng.integers(0, 256, (length, 32, 32, 3), dtype=np.uint8),
        states=rng.normal(size=(length, 4)).astype(np.float32),
        actions=actions,
        ee_pos=rng.normal(size=(length, 3)).astype(np.float32),
        executed_actions=actions.copy(),
        step_success=np.zeros(length, dtype=bool),
    )


def write_tiny_dataset(root) -> None:
    for split, first_seed in (("train", 0), ("val", 200_000)):
        for task in INSTRUCTIONS:
            eps = [_episode(task, first_seed + i, length=6 + i) for i in range(2)]
            write_shard(shard_path(root, split, task, 0), eps, discarded_seeds=[])
    info = {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "tasks": list(INSTRUCTIONS),
        "instructions": INSTRUCTIONS,
        "image_size": 32,
        "camera": "corner3",
        "splits": {"train": {"episodes": 4}, "val": {"episodes": 4}},
    }
    atomic_write_json(root / "meta" / "info.json", info)
    atomic_write_json(root / "meta" / "stats.json", {})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny_dataset(root)
    return root


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(data="d", out="o", max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 0.09, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.09))))
    assert lr_at(99, 1.0, cfg) == pytest.approx(1e-4)


def test_train_config_rejects_a_run_that_never_stops():
    with pytest.raises(ValueError, match="time_budget_min"):
        TrainConfig(data="d", out="o")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(data="d", out="o", max_steps=1, precision="fp8")


def test_feature_cache_and_chunks(tiny_data, tmp_path):
    from daptq.models.encoders import VisionEncoder

    encoder = VisionEncoder(image_size=32)
    shards = sorted((tiny_data / "train").glob("*.npz"))
    files = encode_shards(shards, tmp_path, encoder, progress=False)
    assert all(is_cached(tmp_path, s, encoder) for s in shards)
    lang = {s: (torch.randn(5, 384), torch.ones(5, dtype=torch.bool)) for s in INSTRUCTIONS.values()}
    data = ChunkDataset(files, chunk_size=8, language=lang)
    assert len(data) == 2 * (6 + 7)
    batch = data.batch(torch.tensor([0, 5, 6]))
    assert batch["vision_features"].shape == (3, 4, 112)  # 32 px -> 2x2 tokens
    assert batch["actions"].shape == (3, 8, 4)
    # frame 5 is the last of the first 6-step episode: its chunk repeats that label rather than crossing over.
    assert torch.equal(batch["actions"][1], data.actions[5].expand(8, 4))
    # frame 6 starts the next episode
    assert torch.equal(batch["actions"][2, :7], data.actions[6:13])


def _tiny_run(data, tmp_path, **overrides) -> dict:
    """TrainConfig arguments for a seconds-long run on the tiny dataset."""
    return {
        "data": str(data),
        "cache": str(tmp_path / "cache"),
        "batch_size": 8,
        "n_noise": 2,
        "lr": 3e-3,
        "warmup_steps": 5,
        "val_every": 10,
        "val_samples": 16,
        "threads": 1,
        **overrides,
    }


def test_short_training_run_changes_weights_and_saves_a_loadable_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "ckpt"
    cfg = TrainConfig(**_tiny_run(tiny_data, tmp_path, out=str(out), max_steps=30, model=TINY_MODEL))
    train(cfg)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert all(np.isfinite(losses)) and len(log) == 4
    meta = json.loads((out / "config.json").read_text())
    assert meta["training"]["steps"] == 30 and meta["training"]["final"]
    assert meta["training"]["scene_version"] == 1  # the tiny dataset predates the field: legacy version 1
    assert meta["training"]["demo_version"] == 1
    policy = load_reference_checkpoint(out)
    assert policy.demo_version == 1
    # EMA weights were saved, so the zero-initialised output layer of the DiT must have moved.
    assert policy.model.head.action_out.weight.abs().sum() > 0
    assert torch.allclose(
        policy.model.state_std, torch.from_numpy(np.std(_all_train_states(tiny_data), 0, ddof=1))
    )
    # the same seed gives the same weights (step-budgeted runs are reproducible)
    out2 = tmp_path / "ckpt2"
    train(TrainConfig(**{**cfg.__dict__, "out": str(out2)}))
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()


def test_fine_tuning_starts_from_the_checkpoint_and_keeps_its_state_normalization(tiny_data, tmp_path):
    base = _tiny_run(tiny_data, tmp_path, warmup_steps=2, val_every=100)
    train(TrainConfig(out=str(tmp_path / "base"), max_steps=10, model=TINY_MODEL, **base))
    start = load_reference_checkpoint(tmp_path / "base").model
    start.state_mean.fill_(0.25)  # a normalization the data would not give, to see it is kept
    from daptq.models.reference import save_reference_checkpoint

    save_reference_checkpoint(start, tmp_path / "base")
    with pytest.raises(ValueError, match="init"):
        TrainConfig(
            out=str(tmp_path / "x"), max_steps=1, model=TINY_MODEL, init=str(tmp_path / "base"), **base
        )

    # lr 0: the EMA of unchanged weights is the checkpoint itself, so fine-tuning starts exactly there.
    still = tmp_path / "still"
    train(TrainConfig(out=str(still), max_steps=3, init=str(tmp_path / "base"), **{**base, "lr": 0.0}))
    tuned = load_reference_checkpoint(still).model
    assert tuned.config == start.config
    tuned_state = tuned.trainable_state_dict()
    for name, a in start.trainable_state_dict().items():
        assert torch.equal(a, tuned_state[name]), name
    moved = tmp_path / "moved"
    train(TrainConfig(out=str(moved), max_steps=5, init=str(tmp_path / "base"), **base))
    tuned = load_reference_checkpoint(moved).model
    assert torch.equal(tuned.state_mean, torch.full_like(tuned.state_mean, 0.25))
    assert not torch.equal(tuned.head.action_out.weight, start.head.action_out.weight)
    meta = json.loads((moved / "config.json").read_text())
    assert meta["training"]["config"]["init"] == str(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(TrainConfig(out=str(tmp_path / "y"), max_steps=1, init=str(tmp_path / "nope"), **base))


def _all_train_states(root):
    from daptq.data import read_shard

    return np.concatenate([ep.states for p in sorted((root / "train").glob("*.npz")) for ep in read_shard(p)])


def test_model_must_see_the_dataset_cameras_and_fine_tuning_can_add_one(tiny_data, tmp_path):
    import shutil

    base = _tiny_run(tiny_data, tmp_path, warmup_steps=2, val_every=100)
    with pytest.raises(ValueError, match="recorded"):
        wrong = {**TINY_MODEL, "camera": "topview"}
        train(TrainConfig(out=str(tmp_path / "x"), max_steps=1, model=wrong, **base))
    train(TrainConfig(out=str(tmp_path / "one"), max_steps=2, model=TINY_MODEL, **base))

    # The same episodes with a second (here: copied) view, as `daptq.data.add_cameras` would write them.
    two = tmp_path / "two"
    shutil.copytree(tiny_data, two, ignore=shutil.ignore_patterns("*-features"))
    from daptq.data import read_shard

    for shard in sorted(two.glob("*/*.npz")):
        episodes = read_shard(shard)
        for ep in episodes:
            ep.images = np.stack([ep.images, 255 - ep.images], axis=1)
        write_shard(shard, episodes, discarded_seeds=[])
    info = json.loads((two / "meta" / "info.json").read_text())
    atomic_write_json(two / "meta" / "info.json", {**info, "camera": "corner3,topview"})
    grown = {**base, "data": str(two), "cache": str(tmp_path / "two-cache")}
    with pytest.raises(ValueError, match="recorded"):  # the one-camera checkpoint as it is
        train(TrainConfig(out=str(tmp_path / "y"), max_steps=1, init=str(tmp_path / "one"), **grown))
    train(
        TrainConfig(
            out=str(tmp_path / "grown"),
            max_steps=2,
            init=str(tmp_path / "one"),
            model={"camera": "corner3,topview"},
            **grown,
        )
    )
    model = load_reference_checkpoint(tmp_path / "grown").model
    assert model.config.camera == "corner3,topview" and model.pos_emb.shape[1] == 2 * 4 + 32 + 2
