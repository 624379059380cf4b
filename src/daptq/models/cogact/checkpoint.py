"""Load a CogACT run directory as the original writes it, and write one (for tests) in the same layout.

A run directory (the original's ``scripts/train.py`` output, or a Hugging Face CogACT repository)::

    RUN/config.json               training config: vla.base_vlm, action_model_type, future_action_window_size
    RUN/dataset_statistics.json   {dataset: {"action": {"q01", "q99", "mask", ...}, ...}}
    RUN/checkpoints/*.pt          torch.save({"model": {"vision_backbone": {...}, "llm_backbone": {...},
                                                        "projector": {...}, "action_model": {...}}})
    RUN/tokenizer/                (not in the original's layout) the Llama-2 tokenizer files, or tokenizer=DIR

The ``.pt`` is read with ``torch.load(weights_only=True, mmap=True)``: nothing but tensors in nested dicts is
accepted (any other object is refused, naming its key), and every group must match the architecture key for
key and shape for shape (all missing, unexpected and mis-shaped keys are listed). The model is built on the
meta device and the checkpoint's tensors are assigned into it, so a 7B model is never initialized twice.
An ``ema_diffusion`` group (written with ``use_ema``) is ignored, as the original does by default.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daptq.atomic import atomic_write_bytes, atomic_write_json
from daptq.integrity import sha256_file
from daptq.models.cogact.config import DIT_SIZES, CogACTConfig
from daptq.models.cogact.model import CHECKPOINT_GROUPS, CogACT
from daptq.models.family_common import (
    MismatchFormat,
    assign_state,
    check_materialized,
    compare_keys,
    read_json,
    save_tokenizer_dir,
)

OPTIONAL_GROUPS = ("ema_diffusion",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class RunFiles:
    """The files of one CogACT run a loader reads."""

    run_dir: Path
    config: Path
    statistics: Path
    checkpoint: Path
    tokenizer: Path | None

    def paths(self) -> list[Path]:
        """Every file the policy is built from (config, statistics, checkpoint, tokenizer files)."""
        files = [self.config, self.statistics, self.checkpoint]
        if self.tokenizer is not None:
            files += sorted(p for p in self.tokenizer.iterdir() if p.is_file() and not p.name.startswith("."))
        return files

    def sha256(self) -> dict[str, str]:
        """sha256 of every file the model is built from, by path relative to the run directory (provenance;
        a quantized directory records these to refuse a changed base)."""
        out = {}
        for f in self.paths():
            try:
                key = str(f.relative_to(self.run_dir))
            except ValueError:
                key = str(f)
            out[key] = sha256_file(f)
        return out


def resolve_run(
    path: str | Path, checkpoint: str | None = None, tokenizer: str | Path | None = None
) -> RunFiles:
    """The run's files from its directory or from a ``RUN/checkpoints/NAME.pt`` path (as the original's
    ``load_vla`` accepts). With several checkpoints, ``checkpoint`` names one (else
    ``latest-checkpoint.pt``)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".pt" or path.parent.name != "checkpoints":
            raise ValueError(f"{path}: a CogACT checkpoint file must be RUN/checkpoints/NAME.pt")
        run_dir, pt = path.parents[1], path
    elif path.is_dir():
        run_dir = path
        ckpt_dir = run_dir / "checkpoints"
        candidates = sorted(ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
        if checkpoint is not None:
            pt = ckpt_dir / checkpoint
            if not pt.is_file():
                raise FileNotFoundError(f"{pt} not found; checkpoints: {[p.name for p in candidates]}")
        elif len(candidates) == 1:
            pt = candidates[0]
        elif (ckpt_dir / "latest-checkpoint.pt").is_file():
            pt = ckpt_dir / "latest-checkpoint.pt"
        elif not candidates:
            raise FileNotFoundError(f"{ckpt_dir}: no *.pt checkpoint (is {run_dir} a CogACT run directory?)")
        else:
            raise ValueError(
                f"{ckpt_dir} holds {len(candidates)} checkpoints and no latest-checkpoint.pt: name one "
                f"(cogact:PATH?checkpoint=NAME); found {[p.name for p in candidates]}"
            )
    else:
        raise FileNotFoundError(f"CogACT run directory or checkpoint not found: {path}")
    files = {"config": run_dir / "config.json", "statistics": run_dir / "dataset_statistics.json"}
    for what, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"{run_dir}: missing {f.name} (the run's {what})")
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is None:
        for candidate in (run_dir / "tokenizer", run_dir):
            if any((candidate / n).is_file() for n in TOKENIZER_FILES):
                tok = candidate
                break
    return RunFiles(run_dir, files["config"], files["statistics"], pt, tok)


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file is in the zip format."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # pickle.UnpicklingError: weights_only refused an object; or a corrupt file
        raise ValueError(f"{path}: refused by torch.load(weights_only=True): {e}") from e


def _non_tensors(obj: Any, where: str) -> list[str]:
    """Every leaf of a nested mapping that is not a tensor (or a key that is not a string), by its path."""
    if isinstance(obj, torch.Tensor):
        return []
    if not isinstance(obj, Mapping):
        return [f"{where} ({type(obj).__name__})"]
    out = []
    for k, v in obj.items():
        if not isinstance(k, str):
            out.append(f"{where}[{k!r}] (a {type(k).__name__} key)")
        else:
            out += _non_tensors(v, f"{where}.{k}")
    return out


