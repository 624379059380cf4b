"""Training the reference VLA on CPU: cached encoder features, AdamW, warmup + cosine, EMA, a time budget.

Recipe (docs/reference_vla.md has the numbers):
- frozen encoders run once per shard (``features.py``); a step runs only the backbone and the DiT head;
- bf16 autocast on CPU (fp32 master weights): on CPUs with AMX/AVX512-BF16 the matmuls run ~10x faster;
- ``n_noise`` diffusion noise draws per backbone forward: the DiT is small, so this is a cheap extra signal;
- the learning-rate schedule follows *progress*, the larger of step / max_steps and elapsed / time budget,
  so a time-budgeted run always finishes its cosine decay when the budget ends, whatever the machine's speed;
- EMA weights are what gets saved (checkpoints every few minutes and at the end, each written atomically).

With a time budget the number of steps depends on the machine's speed, so only step-budgeted runs
(``max_steps`` without ``time_budget_min``) are reproducible bit for bit from the seed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from daptq.data import EpisodeDataset, open_dataset
from daptq.data.chunks import ChunkDataset
from daptq.models.reference import (
    ReferenceVLA,
    ReferenceVLAConfig,
    count_parameters,
    load_reference,
    save_reference_checkpoint,
    transfer_weights,
)
from daptq.train.features import encode_shards, shard_instructions


@dataclass
class TrainConfig:
    data: str
    out: str
    cache: str | None = None  # feature cache directory; default <data>-features
    tasks: list[str] | None = None  # default: every task in the dataset
    allow_incomplete: bool = False  # train on the shards written so far (pilot runs)
    batch_size: int = 64
    n_noise: int = 4
    lr: float = 3e-4
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    warmup_steps: int = 300
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    time_budget_min: float | None = None
    max_steps: int | None = None
    checkpoint_every_min: float = 5.0
    val_every: int = 500
    val_samples: int = 512
    seed: int = 0
    threads: int = 2
    precision: str = "bf16"  # or "fp32"
    model: dict[str, Any] = field(default_factory=dict)  # ReferenceVLAConfig overrides
    # Fine-tune: start from this checkpoint (a directory or "ref:<name>") with its architecture and state
    # normalization, instead of a fresh model. With init, ``model`` may only set "camera" (adding views).
    init: str | None = None

    def __post_init__(self) -> None:
        if self.time_budget_min is None and self.max_steps is None:
            raise ValueError("set time_budget_min and/or max_steps, or training would never stop")
        if self.time_budget_min is not None and not 0 < self.time_budget_min < math.inf:
            raise ValueError(f"time_budget_min must be a finite number > 0, got {self.time_budget_min}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("batch_size", "n_noise", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        # not `x <= 0`: nan compares false both ways and would train on
        for name in ("grad_clip", "checkpoint_every_min"):
            if not math.isfinite(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "min_lr_ratio"):  # lr 0: the EMA stays the initial weights
            if not math.isfinite(getattr(self, name)) or not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("val_every", "val_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.seed < 0:
            raise ValueError(f"warmup_steps and seed must be >= 0, got {self.warmup_steps}, {self.seed}")
        if self.init is not None and set(self.model) - {"camera"}:
            raise ValueError(
                "with init, the checkpoint fixes the model; only 'camera' may be overridden (to add views), "
                f"got {sorted(self.model)}"
            )


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr`` at progress 1."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


class EMA:
    """Exponential moving average of the trainable parameters; the decay ramps up over the first steps."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.params = named_params
        self.shadow = {k: p.detach().clone().float() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and EMA weights (call twice to restore)."""
        for k, p in self.params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[k])
            self.shadow[k].copy_(tmp)


def language_features(
    model: ReferenceVLA, instructions: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    with torch.no_grad():
        for s in instructions:
            tok = model.language.tokenize([s])
            out[s] = (
                model.language(tok["input_ids"], tok["attention_mask"])[0],
                tok["attention_mask"][0].bool(),
            )
    return out


def default_cache_dir(data: str | Path) -> Path:
    """``<data>-features`` next to the dataset, so the dataset directory stays as its generator wrote it."""
    data = Path(data).resolve()
    return data.with_name(data.name + "-features")


def _load_data(cfg: TrainConfig, ds: EpisodeDataset, model: ReferenceVLA, split: str) -> ChunkDataset | None:
    if split not in ds.splits:
        return None
    shards = ds.shard_paths(split, cfg.tasks)
    if not shards:
        if split == "train":
            raise FileNotFoundError(f"no {split} shards under {Path(cfg.data) / split}")
        return None
    cache = Path(cfg.cache) if cfg.cache else default_cache_dir(cfg.data)
    files = encode_shards(shards, cache, model.vision)
    return ChunkDataset(files, model.config.chunk_size, language_features(model, shard_instructions(files)))


def _initial_model(cfg: TrainConfig, dataset: EpisodeDataset) -> ReferenceVLA:
    """A fresh model, or the one in ``cfg.init`` (fine-tuning keeps its weights and state normalization).

    A fresh model sees the dataset's cameras unless ``model["camera"]`` says otherwise. ``init`` with a
    ``model["camera"]`` that adds cameras grows the checkpoint's model by those views (``transfer_weights``).
    Either way the model must see what the dataset recorded.
    """
    if cfg.init is None:
        overrides = {"image_size": dataset.info.get("image_size", 96), "camera": dataset.info.get("camera")}
        model = ReferenceVLA(ReferenceVLAConfig(**{**overrides, **cfg.model}))
    else:
        model = load_reference(cfg.init).model
        if not isinstance(model, ReferenceVLA):  # e.g. ref:libero-smolvla, which --arch smolvla trains
            raise ValueError(
                f"--init {cfg.init}: a {type(model).__name__}, not the Meta-World reference's architecture "
                "(--arch reference fine-tunes a ReferenceVLA; --arch smolvla the LIBERO reference)"
            )
        if cfg.model.get("camera", model.config.camera) != model.config.camera:
            target = ReferenceVLA(ReferenceVLAConfig(**{**model.config.to_dict(), **cfg.model}))
            transfer_weights(model, target)
            model = target
    recorded = {"image_size": dataset.info.get("image_size"), "camera": dataset.info.get("camera")}
    sees = {"image_size": model.config.image_size, "camera": model.config.camera}
    if recorded != sees:
        raise ValueError(f"the model sees {sees} but dataset {cfg.data} recorded {recorded}")
    return model


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


Objective = Callable[[dict[str, torch.Tensor], torch.Generator, int], torch.Tensor]
"""``objective(batch, generator, n_noise)``: the training loss of one batch, differentiable."""


@dataclass
class Progress:
    """Where a run stands: what the checkpoints' ``training`` metadata and the final report say."""

    step: int = 0
    elapsed: float = 0.0  # seconds
    loss: float | None = None  # running average of the training loss
    val: float | None = None  # validation loss of the EMA weights


def open_run(cfg: TrainConfig) -> tuple[torch.Generator, EpisodeDataset]:
    """Threads and seeds (the global seed draws a fresh model's weights; the generator draws batches and
    noise), and the dataset. Both trainers start this way, so a seed means the same run in each."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    return gen, open_dataset(cfg.data, allow_incomplete=cfg.allow_incomplete)


def prepare_out(cfg: TrainConfig) -> tuple[Path, Path]:
    """``cfg.out`` and its fresh ``train_log.jsonl`` path; call only once the dataset and the model are known
    good, so a refused run touches nothing there."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    return out, log_path


def val_batch_of(cfg: TrainConfig, val: ChunkDataset | None) -> dict[str, torch.Tensor] | None:
    """The fixed validation batch (its own seed, so it does not move the training draws)."""
    return val.sample(cfg.val_samples, torch.Generator().manual_seed(cfg.seed + 1)) if val else None


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def training_record(
    cfg: TrainConfig, dataset: EpisodeDataset, data: ChunkDataset, run: Progress, final: bool
) -> dict[str, Any]:
    """The ``training`` metadata a checkpoint carries: the run's progress, its data and its config."""
    return {
        "steps": run.step,
        "elapsed_min": round(run.elapsed / 60, 2),
        "samples": run.step * cfg.batch_size,
        "final": final,
        "train_loss": run.loss,
        "val_loss_ema": run.val,
        "frames": len(data),
        "scene_version": dataset.scene_version,
        "demo_version": dataset.demo_version,
        "shards": data.files,
        "instructions": data.instructions,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
        "torch": torch.__version__,
    }


def fit(
    cfg: TrainConfig,
    model: torch.nn.Module,
    data: ChunkDataset,
    val_batch: dict[str, torch.Tensor] | None,
    objective: Objective,
    gen: torch.Generator,
    log_path: Path,
    save: Callable[[Progress, bool, dict[str, torch.Tensor]], None],
) -> Progress:
    """The training loop both trainers run: AdamW (no decay on vectors), warmup + cosine over the progress,
    gradient clipping, EMA, validation of the EMA weights every ``val_every`` steps (logged to ``log_path``),
    ``save(progress, final, ema_weights)`` every ``checkpoint_every_min`` and once at the end (also after
    Ctrl-C). Returns the final progress."""
    params = trainable_parameters(model)
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    ema = EMA(params, cfg.ema_decay)
    amp = cfg.precision == "bf16"

    def val_loss() -> float | None:
        if val_batch is None:
            return None
        ema.swap()
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = objective(val_batch, torch.Generator().manual_seed(0), 4)
        ema.swap()
        model.train()
        return float(loss)

    model.train()
    start = time.monotonic()
    last_ckpt = start
    run = Progress()
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    bar = tqdm(total=cfg.max_steps, desc="train", unit="step", dynamic_ncols=True)
    try:
        while True:
            elapsed = time.monotonic() - start
            progress = max(
                run.step / cfg.max_steps if cfg.max_steps else 0.0, elapsed / budget_s if budget_s else 0.0
            )
            if progress >= 1.0:
                break
            lr = lr_at(run.step, progress, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = data.sample(cfg.batch_size, gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = objective(batch, gen, cfg.n_noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            ema.update(run.step)
            run.step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {run.step}; lower --lr")
            run.loss = value if run.loss is None else 0.98 * run.loss + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{run.loss:.4f}", lr=f"{lr:.2e}", progress=f"{progress:.0%}")
            if run.step % cfg.val_every == 0:
                run.val = val_loss()
                rec = {
                    "step": run.step,
                    "loss": run.loss,
                    "lr": lr,
                    "val_loss_ema": run.val,
                    "min": elapsed / 60,
                }
                _append_jsonl(log_path, rec)
            if time.monotonic() - last_ckpt >= cfg.checkpoint_every_min * 60:
                run.elapsed = time.monotonic() - start
                save(run, False, ema.shadow)
                last_ckpt = time.monotonic()
    except KeyboardInterrupt:
        print(f"\ntrain: interrupted at step {run.step}; saving the EMA weights")
    finally:
        bar.close()
    run.elapsed = time.monotonic() - start
    run.val = val_loss()
    _append_jsonl(
        log_path, {"step": run.step, "loss": run.loss, "val_loss_ema": run.val, "min": run.elapsed / 60}
    )
    save(run, True, ema.shadow)
    return run


def train(cfg: TrainConfig) -> Path:
    """Train, save EMA checkpoints to ``cfg.out`` periodically and at the end; return the output directory."""
    gen, dataset = open_run(cfg)
    model = _initial_model(cfg, dataset)
    out, log_path = prepare_out(cfg)
    data = _load_data(cfg, dataset, model, "train")
    val = _load_data(cfg, dataset, model, "val")
    if cfg.init is None:
        model.set_state_stats(data.states.mean(0), data.states.std(0))
    val_batch = val_batch_of(cfg, val)
    n_trainable = sum(p.numel() for p in trainable_parameters(model).values())
    print(
        f"train: {len(data)} frames, {len(data.instructions)} instructions, "
        f"{n_trainable / 1e6:.2f}M trainable params (backbone {count_parameters(model.blocks) / 1e6:.2f}M, "
        f"head {count_parameters(model.head) / 1e6:.2f}M)"
    )

    def objective(batch: dict[str, torch.Tensor], generator: torch.Generator, n_noise: int) -> torch.Tensor:
        z = model.condition(batch)
        return model.denoising_loss(z, batch["actions"], generator=generator, n_noise=n_noise)

    def save(run: Progress, final: bool, weights: dict[str, torch.Tensor]) -> None:
        meta = {"training": training_record(cfg, dataset, data, run, final)}
        save_reference_checkpoint(model, out, meta, weights=weights)

    run = fit(cfg, model, data, val_batch, objective, gen, log_path, save)
    print(
        f"train: {run.step} steps in {run.elapsed / 60:.1f} min, loss {run.loss:.4f}, val {run.val}; "
        f"saved to {out}"
    )
    return out


__all__ = ["TrainConfig", "train", "lr_at", "EMA", "Progress", "fit", "training_record"]
