"""OpenVLA-OFT in closed loop, and ``openvla-oft:DIR`` loading.

``select_action`` runs the original's ``get_vla_action`` for L1-regression checkpoints: both camera images
through the towers, the normalized proprio state through the projector, one parallel-decoding forward, the
head's K actions un-normalized with the dataset statistics. LIBERO's evaluation executes the whole chunk
open-loop (``num_open_loop_steps = 8``), the default here (``n_action_steps = chunk_size``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import torch

from daptq.models.adapter import Observation, PolicyInfo, state_digest
from daptq.models.openvla_oft.adapter import OFTAdapter
from daptq.models.openvla_oft.checkpoint import OFTFiles, model_from_files, resolve_files
from daptq.models.openvla_oft.model import OpenVLAOFT
from daptq.models.openvla_oft.processing import OFT_ACTION_SPACE, OFTStatistics, oft_statistics
from daptq.models.policy import ChunkedPolicy


class OFTPolicy(ChunkedPolicy):
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
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def observation_batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        keys = ("image", "wrist_image")[: self.config.num_images]
        for key in (*keys, "instruction"):
            if key not in observation:
                raise ValueError(f"observation is missing {key!r} (has {sorted(observation)})")
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

    def info(self) -> PolicyInfo:
        config = {"model": self.config.to_dict(), "statistics": self.statistics.to_dict()}
        return PolicyInfo(
            digest=state_digest(self.model, config),
            image_size=self.config.image_size,
            recipe=self.recorded_recipe(),
        )


SPEC_OPTIONS = ("unnorm_key", "step", "platform", "n_action_steps", "dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    stats = oft_statistics(json.loads(files.statistics.read_text()), unnorm_key, str(files.statistics))
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
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from e


def load_oft_spec(spec: str) -> OFTPolicy:
    """``openvla-oft:DIR[?unnorm_key=NAME&step=STEP&platform=LIBERO&n_action_steps=N&dtype=float32]``."""
    body = spec.removeprefix("openvla-oft:")
    path, _, query = body.partition("?")
    if not path:
        raise ValueError(f"model spec {spec!r}: expected openvla-oft:DIR[?unnorm_key=NAME&...]")
    o = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(o) - set(SPEC_OPTIONS))
    if unknown:
        raise ValueError(f"model spec {spec!r}: unknown options {unknown}; known: {list(SPEC_OPTIONS)}")
    if o.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model spec {spec!r}: dtype must be one of {sorted(DTYPES)}")
    try:
        steps = int(o["n_action_steps"]) if "n_action_steps" in o else None
    except ValueError as e:
        raise ValueError(f"model spec {spec!r}: {e}") from e
    return load_oft(
        path,
        unnorm_key=o.get("unnorm_key"),
        step=o.get("step"),
        platform=o.get("platform", "LIBERO"),
        n_action_steps=steps,
        dtype=DTYPES[o.get("dtype", "float32")],
    )
