"""Training the second reference VLA (``ref:libero-smolvla``, ``daptq train --arch smolvla``) on CPU.

The recipe is the first reference VLA's (``trainer.py``: cached frozen-encoder features, AdamW with warmup
and a cosine that ends with the time budget, gradient clipping, EMA weights saved every few minutes and at the
end, atomically) with SmolVLA's objective: the velocity MSE of flow matching at Beta(1.5, 1) times,
``n_noise`` (noise, time) draws per prefix pass (the expert is the cheap part). States and actions are
normalized MEAN_STD with the training frames' statistics, which the checkpoint stores as lerobot's processor
files. The loop itself is ``trainer.fit``, the one the Meta-World reference trains with; only the model,
the objective and the checkpoint layout are SmolVLA's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from daptq.data import EpisodeDataset
from daptq.data.chunks import ChunkDataset
from daptq.models.bundled_encoders import count_parameters
from daptq.models.lerobot_vla.modeling import pad_last
from daptq.models.libero_smolvla import (
    NAME,
    LiberoSmolVLA,
    LiberoSmolVLAAdapter,
    LiberoSmolVLAPolicy,
    build_config,
    compute_statistics,
    save_checkpoint,
    statistics_of,
)
from daptq.train.trainer import (
    Progress,
    TrainConfig,
    _load_data,
    fit,
    open_run,
    prepare_out,
    trainable_parameters,
    training_record,
    val_batch_of,
)


def _initial_model(cfg: TrainConfig, dataset: EpisodeDataset) -> tuple[LiberoSmolVLA, dict | None]:
    """A fresh model that sees the dataset's camera and image size (``cfg.model`` overrides sizes), or the
    ``cfg.init`` checkpoint with its statistics (fine-tuning keeps its normalization)."""
    recorded = {"image_size": dataset.info.get("image_size"), "camera": dataset.info.get("camera")}
    if cfg.init is None:
        overrides = {k: v for k, v in recorded.items() if v is not None}
        config, stand_ins = build_config(**{**overrides, **cfg.model})
        model, stats = LiberoSmolVLA(config, stand_ins), None
    else:
        from daptq.models.reference import load_reference

        policy = load_reference(cfg.init)
        if not isinstance(policy, LiberoSmolVLAPolicy):
            raise ValueError(f"--init {cfg.init}: not a {NAME} checkpoint (--arch smolvla fine-tunes one)")
        model = policy.model
        stats = {f: {k: v.tolist() for k, v in s.items()} for f, s in policy.statistics.stats.items()}
        if cfg.model.get("camera", model.stand_ins.camera) != model.stand_ins.camera:
            raise ValueError(f"--init {cfg.init}: {NAME} sees one camera; it cannot be grown by views")
    sees = {"image_size": model.config.image_size, "camera": model.stand_ins.camera}
    if recorded != sees:
        raise ValueError(f"the {NAME} model sees {sees} but dataset {cfg.data} recorded {recorded}")
    if "," in str(sees["camera"]):
        raise ValueError(f"{NAME} sees one camera; dataset {cfg.data} has {sees['camera']!r}")
    return model, stats


def _normalize(data: ChunkDataset, adapter: LiberoSmolVLAAdapter, where: str) -> None:
    """Replace the dataset's robot-unit states / actions by the model's normalized (padded) ones, once."""
    c = adapter.config
    if data.states.shape[1] != c.state_dim or data.actions.shape[1] != c.action_dim:
        raise ValueError(
            f"{where}: states {tuple(data.states.shape[1:])} / actions {tuple(data.actions.shape[1:])} per "
            f"frame; {NAME} takes ({c.state_dim},) / ({c.action_dim},) (LIBERO's 8-D proprio, 7-D actions)"
        )
    stats = adapter.statistics
    data.states = pad_last(stats.normalize(data.states, "observation.state", "STATE"), c.max_state_dim)
    data.actions = stats.normalize(data.actions, "action", "ACTION")


def train_smolvla(cfg: TrainConfig) -> Path:
    """Train, save EMA checkpoints (lerobot's SmolVLA layout) to ``cfg.out`` periodically and at the end."""
    gen, dataset = open_run(cfg)
    model, stats = _initial_model(cfg, dataset)
    out, log_path = prepare_out(cfg)
    data = _load_data(cfg, dataset, model, "train")
    val = _load_data(cfg, dataset, model, "val")
    if stats is None:
        stats = compute_statistics(data.states, data.actions)
    adapter = LiberoSmolVLAAdapter(model, statistics_of(stats, model.config))
    _normalize(data, adapter, f"{cfg.data}/train")
    if val is not None:
        _normalize(val, adapter, f"{cfg.data}/val")
    val_batch = val_batch_of(cfg, val)
    capability = torch.backends.cpu.get_cpu_capability()
    if cfg.precision == "bf16" and capability in ("DEFAULT", "VSX", "ZVECTOR", "AVX2", "NO AVX"):
        print(
            f"train: warning: this CPU ({capability}) has no bf16 matrix units; bf16 autocast runs several "
            "times slower than fp32 here (5x measured on AVX2): pass --precision fp32"
        )
    vlm = model.vlm_with_expert.vlm.model.text_model
    print(
        f"train {NAME}: {len(data)} frames, {len(data.instructions)} instructions, "
        f"{sum(p.numel() for p in trainable_parameters(model).values()) / 1e6:.2f}M trainable params (text "
        f"layers {count_parameters(vlm) / 1e6:.2f}M, expert {count_parameters(model.expert) / 1e6:.2f}M)"
    )

    def objective(batch: dict[str, torch.Tensor], generator: torch.Generator, n_noise: int) -> torch.Tensor:
        return adapter.flow_objective(batch, None, generator, n_noise)

    def save(run: Progress, final: bool, weights: dict[str, torch.Tensor]) -> None:
        training: dict[str, Any] = {"arch": "smolvla", **training_record(cfg, dataset, data, run, final)}
        save_checkpoint(model, out, stats, {"training": training}, weights=weights)

    run = fit(cfg, model, data, val_batch, objective, gen, log_path, save)
    print(
        f"train: {run.step} steps in {run.elapsed / 60:.1f} min, loss {run.loss}, val {run.val}; "
        f"saved to {out}"
    )
    return out


__all__ = ["train_smolvla"]
