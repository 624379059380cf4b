"""Training the second reference VLA (``ref:libero-smolvla``, ``daptq train --arch smolvla``) on CPU.

The recipe is the first reference VLA's (``trainer.py``: cached frozen-encoder features, AdamW with warmup
and a cosine that ends with the time budget, gradient clipping, EMA weights saved every few minutes and at the
end, atomically) with SmolVLA's objective: the velocity MSE of flow matching at Beta(1.5, 1) times,
``n_noise`` (noise, time) draws per prefix pass (the expert is the cheap part). States and actions are
normalized MEAN_STD with the training frames' statistics, which the checkpoint stores as lerobot's processor
files. The Meta-World reference's path (``trainer.train``) is not touched.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from daptq.data import EpisodeDataset, open_dataset
from daptq.data.chunks import ChunkDataset
from daptq.models.lerobot_vla.modeling import pad_last
from daptq.models.libero_smolvla import (
    NAME,
    LiberoSmolVLA,
    LiberoSmolVLAAdapter,
    LiberoSmolVLAPolicy,
    build_config,
    compute_statistics,
    count_parameters,
    save_checkpoint,
    statistics_of,
)
from daptq.train.trainer import EMA, TrainConfig, _append_jsonl, _load_data, lr_at


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
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dataset = open_dataset(cfg.data, allow_incomplete=cfg.allow_incomplete)
    model, stats = _initial_model(cfg, dataset)
    out = Path(cfg.out)  # only now, with the dataset and the model known good, is anything in out touched
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    data = _load_data(cfg, dataset, model, "train")
    val = _load_data(cfg, dataset, model, "val")
    if stats is None:
        stats = compute_statistics(data.states, data.actions)
    adapter = LiberoSmolVLAAdapter(model, statistics_of(stats, model.config))
    _normalize(data, adapter, f"{cfg.data}/train")
    if val is not None:
        _normalize(val, adapter, f"{cfg.data}/val")
    val_batch = val.sample(cfg.val_samples, torch.Generator().manual_seed(cfg.seed + 1)) if val else None

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    ema = EMA(params, cfg.ema_decay)
    amp = cfg.precision == "bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    if amp and capability in ("DEFAULT", "VSX", "ZVECTOR", "AVX2", "NO AVX"):
        print(
            f"train: warning: this CPU ({capability}) has no bf16 matrix units; bf16 autocast runs several "
            "times slower than fp32 here (5x measured on AVX2): pass --precision fp32"
        )
    vlm = model.vlm_with_expert.vlm.model.text_model
    print(
        f"train {NAME}: {len(data)} frames, {len(data.instructions)} instructions, "
        f"{sum(p.numel() for p in params.values()) / 1e6:.2f}M trainable params (text layers "
        f"{count_parameters(vlm) / 1e6:.2f}M, expert {count_parameters(model.expert) / 1e6:.2f}M)"
    )

    def val_loss() -> float | None:
        if val_batch is None:
            return None
        ema.swap()
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = adapter.flow_objective(val_batch, None, torch.Generator().manual_seed(0), 4)
        ema.swap()
        model.train()
        return float(loss)

    def save(step: int, elapsed: float, final: bool, last_loss: float | None, last_val: float | None) -> None:
        training: dict[str, Any] = {
            "arch": "smolvla",
            "steps": step,
            "elapsed_min": round(elapsed / 60, 2),
            "samples": step * cfg.batch_size,
            "final": final,
            "train_loss": last_loss,
            "val_loss_ema": last_val,
            "frames": len(data),
            "scene_version": dataset.scene_version,
            "demo_version": dataset.demo_version,
            "shards": data.files,
            "instructions": data.instructions,
            "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
            "torch": torch.__version__,
        }
        save_checkpoint(model, out, stats, {"training": training}, weights=ema.shadow)

    model.train()
    start = last_ckpt = time.monotonic()
    step, loss_avg, last_val = 0, None, None
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    bar = tqdm(total=cfg.max_steps, desc="train", unit="step", dynamic_ncols=True)
    try:
        while True:
            elapsed = time.monotonic() - start
            progress = max(
                step / cfg.max_steps if cfg.max_steps else 0.0, elapsed / budget_s if budget_s else 0.0
            )
            if progress >= 1.0:
                break
            lr = lr_at(step, progress, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = data.sample(cfg.batch_size, gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = adapter.flow_objective(batch, None, gen, cfg.n_noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            ema.update(step)
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}; lower --lr")
            loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", progress=f"{progress:.0%}")
            if step % cfg.val_every == 0:
                last_val = val_loss()
                rec = {
                    "step": step,
                    "loss": loss_avg,
                    "lr": lr,
                    "val_loss_ema": last_val,
                    "min": elapsed / 60,
                }
                _append_jsonl(log_path, rec)
            if time.monotonic() - last_ckpt >= cfg.checkpoint_every_min * 60:
                save(step, time.monotonic() - start, False, loss_avg, last_val)
                last_ckpt = time.monotonic()
    except KeyboardInterrupt:
        print(f"\ntrain: interrupted at step {step}; saving the EMA weights")
    finally:
        bar.close()
    elapsed = time.monotonic() - start
    last_val = val_loss()
    _append_jsonl(log_path, {"step": step, "loss": loss_avg, "val_loss_ema": last_val, "min": elapsed / 60})
    save(step, elapsed, True, loss_avg, last_val)
    print(f"train: {step} steps in {elapsed / 60:.1f} min, loss {loss_avg}, val {last_val}; saved to {out}")
    return out


__all__ = ["train_smolvla"]
