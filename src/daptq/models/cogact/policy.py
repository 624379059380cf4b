"""CogACT in closed loop: observations in, actions in the robot's units out, and ``cogact:PATH`` loading.

``select_action`` runs the original's ``predict_action``: preprocess the image for both towers, build the
prompt, sample a normalized chunk (DDIM, guidance), un-normalize it with the run's dataset statistics
(clip, binarize the gripper, q01/q99 bounds). The original's SimplerEnv wrapper additionally ensembles
overlapping chunks (adaptive ensembling), converts Euler deltas to axis-angle and makes the gripper sticky;
those are benchmark-specific and not part of this policy: it returns the 7-D Euler delta-EEF actions and
executes ``n_action_steps`` of each chunk (1 by default: re-plan every step, as the original).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import Observation
from daptq.models.cogact.adapter import CogACTAdapter
from daptq.models.cogact.checkpoint import RunFiles, model_from_run, resolve_run
from daptq.models.cogact.model import CogACT
from daptq.models.cogact.processing import (
    COGACT_ACTION_SPACE,
    ActionStatistics,
    action_statistics,
    load_tokenizer,
    read_statistics,
)
from daptq.models.family_common import (
    FamilyPolicyMixin,
    parse_model_spec,
    require_observation,
    spec_dtype,
    spec_number,
)
from daptq.models.policy import ChunkedPolicy


class CogACTPolicy(FamilyPolicyMixin, ChunkedPolicy):
    """A CogACT model, its tokenizer and its dataset's action statistics as a closed-loop policy."""

    def __init__(
        self,
        model: CogACT,
        tokenizer: Any,
        statistics: ActionStatistics,
        n_action_steps: int = 1,
        cfg_scale: float | None = None,
        meta: Mapping[str, Any] | None = None,
        seed: int | None = None,
        run_files: RunFiles | None = None,
    ) -> None:
        if not 1 <= n_action_steps <= model.config.chunk_size:
            raise ValueError(
                f"n_action_steps must be in [1, {model.config.chunk_size}], got {n_action_steps}"
            )
        super().__init__(COGACT_ACTION_SPACE, n_action_steps, seed)
        self.model = model.eval()
        self.config = model.config
        self.statistics = statistics
        self.adapter = CogACTAdapter(model, tokenizer, statistics, cfg_scale)
        self.meta = dict(meta or {})
        self.run_files = run_files
        self.gripper_dims = [i for i, k in enumerate(self.action_space.kinds) if k == "gripper"]

    def source_files(self) -> list[Path]:
        """The files this policy was loaded from (a quantized directory pins its base by their sha256)."""
        return self.run_files.paths() if self.run_files is not None else []

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def observation_batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        require_observation(observation, ("image", "instruction"))
        return self.adapter.model_inputs(np.asarray(observation["image"])[None], [observation["instruction"]])

    def unnormalize(self, chunk: torch.Tensor | np.ndarray) -> np.ndarray:
        """Normalized model actions (..., 7) -> robot units (see ``ActionStatistics.unnormalize``)."""
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().float().cpu().numpy()
        return self.statistics.unnormalize(chunk, self.gripper_dims)

    @torch.no_grad()
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        chunk = self.adapter.predict_chunk(self.observation_batch(observation), generator)
        return self.unnormalize(chunk[0])

    def info_config(self) -> dict[str, Any]:
        return {
            "model": self.config.to_dict(),
            "statistics": self.statistics.to_dict(),
            "cfg_scale": self.adapter.cfg_scale,
            "action_space": self.action_space.to_dict(),
        }


SPEC_OPTIONS = ("unnorm_key", "checkpoint", "tokenizer", "n_action_steps", "cfg_scale", "dtype")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``cogact:PATH[?key=value&...]`` -> (PATH, options); options are ``SPEC_OPTIONS``."""
    return parse_model_spec(spec, "cogact:", SPEC_OPTIONS, "cogact:PATH[?unnorm_key=NAME&...]")


def load_cogact(
    path: str | Path,
    *,
    unnorm_key: str | None = None,
    checkpoint: str | None = None,
    tokenizer: str | Path | None = None,
    n_action_steps: int = 1,
    cfg_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> CogACTPolicy:
    """A ``CogACTPolicy`` from a CogACT run directory (or ``RUN/checkpoints/NAME.pt``); see ``checkpoint``.

    The tokenizer comes from ``tokenizer`` or ``RUN/tokenizer/`` (local files only; the released checkpoints
    use meta-llama/Llama-2-7b-hf's tokenizer, which the run directory does not include). ``meta["files"]``
    holds the sha256 of every file read (provenance).
    """
    files = resolve_run(path, checkpoint, tokenizer)
    if files.tokenizer is None:
        raise FileNotFoundError(
            f"{files.run_dir}: no tokenizer found (RUN/tokenizer/ or tokenizer files in RUN); copy the "
            "Llama-2 tokenizer files there or pass tokenizer=DIR (cogact:PATH?tokenizer=DIR)"
        )
    model, run_config = model_from_run(files, dtype)
    stats = action_statistics(read_statistics(files.statistics), unnorm_key, str(files.statistics))
    tok = load_tokenizer(files.tokenizer, model.config)
    meta = {
        "source": {"kind": "cogact", "path": str(Path(path)), "checkpoint": str(files.checkpoint)},
        "files": files.sha256(),
        "run_config": run_config,
    }
    return CogACTPolicy(model, tok, stats, n_action_steps, cfg_scale, meta, run_files=files)


def load_cogact_spec(spec: str) -> CogACTPolicy:
    """The policy a ``cogact:PATH[?unnorm_key=...&checkpoint=...&tokenizer=...&n_action_steps=...
    &cfg_scale=...&dtype=float32|bfloat16|float16]`` spec names."""
    path, o = parse_spec(spec)
    dtype = spec_dtype(spec, o)
    steps = spec_number(spec, o, "n_action_steps", int, 1)
    cfg = spec_number(spec, o, "cfg_scale", float)
    return load_cogact(
        path,
        unnorm_key=o.get("unnorm_key"),
        checkpoint=o.get("checkpoint"),
        tokenizer=o.get("tokenizer"),
        n_action_steps=steps,
        cfg_scale=cfg,
        dtype=dtype,
    )