def read_checkpoint(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``checkpoint["model"]`` as {group: {key: tensor}}; refuses anything that is not a dict of tensors."""
    obj = _torch_load(path)
    if not isinstance(obj, Mapping) or set(obj) != {"model"}:
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path}: expected {{'model': {{group: state_dict}}}}, found top level {keys}")
    model = obj["model"]
    if not isinstance(model, Mapping):
        raise ValueError(f"{path}: 'model' is a {type(model).__name__}, not a dict of state dicts")
    bad = _non_tensors(model, "model")
    if bad:
        raise ValueError(f"{path}: non-tensor objects where tensors belong: {bad[:10]}")
    unknown = sorted(set(model) - set(CHECKPOINT_GROUPS) - set(OPTIONAL_GROUPS))
    if unknown:
        raise ValueError(
            f"{path}: unexpected groups {unknown} in 'model' (expected {list(CHECKPOINT_GROUPS)})"
        )
    missing = [g for g in CHECKPOINT_GROUPS if g not in model]
    if missing:
        raise ValueError(f"{path}: 'model' is missing the groups {missing}")
    for group in CHECKPOINT_GROUPS:
        if isinstance(model[group], torch.Tensor) or any(
            not isinstance(v, torch.Tensor) for v in model[group].values()
        ):
            raise ValueError(f"{path}: model.{group} must be a flat state dict (name -> tensor)")
    return {group: dict(model[group]) for group in CHECKPOINT_GROUPS}


# The wording CogACT's loader has always used ("missing keys (1): ['...']").
MISMATCH = MismatchFormat(
    labels=("missing keys", "unexpected keys", "wrong shapes"),
    counted=False,
    part_sep="; ",
    shape="{key}: checkpoint {got}, model {want}",
)


def check_groups(model: CogACT, groups: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
    """Key-for-key, shape-for-shape comparison of checkpoint groups against the model; one error lists all."""
    expected = {f"{g}.{k}": v for g in CHECKPOINT_GROUPS for k, v in getattr(model, g).state_dict().items()}
    got = {f"{g}.{k}": v for g in CHECKPOINT_GROUPS for k, v in groups[g].items()}
    compare_keys(expected, got).raise_if_any(source, "CogACT", MISMATCH)


def build_cogact(
    config: CogACTConfig,
    groups: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> CogACT:
    """The model from checkpoint groups (built on the meta device, tensors assigned), or random weights."""
    if groups is None:
        return CogACT(config).to(dtype).eval()
    with torch.device("meta"):
        model = CogACT(config)
    check_groups(model, groups, source)
    for group in CHECKPOINT_GROUPS:
        assign_state(getattr(model, group), groups[group], dtype)
    model.llm_backbone.reset_rotary()
    check_materialized(model, source)
    return model.eval()


def model_from_run(files: RunFiles, dtype: torch.dtype = torch.float32) -> tuple[CogACT, dict[str, Any]]:
    """(model, the run's config.json) from a resolved run."""
    run_config = read_json(files.config)
    groups = read_checkpoint(files.checkpoint)
    config = CogACTConfig.from_run_config(run_config, str(files.config), dit_type_of(groups["action_model"]))
    model = build_cogact(config, groups, dtype, str(files.checkpoint))
    return model, run_config


def dit_type_of(action_model: Mapping[str, torch.Tensor]) -> str | None:
    """``DiT-S``/``-B``/``-L`` from the width and depth of a checkpoint's action model, or None if it is none
    of them. The original takes the type as a load-time argument (its run config records the trainer's
    default), so the checkpoint is the reliable witness."""
    pos = action_model.get("net.positional_embedding")
    if pos is None or pos.ndim != 2:
        return None
    depth = len({k.split(".")[2] for k in action_model if k.startswith("net.blocks.")})
    for name, (d, hidden, _) in DIT_SIZES.items():
        if (d, hidden) == (depth, pos.shape[1]):
            return name
    return None


def save_cogact_run(
    model: CogACT,
    directory: str | Path,
    dataset_statistics: Mapping[str, Any],
    tokenizer: Any = None,
    checkpoint_name: str = "latest-checkpoint.pt",
    base_vlm: str = "prism-dinosiglip-224px+7b",
) -> Path:
    """Write a run directory in the original's layout (used by tests: real runs come from CogACT's trainer).

    ``config.json`` carries the original's fields plus ``daptq_architecture`` (the exact sizes, so tiny
    models load); the checkpoint is ``{"model": {group: state_dict}}``; a tokenizer goes to ``tokenizer/``.
    Each file is written atomically.
    """
    directory = Path(directory)
    c = model.config
    run_config = {
        "vla": {"vla_id": "daptq-test", "base_vlm": base_vlm},
        "action_model_type": c.action_model_type,
        "action_dim": c.action_dim,
        "future_action_window_size": c.future_action_window_size,
        "past_action_window_size": c.past_action_window_size,
        "use_ema": False,
        "daptq_architecture": c.to_dict(),
    }
    buf = io.BytesIO()
    state = {
        g: {k: v.detach().cpu().clone() for k, v in getattr(model, g).state_dict().items()}
        for g in CHECKPOINT_GROUPS
    }
    torch.save({"model": state}, buf)
    atomic_write_bytes(directory / "checkpoints" / checkpoint_name, buf.getvalue())
    atomic_write_json(directory / "dataset_statistics.json", dict(dataset_statistics))
    atomic_write_json(directory / "config.json", run_config)
    if tokenizer is not None:
        save_tokenizer_dir(tokenizer, directory / "tokenizer")
    return directory
