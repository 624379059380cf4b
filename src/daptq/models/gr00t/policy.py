"""GR00T N1.x in closed loop for one embodiment, and ``gr00t:DIR`` loading.

``select_action`` runs the original's ``get_action``: the camera view(s) and instruction through the Eagle
backbone, the normalized state through the embodiment's state encoder, ``num_inference_timesteps`` Euler
steps of the DiT, and the embodiment's action dimensions un-normalized (min_max) into joint targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import Observation
from daptq.models.family_common import (
    FamilyPolicyMixin,
    parse_model_spec,
    read_json,
    require_observation,
    spec_dtype,
    spec_number,
)
from daptq.models.gr00t.adapter import Gr00tAdapter
from daptq.models.gr00t.checkpoint import Gr00tFiles, model_from_files, resolve_files
from daptq.models.gr00t.model import Gr00tN1
from daptq.models.gr00t.processing import Embodiment, embodiment_from_metadata
from daptq.models.policy import ChunkedPolicy


class Gr00tPolicy(FamilyPolicyMixin, ChunkedPolicy):
    def __init__(
        self,
        model: Gr00tN1,
        embodiment: Embodiment,
        tokenizer: Any,
        n_action_steps: int | None = None,
        meta: Mapping[str, Any] | None = None,
        seed: int | None = None,
        files: Gr00tFiles | None = None,
    ) -> None:
        c = model.config
        steps = c.action_horizon if n_action_steps is None else n_action_steps
        if not 1 <= steps <= c.action_horizon:
            raise ValueError(f"n_action_steps must be in [1, {c.action_horizon}], got {steps}")
        self.adapter = Gr00tAdapter(model.eval(), embodiment, tokenizer)
        super().__init__(self.adapter.action_space, steps, seed)
        self.model, self.config, self.embodiment = model, c, embodiment
        self.meta = dict(meta or {})
        self.files = files

    def source_files(self) -> list[Path]:
        return self.files.paths() if self.files is not None else []

    @property
    def chunk_size(self) -> int:
        return self.config.action_horizon

    def observation_batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        keys = ("image", *(f"image_{i}" for i in range(1, self.config.num_views)))
        require_observation(observation, (*keys, "instruction", "state"))
        return self.adapter.model_inputs(
            [np.asarray(observation[k])[None] for k in keys],
            [observation["instruction"]],
            np.asarray(observation["state"])[None],
        )

    @torch.no_grad()
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        chunk = self.adapter.predict_chunk(self.observation_batch(observation), generator)
        return self.embodiment.action.unnormalize(chunk[0].float().cpu().numpy())

    def info_config(self) -> dict[str, Any]:
        return {"model": self.config.to_dict(), "embodiment": self.embodiment.to_dict()}


SPEC_OPTIONS = ("embodiment", "tokenizer", "n_action_steps", "dtype")


def load_gr00t(
    path: str | Path,
    *,
    embodiment: str | None = None,
    tokenizer: str | Path | None = None,
    n_action_steps: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Gr00tPolicy:
    """A ``Gr00tPolicy`` from a GR00T checkpoint directory (see ``checkpoint``) for one embodiment tag."""
    from transformers import AutoTokenizer

    files = resolve_files(path, tokenizer)
    if files.tokenizer is None:
        raise FileNotFoundError(
            f"{files.directory}: no tokenizer (DIR/tokenizer/ or gr00t:DIR?tokenizer=DIR): "
            "the Eagle tokenizer ships with the gr00t package, not the checkpoint"
        )
    model, cfg = model_from_files(files, dtype)
    metadata = read_json(files.metadata)
    emb = embodiment_from_metadata(metadata, embodiment, str(files.metadata))
    tok = AutoTokenizer.from_pretrained(str(files.tokenizer), local_files_only=True)
    meta = {"source": {"kind": "gr00t", "path": str(path)}, "files": files.sha256()}
    return Gr00tPolicy(model, emb, tok, n_action_steps, meta, files=files)


def load_gr00t_spec(spec: str) -> Gr00tPolicy:
    """``gr00t:DIR[?embodiment=TAG&tokenizer=DIR&n_action_steps=N&dtype=float32]``."""
    path, o = parse_model_spec(spec, "gr00t:", SPEC_OPTIONS, "gr00t:DIR[?embodiment=TAG&...]")
    dtype = spec_dtype(spec, o)
    return load_gr00t(
        path,
        embodiment=o.get("embodiment"),
        tokenizer=o.get("tokenizer"),
        n_action_steps=spec_number(spec, o, "n_action_steps"),
        dtype=dtype,
    )
