"""OpenVLA-OFT in closed loop, and ``openvla-oft:DIR`` loading.

``select_action`` runs the original's ``get_vla_action`` for L1-regression checkpoints: both camera images
through the towers, the normalized proprio state through the projector, one parallel-decoding forward, the
head's K actions un-normalized with the dataset statistics. LIBERO's evaluation executes the whole chunk
open-loop (``num_open_loop_steps = 8``), the default here (``n_action_steps = chunk_size``).
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
from daptq.models.openvla_oft.adapter import OFTAdapter
from daptq.models.openvla_oft.checkpoint import OFTFiles, model_from_files, resolve_files
from daptq.models.openvla_oft.model import OpenVLAOFT
from daptq.models.openvla_oft.processing import OFT_ACTION_SPACE, OFTStatistics, oft_statistics
from daptq.models.policy import ChunkedPolicy


class OFTPolicy(FamilyPolicyMixin, ChunkedPolicy):
    """An OpenVLA-OFT model, its tokenizer and its dataset statistics as a closed-loop policy."""

    def __init__(
        self,
        model: OpenVLAOFT,
        tokenizer: Any,
        statistics: OFTStatistics,
        n_action_steps: int | None = None,
        meta: Mapping[str, Any] | None = None,
        seed: int | None = None,
        files: OFTFiles | None = None,
    ) -> None:
        c = model.config
        steps = c.chunk_size if n_action_steps is None else n_action_steps
        if not 1 <= steps <= c.chunk_size:
            raise ValueError(f"n_action_steps must be in [1, {c.chunk_size}], got {steps}")
        super().__init__(OFT_ACTION_SPACE, steps, seed)
        self.model = model.eval()
        self.config = c
        self.statistics = statistics
        self.adapter = OFTAdapter(model, tokenizer, statistics)
        self.meta = dict(meta or {})
        self.files = files

    def source_files(self) -> list[Path]:
        return self.files.paths() if self.files is not None else []

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def observation_batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        keys = ("image", "wrist_image")[: self.config.num_images]
        require_observation(observation, (*keys, "instruction"))
        state = observation.get("state")
        return self.adapter.model_inputs(
            [np.asarray(observation[k])[None] for k in keys],
            [observation["instruction"]],
            None if state is None else np.asarray(state, dtype=np.float32)[None],
        )

    @torch.no_grad()
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        chunk = self.adapter.predict_chunk(self.observation_batch(observation), generator)
        return self.statistics.unnormalize(chunk[0].float().cpu().numpy())

    def info_config(self) -> dict[str, Any]:
        return {"model": self.config.to_dict(), "statistics": self.statistics.to_dict()}


SPEC_OPTIONS = ("unnorm_key", "step", "platform", "n_action_steps", "dtype")


def load_oft(
    path: str | Path,
    *,
    unnorm_key: str | None = None,
    step: str | None = None,
    platform: str = "LIBERO",
    n_action_steps: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> OFTPolicy:
    """An ``OFTPolicy`` from an OpenVLA-OFT checkpoint directory (see ``checkpoint``); the tokenizer files
    of the directory are read locally (never downloaded)."""
    hf = _read_config(Path(path))
    use_proprio = bool(hf.get("daptq_oft", {}).get("use_proprio", True))
    files = resolve_files(path, step, use_proprio)
    if files.tokenizer is None:
        raise FileNotFoundError(
            f"{files.directory}: no tokenizer files ({', '.join(('tokenizer.json', 'tokenizer.model'))})"
        )
    model, hf = model_from_files(files, platform, dtype)
    stats = oft_statistics(read_json(files.statistics), unnorm_key, str(files.statistics))
    tok = load_tokenizer(files.tokenizer)
    meta = {"source": {"kind": "openvla-oft", "path": str(path)}, "files": files.sha256()}
    return OFTPolicy(model, tok, stats, n_action_steps, meta, files=files)


def load_tokenizer(directory: Path) -> Any:
    """The directory's tokenizer, locally: ``tokenizer.json`` directly (AutoTokenizer would read the
    directory's OpenVLA ``config.json`` and warn about its model type), else AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(
            str(directory), local_files_only=True, padding_side="right"
        )
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, padding_side="right")


def _read_config(directory: Path) -> dict[str, Any]:
    f = directory / "config.json"
    if not f.is_file():
        raise FileNotFoundError(
            f"{directory}: missing config.json (is this an OpenVLA-OFT checkpoint directory?)"
        )
    return read_json(f)


def load_oft_spec(spec: str) -> OFTPolicy:
    """``openvla-oft:DIR[?unnorm_key=NAME&step=STEP&platform=LIBERO&n_action_steps=N&dtype=float32]``."""
    path, o = parse_model_spec(spec, "openvla-oft:", SPEC_OPTIONS, "openvla-oft:DIR[?unnorm_key=NAME&...]")
    dtype = spec_dtype(spec, o)
    return load_oft(
        path,
        unnorm_key=o.get("unnorm_key"),
        step=o.get("step"),
        platform=o.get("platform", "LIBERO"),
        n_action_steps=spec_number(spec, o, "n_action_steps"),
        dtype=dtype,
    )
