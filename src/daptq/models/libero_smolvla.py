"""daptq's second reference VLA (``ref:libero-smolvla``): SmolVLA's layout and flow-matching expert, trained
here on LIBERO demonstrations, with the bundled frozen encoders standing in for SmolVLM's towers.

    image 128 px (agentview) -> EfficientNet-Lite0 blocks 0-10 (frozen; at SigLIP's place) -> 8x8x112
        -> pixel shuffle (scale 2: 4x4x448) -> connector.modality_projection.proj -> x sqrt(d) -----+
    instruction -> all-MiniLM-L6-v2 (frozen) token features -> language_proj -> x sqrt(d) ----------+-> prefix
    state (8-D proprio, MEAN_STD, zero-padded to max_state_dim) -> state_proj ----------------------+
    prefix -> SmolLM2/Llama text layers (RMSNorm, GQA, rotary, SwiGLU): each layer's keys/values cached
    noisy chunk (K x 7, padded to max_action_dim) + flow time -> action_in_proj, action_time_mlp_in/out
        -> Llama expert layers, interleaved: even layers self-attend jointly with the prefix KV of the same
           VLM layer, odd layers cross-attend to it through their own k_proj / v_proj -> action_out_proj
    velocity; 10 Euler steps from t=1 (noise) to t=0 -> K actions (normalized; un-normalized with the stats)

The module tree, parameter names, ``config.json`` and normalization files are lerobot's SmolVLA ones
(``daptq.models.lerobot_vla``); the prefix pass and the expert are that module's ``SmolVLA`` itself (this
class replaces how the prefix is embedded, and lets training draw several (noise, time) pairs per prefix
pass; its Euler sampler is the same method, ``euler``). Departures from the
released layout, all recorded in ``config.json`` under ``daptq_reference``:

- ``vlm_with_expert.vlm.model.vision_model`` is EfficientNet-Lite0 (ImageNet, frozen, from its PyPI package),
  not SigLIP; its 112-channel 8x8 grid goes through SmolVLM's connector (pixel shuffle + ``proj``);
- the language embedding ``text_model.embed_tokens`` (a vocabulary table) is absent: the instruction's
  all-MiniLM-L6-v2 token features (frozen, top-level ``language``) go through a trainable ``language_proj``;
- the text stack is small and trained from scratch (no SmolLM2 weights), and its ``vocab`` is 0;
- the frozen encoders' weights are not in ``model.safetensors`` (they come from the packages, as for the
  first reference VLA), and there is no tokenizer directory (MiniLM's tokenizer comes with its package).

Model-input batches (the adapter's ``objective`` / ``sample`` / ``predict_chunk``):
- vision: ``"image"`` uint8 (B, S, S, 3), or precomputed ``"vision_features"`` (B, T, 112);
- language: ``"input_ids"`` + ``"attention_mask"`` (B, L), or ``"language_features"`` (B, L, 384) +
  ``"language_mask"`` (B, L) bool;
- ``"state"`` (B, max_state_dim) normalized and zero-padded; ``"actions"`` (B, K, 7) normalized (objective).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from daptq.atomic import atomic_write_bytes, atomic_write_json
from daptq.models.adapter import AttentionLayout, Observation, PolicyInfo, state_digest
from daptq.models.batching import slot_noise, slot_rows, stack_rows
from daptq.models.bundled_encoders import (
    EncoderCachePolicy,
    checkpoint_state,
    encoder_inputs,
    minilm_layouts,
    pad_tokens,
    use_vision_features,
)
from daptq.models.encoders import LANGUAGE_DIM, LanguageEncoder, VisionEncoder
from daptq.models.family_common import (
    FamilyPolicyMixin,
    parse_model_spec,
    require_observation,
    spec_number,
)
from daptq.models.lerobot_vla.adapter import (
    LeRobotVLAAdapter,
    beta_time,
    chunk_actions,
    target_actions,
    weighted_mean,
)
from daptq.models.lerobot_vla.checkpoint import POST, PRE, Statistics, read_statistics
from daptq.models.lerobot_vla.config import LeRobotVLAConfig, TextConfig, VisionConfig, smolvla_intermediate
from daptq.models.lerobot_vla.modeling import KV, FlowMatchingVLA, SmolVLA, pad_last
from daptq.models.policy import ChunkedPolicy
from daptq.quant.smoothing import SmoothingGroup

NAME = "libero-smolvla"
REFERENCE_KEY = "daptq_reference"  # config.json block that marks (and describes) this model
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREFIX = "model."
VISION = "vlm_with_expert.vlm.model.vision_model"
LANGUAGE = "language"
FROZEN_PREFIXES = (VISION + ".", LANGUAGE + ".")  # weights from the encoders' packages, not the checkpoint
STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


@dataclass(frozen=True)
class StandIns:
    """What replaces SmolVLM's towers (stored in ``config.json`` under ``daptq_reference``)."""

    camera: str = "agentview"
    vision_blocks: int = 11  # EfficientNet-Lite0 blocks 0..n-1 (block 10: 112 channels, stride 16)
    max_language_tokens: int = 32

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "vision": f"EfficientNet-Lite0 (ImageNet) stem + blocks 0-{self.vision_blocks - 1}, frozen",
            "language": "all-MiniLM-L6-v2 token features (no pooler), frozen, then language_proj",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StandIns:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Sizes: 6 SmolLM2-style text layers (d=256, 4 heads / 2 kv heads of 64) and a 0.75-wide expert of 6 layers.
DEFAULTS: dict[str, Any] = {
    "image_size": 128,
    "camera": "agentview",
    "d_model": 256,
    "n_layer": 6,
    "n_head": 4,
    "kv_heads": 2,
    "head_dim": 64,
    "intermediate": 768,
    "expert_width": 192,
    "expert_layers": 6,
    "chunk_size": 10,
    "n_action_steps": 5,
    "num_steps": 10,
    "scale_factor": 2,
    "self_attn_every_n_layers": 2,
    "state_dim": 8,
    "action_dim": 7,
    "max_state_dim": 32,
    "max_action_dim": 32,
    "max_language_tokens": 32,
    "vision_blocks": 11,
}


def build_config(**overrides: Any) -> tuple[LeRobotVLAConfig, StandIns]:
    """The lerobot SmolVLA configuration and the stand-ins from flat sizes (``DEFAULTS`` and ``overrides``);
    an unknown key is a ValueError naming the known ones."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown {NAME} model keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **overrides}
    if s["image_size"] % 16:
        raise ValueError(f"image_size must be a multiple of 16 (the encoder's stride), got {s['image_size']}")
    grid = s["image_size"] // 16
    if grid % s["scale_factor"]:
        raise ValueError(f"scale_factor {s['scale_factor']} does not divide the {grid}x{grid} token grid")
    text = TextConfig(
        s["d_model"], s["intermediate"], s["n_head"], s["kv_heads"], s["head_dim"], s["n_layer"], 0, 1e-5
    )
    w = s["expert_width"]
    expert = TextConfig(w, smolvla_intermediate(w), s["n_head"], s["kv_heads"], s["head_dim"], 0, 0, 1e-5)
    expert = TextConfig(**{**asdict(expert), "layers": s["expert_layers"]})
    # The vision "tower" is the stand-in: hidden = its channels, layers = its blocks, patch = its stride.
    vision = VisionConfig(112, 0, 0, s["vision_blocks"], 16, s["image_size"])
    config = LeRobotVLAConfig(
        type="smolvla",
        text=text,
        vision=vision,
        expert=expert,
        chunk_size=s["chunk_size"],
        n_action_steps=s["n_action_steps"],
        max_state_dim=s["max_state_dim"],
        max_action_dim=s["max_action_dim"],
        num_steps=s["num_steps"],
        tokenizer_max_length=s["max_language_tokens"],
        state_dim=s["state_dim"],
        action_dim=s["action_dim"],
        scale_factor=s["scale_factor"],
        self_attn_every_n_layers=s["self_attn_every_n_layers"],
        tie_word_embeddings=False,
    )
    return config, StandIns(s["camera"], s["vision_blocks"], s["max_language_tokens"])


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """SmolVLM's connector shuffle: (B, T, C) tokens of a square grid -> (B, T / s^2, C s^2)."""
    if scale == 1:
        return x
    b, seq, c = x.shape
    side = math.isqrt(seq)
    x = x.reshape(b, side, side // scale, c * scale).permute(0, 2, 1, 3)
    x = x.reshape(b, side // scale, side // scale, c * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(b, seq // (scale * scale), c * scale * scale)


class _Projection(nn.Module):
    """SmolVLM's ``modality_projection`` (its ``proj``, no bias)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=False)


class _Connector(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.modality_projection = _Projection(n_in, n_out)


class _VLMModel(nn.Module):
    """``vlm.model``: ``vision_model`` (the stand-in), ``connector``, ``text_model`` (a ``LlamaModel``
    without its embedding table)."""

    def __init__(self, config: LeRobotVLAConfig, stand_ins: StandIns) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        t = config.text
        self.vision_model = VisionEncoder(config.image_size, stand_ins.vision_blocks)
        n_in = self.vision_model.out_channels * config.scale_factor**2
        self.connector = _Connector(n_in, t.hidden)
        self.text_model = LlamaModel(_llama(LlamaConfig, t))
        self.text_model.embed_tokens = None


class _VLM(nn.Module):
    def __init__(self, config: LeRobotVLAConfig, stand_ins: StandIns) -> None:
        super().__init__()
        self.model = _VLMModel(config, stand_ins)


class _VLMWithExpert(nn.Module):
    """``vlm`` and ``lm_expert`` by lerobot's names (the expert as in ``SmolVLMWithExpert``)."""

    def __init__(self, config: LeRobotVLAConfig, stand_ins: StandIns) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.vlm = _VLM(config, stand_ins)
        t, e = config.text, config.expert
        self.lm_expert = LlamaModel(_llama(LlamaConfig, e))
        self.lm_expert.embed_tokens = None
        for i, layer in enumerate(self.lm_expert.layers):
            if config.is_cross_layer(i):
                layer.self_attn.k_proj = nn.Linear(
                    t.kv_heads * t.head_dim, e.kv_heads * e.head_dim, bias=False
                )
                layer.self_attn.v_proj = nn.Linear(
                    t.kv_heads * t.head_dim, e.kv_heads * e.head_dim, bias=False
                )


def _llama(config_type: Any, t: TextConfig) -> Any:
    return config_type(
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        head_dim=t.head_dim,
        num_hidden_layers=t.layers,
        vocab_size=t.vocab,
        rms_norm_eps=t.rms_norm_eps,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


class LiberoSmolVLA(SmolVLA):
    """SmolVLA's network with the stand-in towers (see the module docstring); ``prefix_cache``,
    ``velocity`` and the unused-module list are ``SmolVLA``'s."""

    def __init__(self, config: LeRobotVLAConfig, stand_ins: StandIns = StandIns()) -> None:
        FlowMatchingVLA.__init__(self)
        if config.type != "smolvla":
            raise ValueError(f"{NAME} is a SmolVLA layout, got type {config.type!r}")
        if (config.text.heads, config.text.kv_heads, config.text.head_dim) != (
            config.expert.heads,
            config.expert.kv_heads,
            config.expert.head_dim,
        ):
            raise ValueError("SmolVLA: the VLM and the expert share heads, kv heads and head_dim")
        self.config = config
        self.stand_ins = stand_ins
        self.vlm_with_expert = _VLMWithExpert(config, stand_ins)
        self.language = LanguageEncoder(stand_ins.max_language_tokens)
        d, w = config.text.hidden, config.expert.hidden
        self.language_proj = nn.Linear(LANGUAGE_DIM, d)
        self.state_proj = nn.Linear(config.max_state_dim, d)
        self.action_in_proj = nn.Linear(config.max_action_dim, w)
        self.action_out_proj = nn.Linear(w, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * w, w)
        self.action_time_mlp_out = nn.Linear(w, w)

    @property
    def vision(self) -> VisionEncoder:
        return self.vlm_with_expert.vlm.model.vision_model

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor but the frozen encoders' (what ``model.safetensors`` holds)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}

    def features(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(vision tokens, language features, language mask, state) from raw or precomputed inputs."""
        vision, language, mask = encoder_inputs(batch, self.vision, self.language, f"{NAME} batch")
        if "state" not in batch:
            raise ValueError(
                f"{NAME} batch needs 'state' (B, {self.config.max_state_dim}) normalized, padded"
            )
        return vision, language, mask, batch["state"]

    def embed_features(self, batch: Mapping[str, torch.Tensor]):
        """SmolVLA's prefix from the stand-ins: image tokens and language tokens scaled by sqrt(d) as the
        original scales its embeddings, then the state token (its own attention block)."""
        vision, language, lang_mask, state = self.features(batch)
        dtype = self.state_proj.weight.dtype
        proj = self.vlm_with_expert.vlm.model.connector.modality_projection.proj
        img = proj(pixel_shuffle(vision.to(dtype), self.config.scale_factor))
        img = img * math.sqrt(img.shape[-1])
        lang = self.language_proj(language.to(dtype))
        lang = lang * math.sqrt(lang.shape[-1])
        st = self.state_proj(state.to(dtype))[:, None]
        b = img.shape[0]
        ones = torch.ones(b, 1, dtype=torch.bool, device=img.device)
        pad = torch.cat([ones.expand(b, img.shape[1]), lang_mask.to(img.device), ones], dim=1)
        ar = torch.zeros_like(pad)
        ar[:, -1] = True
        return torch.cat([img, lang, st.to(img.dtype)], dim=1), pad, ar

    def prefix(self, batch: Mapping[str, torch.Tensor]) -> tuple[list[KV], torch.Tensor]:
        embs, pad, ar = self.embed_features(batch)
        return self.prefix_cache(embs, pad, ar), pad

    def sample_chunk(
        self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor, num_steps: int | None = None
    ) -> torch.Tensor:
        """Euler integration of the velocity from ``noise`` (B, K, max_action_dim) at t=1 to t=0."""
        cache, pad = self.prefix(batch)
        return self.euler(cache, pad, None, noise, num_steps)

    def flow_errors(
        self,
        batch: Mapping[str, torch.Tensor],
        actions: torch.Tensor,
        noise: torch.Tensor,
        time: torch.Tensor,
    ) -> torch.Tensor:
        """Squared velocity error (B n, K, max_action_dim) at x_t = t noise + (1 - t) actions; ``noise`` and
        ``time`` may hold n draws per sample (B n rows, sample-major): the prefix runs once per sample."""
        cache, pad = self.prefix(batch)
        n = noise.shape[0] // actions.shape[0]
        if n > 1:
            cache = [(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in cache]
            pad = pad.repeat_interleave(n, 0)
            actions = actions.repeat_interleave(n, 0)
        return self.velocity_errors(cache, pad, None, actions, noise, time)


class LiberoSmolVLAAdapter(LeRobotVLAAdapter):
    """The SmolVLA adapter's declarations (interface: the expert's cross-attention k/v, exact folds;
    streams prefix / expert) with the stand-in towers: EfficientNet blocks are the ``vision`` stack,
    MiniLM's layers the ``language`` stack, ``language_proj`` and the connector ``backbone``."""

    capabilities = frozenset({"attention"})

    def __init__(self, model: LiberoSmolVLA, statistics: Statistics | None = None) -> None:
        from daptq.envs.libero_suite import LIBERO_ACTION_SPACE  # the suite's own declaration (names too)

        super().__init__(model, None, statistics)
        self.action_space = LIBERO_ACTION_SPACE
        self._prefix_names["vision"] = VISION + "."
        self._prefix_inputs = ("state_proj", "language_proj")

    def _where(self, name: str) -> tuple[str, int | None, str | None, str]:
        if name.startswith(LANGUAGE + "."):
            rest = name.split(".")
            block = int(rest[4]) if rest[1:4] == ["bert", "encoder", "layer"] else None
            return "language", block, "language" if block is not None else None, "prefix"
        if name.startswith(VISION + "."):
            rest = name[len(VISION) + 1 :].split(".")
            block = int(rest[1]) if rest[0] == "blocks" else None
            return "vision", block, "vision" if block is not None else None, "prefix"
        return super()._where(name)

    def attention_layouts(self) -> list[AttentionLayout]:
        return [*minilm_layouts(self.model.language.bert, "prefix"), *self.text_and_expert_layouts()]

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """None: the Llama stacks' RMSNorm sources and grouped-query v -> o pairs are not per-channel
        folds, MiniLM is post-norm (its LayerNorm also feeds the residual) and EfficientNet's convs are
        followed by ReLU6."""
        return []

    # ---- computation ---------------------------------------------------------------------------------------
    def _batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = next(self.model.state_proj.parameters())
        return {
            k: (v.to(p.device, p.dtype) if k in ("vision_features", "language_features", "state") else v)
            for k, v in batch.items()
            if k != "actions"
        }

    def objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """SmolVLA's velocity MSE on the real action dimensions (one noise draw and Beta(1.5, 1) time per
        sample from ``generator``), each dimension weighted by ``dim_weights``."""
        return self.flow_objective(batch, dim_weights, generator, 1)

    def flow_objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None,
        generator: torch.Generator | None,
        n_noise: int,
    ) -> torch.Tensor:
        """``objective`` with ``n_noise`` (noise, time) draws per sample (training uses several)."""
        c = self.config
        actions = target_actions(batch, c, NAME, self.model.state_proj.weight)
        inputs = self._batch(batch)
        b = actions.shape[0] * n_noise
        noise = torch.randn((b, c.chunk_size, c.max_action_dim), generator=generator).to(actions)
        time = beta_time(b, generator).to(actions)
        errors = self.model.flow_errors(inputs, pad_last(actions, c.max_action_dim), noise, time)
        return weighted_mean(errors[..., : c.action_dim], dim_weights)

    def sample(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The chunk (B, K, action_dim), normalized: ``num_steps`` Euler steps from noise drawn on the CPU
        from ``generator`` (padded to max_action_dim as the original), differentiable."""
        c = self.config
        inputs = self._batch(batch)
        p = self.model.state_proj.weight
        b = inputs["state"].shape[0]
        noise = torch.randn((b, c.chunk_size, c.max_action_dim), generator=generator).to(p.device, p.dtype)
        return self.model.sample_chunk(inputs, noise)[..., : c.action_dim]

    # ---- data ----------------------------------------------------------------------------------------------
    def image_tensor(self, images: Any) -> torch.Tensor:
        """uint8 (B, S, S, 3) or (S, S, 3) images as the encoder takes them (no resizing: the policy sees
        what it was trained on, checked here)."""
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        s = self.config.image_size
        if arr.dtype != np.uint8 or arr.shape[1:] != (s, s, 3):
            raise ValueError(
                f"images must be uint8 (B, {s}, {s}, 3) from camera {self.model.stand_ins.camera!r}, got "
                f"{arr.dtype} {arr.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(arr))

    def model_inputs(self, images: Any, instructions: Sequence[str], state: Any) -> dict[str, torch.Tensor]:
        """uint8 images, instruction strings and robot-unit states -> model inputs that run both encoders."""
        imgs = self.image_tensor(images)
        st = self.normalized_state(state)
        if not (len(instructions) == imgs.shape[0] == st.shape[0]):
            raise ValueError(
                f"{imgs.shape[0]} images, {st.shape[0]} states, {len(instructions)} instructions"
            )
        return {"image": imgs, **self.model.language.tokenize(list(instructions)), "state": st}

    def normalized_actions(self, actions: Any) -> torch.Tensor:
        """Robot-unit chunks (B, K', action_dim) -> normalized (B, K, action_dim), cut or padded with the
        last action to the chunk size."""
        return chunk_actions(actions, self.config, self.action_space, self.statistics, NAME, "actions")


class LiberoSmolVLAPolicy(EncoderCachePolicy, FamilyPolicyMixin, ChunkedPolicy):
    """The model, its statistics and a per-instruction language cache (``EncoderCachePolicy``) as a
    closed-loop policy (executes ``n_action_steps`` of each K-action chunk)."""

    def __init__(
        self,
        model: LiberoSmolVLA,
        statistics: Statistics,
        meta: Mapping[str, Any] | None = None,
        n_action_steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        c = model.config
        steps = c.n_action_steps if n_action_steps is None else int(n_action_steps)
        if not 1 <= steps <= c.chunk_size:
            raise ValueError(f"n_action_steps must be in [1, {c.chunk_size}], got {steps}")
        self.adapter = LiberoSmolVLAAdapter(model.eval(), statistics)
        super().__init__(self.adapter.action_space, steps, seed)
        self.model = model
        self.config = c
        self.statistics = statistics
        self.meta = dict(meta or {})
        self._language_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._language_fingerprint: tuple | None = None

    @property
    def camera(self) -> str:
        return self.model.stand_ins.camera

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def source_files(self) -> list[Path]:
        return [Path(p) for p in self.meta.get("files", {})]

    def info_config(self) -> dict[str, Any]:
        return {
            "model": self.config.to_dict(),
            "stand_ins": self.model.stand_ins.to_dict(),
            "statistics": self.statistics.to_dict(),
            "action_space": self.action_space.to_dict(),
        }

    def info(self) -> PolicyInfo:
        training = self.meta.get("training") or {}
        return PolicyInfo(
            digest=state_digest(self.model, self.info_config()),
            image_size=self.config.image_size,
            camera=self.camera,
            scene_version=training.get("scene_version"),
            demo_version=training.get("demo_version"),
            recipe=self.recorded_recipe(),
        )

    def _image(self, observation: Observation) -> torch.Tensor:
        return self.adapter.image_tensor(observation["image"])

    def observation_batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        require_observation(observation, ("image", "instruction", "state"))
        features, mask = self.language_features(observation["instruction"])
        return {
            "image": self.adapter.image_tensor(observation["image"]),
            "language_features": features,
            "language_mask": mask,
            "state": self.adapter.normalized_state(observation["state"]),
        }

    @torch.no_grad()
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        chunk = self.adapter.predict_chunk(self.observation_batch(observation), generator)
        out = self.statistics.unnormalize(chunk[0].detach().float().cpu(), "action", "ACTION")
        return out.numpy()

    # ---- batched evaluation (daptq eval --envs-per-worker N) ---------------------------------------------
    @torch.no_grad()
    def predict_chunks(
        self,
        observations: Sequence[Observation],
        generators: Sequence[torch.Generator],
        slots: int | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> np.ndarray:
        """The actions ``select_action`` would queue, for a batch of observations in one forward pass: row
        i's noise from ``generators[i]`` as ``select_action`` draws it; ``slots`` pads the batch (copies of
        row 0, discarded); ``vision_features`` from ``vision_features`` of a policy with the same
        ``vision_key``. Returns (B, n_action_steps, action_dim) float32 in robot units."""
        rows, n = slot_rows(observations, generators, slots, self.observation_batch)
        batch = use_vision_features(stack_rows(rows, torch.cat, pad_tokens), vision_features)
        c = self.config
        noise = slot_noise(generators, len(rows), c.chunk_size, c.max_action_dim)
        p = self.model.state_proj.weight
        chunk = self.model.sample_chunk(self.adapter._batch(batch), noise.to(p.device, p.dtype))
        chunk = chunk[:n, : self.n_action_steps, : c.action_dim].float().cpu()
        return self.statistics.unnormalize(chunk, "action", "ACTION").numpy().astype(np.float32)


# ---- statistics and checkpoints ----------------------------------------------------------------------------
def compute_statistics(states: torch.Tensor, actions: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """lerobot's per-feature statistics (mean, std, min, max, q01, q99) of training frames."""

    def stats(x: torch.Tensor) -> dict[str, list[float]]:
        x = x.double()
        q = torch.quantile(x, torch.tensor([0.01, 0.99], dtype=torch.float64), dim=0)
        return {
            "mean": x.mean(0).tolist(),
            "std": x.std(0).clamp_min(1e-3).tolist(),
            "min": x.min(0).values.tolist(),
            "max": x.max(0).values.tolist(),
            "q01": q[0].tolist(),
            "q99": q[1].tolist(),
        }

    return {"observation.state": stats(states), "action": stats(actions)}


def statistics_of(raw: Mapping[str, Mapping[str, Any]], config: LeRobotVLAConfig) -> Statistics:
    return Statistics(
        {f: {k: torch.as_tensor(v, dtype=torch.float32) for k, v in s.items()} for f, s in raw.items()},
        dict(config.normalization_mapping),
    )


def save_checkpoint(
    model: LiberoSmolVLA,
    directory: str | Path,
    statistics: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """lerobot's SmolVLA directory: ``config.json`` (+ ``daptq_reference``), ``model.safetensors`` (every
    tensor but the frozen encoders', under ``model.``), the processors' JSON and statistics files. Each file
    is written atomically; ``weights`` overrides tensors by name (training saves its EMA this way)."""
    from safetensors.torch import save

    d = Path(directory)
    state = checkpoint_state(model, weights)
    tensors = {PREFIX + k: v.detach().cpu().float().contiguous() for k, v in state.items()}
    flat = {
        f"{f}.{s}": torch.as_tensor(v, dtype=torch.float32).contiguous()
        for f, st in statistics.items()
        for s, v in st.items()
    }
    for name, reg, keep, idx in (
        (PRE, "normalizer_processor", lambda k: True, 2),
        (POST, "unnormalizer_processor", lambda k: k.startswith("action."), 0),
    ):
        state_file = f"{name}_step_{idx}_{reg}.safetensors"
        atomic_write_bytes(d / state_file, save({k: v for k, v in flat.items() if keep(k)}))
        atomic_write_json(
            d / f"{name}.json",
            {
                "name": name,
                "steps": [{"registry_name": reg, "config": {"eps": 1e-8}, "state_file": state_file}],
            },
        )
    atomic_write_bytes(d / WEIGHTS_FILE, save(tensors))
    payload = model.config.to_lerobot()
    payload["vlm_model_name"] = None  # no SmolVLM: the stand-ins below
    payload[REFERENCE_KEY] = {"name": NAME, "stand_ins": model.stand_ins.to_dict()}
    payload.update(meta or {})
    atomic_write_json(d / CONFIG_FILE, payload)
    return d


def is_checkpoint(directory: str | Path) -> bool:
    """Does ``directory`` hold this model (a ``config.json`` with ``daptq_reference``)?"""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return REFERENCE_KEY in json.loads(path.read_text())
    except (json.JSONDecodeError, TypeError):
        return False


def load_checkpoint(directory: str | Path, n_action_steps: int | None = None) -> LiberoSmolVLAPolicy:
    """The policy a ``save_checkpoint`` directory holds; every tensor accounted for (else a ValueError
    naming the missing / unexpected / mis-shaped keys)."""
    from safetensors.torch import load_file

    from daptq.integrity import sha256_file

    d = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{NAME} checkpoint file not found: {d / name}")
    try:
        raw = json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / CONFIG_FILE}: invalid JSON ({e})") from e
    if REFERENCE_KEY not in raw:
        raise ValueError(f"{d / CONFIG_FILE}: no {REFERENCE_KEY!r} block; not a {NAME} checkpoint")
    config = LeRobotVLAConfig.from_lerobot(raw)
    model = LiberoSmolVLA(config, StandIns.from_dict(raw[REFERENCE_KEY].get("stand_ins", {})))
    tensors = load_file(str(d / WEIGHTS_FILE))
    outside = [k for k in tensors if not k.startswith(PREFIX)]
    if outside:
        raise ValueError(f"{d / WEIGHTS_FILE}: keys outside {PREFIX!r}: {outside[:5]}")
    tensors = {k[len(PREFIX) :]: v for k, v in tensors.items()}
    statistics, stat_files = read_statistics(d, tensors, config)
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shaped = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or shaped:
        raise ValueError(
            f"{d / WEIGHTS_FILE}: {len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}, mis-shaped {shaped[:5]}"
        )
    model.load_state_dict(tensors, strict=False)
    files = [d / CONFIG_FILE, d / WEIGHTS_FILE, *stat_files]
    meta = {
        "source": {"kind": "ref", "name": NAME, "path": str(d)},
        "files": {str(p): sha256_file(p) for p in files},
        "training": raw.get("training"),
    }
    return LiberoSmolVLAPolicy(model, statistics, meta, n_action_steps)


def load_spec(spec: str) -> LiberoSmolVLAPolicy:
    """The policy a ``libero-smolvla:DIR[?n_action_steps=N]`` spec names (a checkpoint directory)."""
    path, options = parse_model_spec(spec, f"{NAME}:", ("n_action_steps",), f"{NAME}:DIR[?n_action_steps=N]")
    return load_checkpoint(path, spec_number(spec, options, "n_action_steps"))


def parameters_by_role(model: LiberoSmolVLA) -> dict[str, int]:
    """Trainable parameters (those in the checkpoint) by the adapter's role; the last text layer's query,
    output and MLP (never read: the expert takes only its keys and values) are counted as ``unused``."""
    adapter = LiberoSmolVLAAdapter(model)
    unused = model.unused_module_names()
    roles = {m.name: m.role for m in adapter.quantizable_modules()}
    out: dict[str, int] = {}
    for name, t in model.trainable_state_dict().items():
        module = name.rsplit(".", 1)[0]
        if any(module == u or module.startswith(u + ".") for u in unused):
            role = "unused"
        else:
            role = roles.get(module, "norms/other")
        out[role] = out.get(role, 0) + t.numel()
    return out


__all__ = [
    "DEFAULTS",
    "NAME",
    "LiberoSmolVLA",
    "LiberoSmolVLAAdapter",
    "LiberoSmolVLAPolicy",
    "StandIns",
    "build_config",
    "compute_statistics",
    "is_checkpoint",
    "load_checkpoint",
    "load_spec",
    "parameters_by_role",
    "pixel_shuffle",
    "save_checkpoint",
    "statistics_of",
]
