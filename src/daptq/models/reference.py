"""The reference VLA: CogACT's shape at small scale, and its closed-loop policy wrapper.

    image  -> EfficientNet-Lite0 (frozen) -> 36 spatial tokens -> vision_proj ----+
    instr. -> MiniLM-L6 (frozen)          -> token features    -> language_proj --+--> backbone (pre-norm
    state (ee xyz + gripper)                                   -> state_proj -----+    transformer) -> z
    learned cognition token ---------------------------------------------------------+  (its output)
    z -> DiT action head (z_proj: prefix token + adaLN-Zero) -> epsilon; DDIM (10 steps) -> K=8 actions

Most trainable parameters sit in the backbone, as the 7B VLM does in CogACT, so quantizing it matters.

Model-input batches (``Mapping[str, Tensor]``) of ``condition``, ``predict_chunk`` and ``denoising_loss``:
- vision: ``"image"`` uint8 (B, H, W, 3) (or (B, V, H, W, 3) for V cameras), or precomputed
  ``"vision_features"`` (B, 36 V, 112);
- language: ``"input_ids"`` + ``"attention_mask"`` (B, L), or precomputed ``"language_features"`` (B, L, 384)
  + ``"language_mask"`` (B, L) bool;
- ``"state"`` float (B, 4) in environment units (normalized inside the model);
- ``"actions"`` float (B, K, 4) in [-1, 1], only for ``denoising_loss``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from daptq.atomic import atomic_write_bytes
from daptq.cameras import parse_cameras
from daptq.data.format import LEGACY_DEMO_VERSION, LEGACY_SCENE_VERSION
from daptq.models.adapter import (
    METAWORLD_ACTION_SPACE,
    ActionSpace,
    AttentionLayout,
    InterfaceModule,
    NormReaders,
    Observation,
    PolicyInfo,
    QuantizableModule,
    ResidualStream,
    RotationLayout,
    VLAAdapter,
    state_digest,
)
from daptq.models.batching import slot_noise, slot_rows, stack_rows
from daptq.models.bundled_encoders import (
    EncoderCachePolicy,
    checkpoint_state,
    count_parameters,
    encoder_inputs,
    minilm_layouts,
    pad_tokens,
    use_vision_features,
)
from daptq.models.dit import DiTActionHead, NoiseSchedule
from daptq.models.encoders import LANGUAGE_DIM, LanguageEncoder, VisionEncoder
from daptq.models.policy import ChunkedPolicy
from daptq.models.transformer import Block
from daptq.quant.smoothing import SmoothingGroup

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FROZEN_PREFIXES = ("vision.", "language.")  # encoder weights come from their packages, not the checkpoint


@dataclass
class ReferenceVLAConfig:
    """Architecture and inference settings; stored in the checkpoint's config.json."""

    image_size: int = 96
    camera: str = "corner3"  # one camera, or several comma-separated ("corner3,topview"): 36 tokens each
    vision_blocks: int = 11
    max_language_tokens: int = 32
    state_dim: int = 4
    action_dim: int = 4
    d_model: int = 256  # backbone width; z has this size
    n_layer: int = 6
    n_head: int = 8
    dit_d_model: int = 192
    dit_n_layer: int = 3
    dit_n_head: int = 6
    chunk_size: int = 8  # K actions predicted per re-plan
    n_action_steps: int = 4  # actions executed from each chunk before re-planning
    num_train_timesteps: int = 100
    num_inference_steps: int = 10
    version: int = 1

    def __post_init__(self) -> None:
        parse_cameras(self.camera)
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(
                f"n_action_steps must be in [1, chunk_size={self.chunk_size}], got {self.n_action_steps}"
            )
        for name in (
            "d_model",
            "n_layer",
            "n_head",
            "dit_d_model",
            "dit_n_layer",
            "dit_n_head",
            "chunk_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def cameras(self) -> tuple[str, ...]:
        return parse_cameras(self.camera)

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // 16) ** 2

    @property
    def num_vision_tokens(self) -> int:
        return len(self.cameras) * self.tokens_per_view

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One observation's image: (H, W, 3) for one camera, (V, H, W, 3) for V cameras."""
        size = (self.image_size, self.image_size, 3)
        return size if len(self.cameras) == 1 else (len(self.cameras), *size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferenceVLAConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ReferenceVLAConfig keys: {sorted(unknown)}")
        return cls(**d)


class ReferenceVLA(nn.Module):
    """The network: frozen encoders, trainable backbone producing z, and the DiT action head."""

    def __init__(self, config: ReferenceVLAConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision = VisionEncoder(c.image_size, c.vision_blocks)
        self.language = LanguageEncoder(c.max_language_tokens)
        d = c.d_model
        self.vision_proj = nn.Linear(self.vision.out_channels, d)
        self.language_proj = nn.Linear(LANGUAGE_DIM, d)
        self.state_proj = nn.Linear(c.state_dim, d)
        self.cognition_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_emb = nn.Parameter(torch.randn(1, c.num_vision_tokens + c.max_language_tokens + 2, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, c.n_head) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = DiTActionHead(d, c.action_dim, c.chunk_size, c.dit_d_model, c.dit_n_layer, c.dit_n_head)
        self.schedule = NoiseSchedule(c.num_train_timesteps)
        # Proprioception normalization from the training set's stats.json (saved with the weights).
        self.register_buffer("state_mean", torch.zeros(c.state_dim))
        self.register_buffer("state_std", torch.ones(c.state_dim))

    def set_state_stats(self, mean: Any, std: Any) -> None:
        self.state_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.state_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-3))

    def features(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the frozen encoders on whatever raw inputs the batch carries (see the module docstring)."""
        vision, language, mask = encoder_inputs(batch, self.vision, self.language)
        if "state" not in batch:
            raise ValueError("batch needs 'state' (B, 4): end-effector xyz and gripper opening")
        return {"vision": vision, "language": language, "language_mask": mask, "state": batch["state"]}

    def condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Backbone forward: inputs -> z (B, d_model), the output at the cognition token."""
        f = self.features(batch)
        B = f["vision"].shape[0]
        if f["language"].shape[1] > self.config.max_language_tokens:
            raise ValueError(
                f"{f['language'].shape[1]} language tokens > max {self.config.max_language_tokens}"
            )
        state = (f["state"].float() - self.state_mean) / self.state_std
        tokens = torch.cat(
            [
                self.vision_proj(f["vision"].float()),
                self.language_proj(f["language"].float()),
                self.state_proj(state)[:, None, :],
                self.cognition_token.expand(B, -1, -1),
            ],
            dim=1,
        )
        x = tokens + self.pos_emb[:, : tokens.shape[1]]
        ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
        mask = torch.cat([ones.expand(B, f["vision"].shape[1]), f["language_mask"], ones, ones], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x[:, -1])

    def denoising_loss(
        self,
        z: torch.Tensor,
        actions: torch.Tensor,
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        n_noise: int = 1,
    ) -> torch.Tensor:
        """Epsilon-prediction MSE; ``n_noise`` noise draws per z make more use of each backbone pass."""
        z = z.repeat_interleave(n_noise, dim=0)
        x0 = actions.float().repeat_interleave(n_noise, dim=0)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        t, noise = t.to(x0.device), noise.to(x0.device)
        err = (self.head(self.schedule.add_noise(x0, noise, t), t, z).float() - noise) ** 2
        if dim_weights is not None:
            w = torch.as_tensor(dim_weights, dtype=err.dtype, device=err.device)
            if w.shape != (x0.shape[-1],):
                raise ValueError(f"dim_weights must have shape ({x0.shape[-1]},), got {tuple(w.shape)}")
            err = err * w
        return err.mean()

    def sample(
        self, z: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.config
        return self.schedule.sample(
            lambda x, t: self.head(x, t, z),
            (z.shape[0], c.chunk_size, c.action_dim),
            c.num_inference_steps,
            generator=generator,
            device=z.device,
            noise=noise,
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}


class ReferenceAdapter(VLAAdapter):
    """What quantization methods know about the reference VLA; the only place its structure is declared.

    Stacks: ``vision`` (EfficientNet blocks), ``language`` (MiniLM layers), ``backbone`` (the transformer
    blocks producing z), ``dit`` (the action head's DiT blocks). One stream. The interface is ``head.z_proj``
    (one vector z per sample; an affine folds into it exactly). Objective: diffusion epsilon-MSE.
    """

    objective_kind = "diffusion"
    capabilities = frozenset(
        {"attention", "smoothing", "condition", "batched_eval", "rotation", "denoising_steps"}
    )

    def __init__(self, model: ReferenceVLA, action_space: ActionSpace = METAWORLD_ACTION_SPACE) -> None:
        self.model = model
        self.action_space = action_space

    @property
    def config(self) -> ReferenceVLAConfig:
        return self.model.config

    def condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.condition(batch)

    def objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Epsilon-prediction MSE of the DiT head on ``batch["actions"]``."""
        if "actions" not in batch:
            raise ValueError("objective needs batch['actions'] (B, K, action_dim)")
        return self.model.denoising_loss(
            self.model.condition(batch), batch["actions"], dim_weights, generator
        )

    def sample(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``predict_chunk`` with autograd kept (same noise for the same generator state): sensitivity methods
        differentiate the action chunk w.r.t. a layer's output (QVLA's Jacobian, DA-PTQ)."""
        z = self.model.condition(batch)
        c = self.config
        chunk = self.model.schedule.sample_with_grad(
            lambda x, t: self.model.head(x, t, z),
            (z.shape[0], c.chunk_size, c.action_dim),
            c.num_inference_steps,
            generator=generator,
            device=z.device,
        )
        return chunk.clamp(self.action_space.low, self.action_space.high)

    @torch.no_grad()
    def predict_chunk(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        z = self.model.condition(batch)
        return self.model.sample(z, generator).clamp(self.action_space.low, self.action_space.high)

    def interface_modules(self) -> list[InterfaceModule]:
        return [
            InterfaceModule(
                "head.z_proj", self.model.head.z_proj, "vector", "exact", f"z (B, {self.config.d_model})"
            )
        ]

    def quantizable_modules(self) -> list[QuantizableModule]:
        """Every Linear and Conv2d with its role and place; ``meta["kind"]`` says which ("linear" or
        "conv2d"), ``meta["part"]`` which part of a repeated block it is ("attention", "mlp",
        "modulation")."""
        out = []
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                kind = "linear"
            elif isinstance(module, nn.Conv2d):
                kind = "conv2d"
            else:
                continue
            meta: dict[str, Any] = {"kind": kind}
            stack, block, part = module_place(name)
            if part is not None:
                meta["part"] = part
            out.append(QuantizableModule(name, module, module_role(name), meta, block, stack))
        return out

    def attention_layouts(self) -> list[AttentionLayout]:
        """Fused-qkv self-attention of the backbone and DiT blocks; MiniLM's separate query/key/value."""
        c = self.config
        out = [
            AttentionLayout(
                f"blocks.{i}.attn",
                c.n_head,
                "backbone",
                out=f"blocks.{i}.attn.proj",
                qkv=f"blocks.{i}.attn.qkv",
                block=i,
                stack="backbone",
            )  # fmt: skip
            for i in range(c.n_layer)
        ]
        out += [
            AttentionLayout(
                f"head.blocks.{i}.attn",
                c.dit_n_head,
                "action_head",
                out=f"head.blocks.{i}.attn.proj",
                qkv=f"head.blocks.{i}.attn.qkv",
                block=i,
                stack="dit",
            )  # fmt: skip
            for i in range(c.dit_n_layer)
        ]
        out += minilm_layouts(self.model.language.bert)
        return out

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """Backbone blocks: ln_1 -> qkv, value rows -> attn.proj, ln_2 -> mlp.fc. DiT blocks: the adaLN
        modulation (shift/scale chunks) -> qkv and -> mlp.fc, value rows -> attn.proj; the final adaLN ->
        action_out. mlp.proj (after GELU) and the layers fed by the encoders have no foldable predecessor;
        ln_f is left alone because its output is z itself."""
        groups = []
        d = self.config.d_model
        for i in range(self.config.n_layer):
            p = f"blocks.{i}"
            groups += [
                SmoothingGroup(f"{p}.ln_1", (f"{p}.attn.qkv",), "layernorm"),
                SmoothingGroup(f"{p}.attn.qkv", (f"{p}.attn.proj",), "linear", offset=2 * d),
                SmoothingGroup(f"{p}.ln_2", (f"{p}.mlp.fc",), "layernorm"),
            ]
        e = self.config.dit_d_model
        for i in range(self.config.dit_n_layer):  # adaLN chunks: shift1, scale1, gate1, shift2, scale2, gate2
            p = f"head.blocks.{i}"
            groups += [
                SmoothingGroup(f"{p}.adaLN", (f"{p}.attn.qkv",), "adaln", offset=0, scale_offset=e),
                SmoothingGroup(f"{p}.attn.qkv", (f"{p}.attn.proj",), "linear", offset=2 * e),
                SmoothingGroup(f"{p}.adaLN", (f"{p}.mlp.fc",), "adaln", offset=3 * e, scale_offset=4 * e),
            ]
        groups.append(SmoothingGroup("head.final_adaLN", ("head.action_out",), "adaln", 0, scale_offset=e))
        return groups

    def rotation_layout(self) -> RotationLayout:
        """The backbone's residual stream (pre-norm LayerNorm blocks; ``ln_f`` feeds the interface) and every
        attention's V/O pair. The DiT stream is not rotatable: adaLN's per-sample shift/scale acts channel by
        channel on the normalized stream, and no fixed rotation commutes with it."""
        c = self.config
        blocks = [f"blocks.{i}" for i in range(c.n_layer)]
        stream = ResidualStream(
            "backbone",
            c.d_model,
            writers=(
                "vision_proj",
                "language_proj",
                "state_proj",
                *(f"{b}.{m}" for b in blocks for m in ("attn.proj", "mlp.proj")),
            ),
            norms=(
                *(NormReaders(f"{b}.ln_1", (f"{b}.attn.qkv",)) for b in blocks),
                *(NormReaders(f"{b}.ln_2", (f"{b}.mlp.fc",)) for b in blocks),
                NormReaders("ln_f", ("head.z_proj",)),
            ),
            embeddings=("cognition_token", "pos_emb"),
        )
        return RotationLayout(
            (stream,),
            tuple(a.name for a in self.attention_layouts()),
            (
                "dit residual stream: adaLN's per-sample shift/scale is channel-wise after the norm",
                "mlp.proj inputs (after GELU): would need an online Hadamard per token",
                "attn.proj inputs across heads: only the per-head part folds into V",
            ),
        )

    def denoising_steps(self) -> int:
        return self.config.num_inference_steps

    def denoising_step_hook(self, callback: Any) -> Any:
        """Hooks on the DiT head: before it, ``callback`` gets the DDIM step index of its timestep (None for
        a batch of mixed or non-DDIM timesteps, as the training objective draws them); after it, None."""
        steps = self.model.schedule.ddim_timesteps(self.config.num_inference_steps)
        index = {t: i for i, t in enumerate(steps)}

        def before(_module: nn.Module, args: tuple) -> None:
            t = args[1]
            first = int(t.reshape(-1)[0])
            callback(index.get(first) if bool((t == first).all()) else None)

        head = self.model.head
        return _Handles(
            head.register_forward_pre_hook(before),
            head.register_forward_hook(lambda _m, _a, _o: callback(None)),
        )

    def calibration_batches(self, batches: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Dataset batches (``image`` uint8 (B,H,W,3), ``state`` (B,4), ``instruction`` list[str], optional
        ``actions`` (B,K,4); numpy or torch) -> model-input batches that run both encoders."""
        for raw in batches:
            for key in ("image", "state", "instruction"):
                if key not in raw:
                    raise ValueError(f"calibration batch is missing {key!r} (has {sorted(raw)})")
            batch = {
                "image": torch.as_tensor(np.asarray(raw["image"])),
                "state": torch.as_tensor(np.asarray(raw["state"]), dtype=torch.float32),
                **self.model.language.tokenize(list(raw["instruction"])),
            }
            if "actions" in raw:
                batch["actions"] = torch.as_tensor(np.asarray(raw["actions"]), dtype=torch.float32)
            yield batch


class ReferencePolicy(EncoderCachePolicy, ChunkedPolicy):
    """The reference VLA as a closed-loop ``Policy``; its ``adapter`` (a ``ReferenceAdapter``) is what
    quantization methods take. Also the batched-evaluation provider (``predict_chunks``, shared vision
    features) and the language cache.

    Action chunking: each re-plan predicts K=8 actions and executes the first ``n_action_steps``=4 of them
    before re-planning from a fresh observation (half the chunk; longer open-loop execution made contact tasks
    drift, shorter costs more compute).

    Language cache and shared vision features: ``EncoderCachePolicy`` (``bundled_encoders``).
    """

    def __init__(self, model: ReferenceVLA, meta: Mapping[str, Any] | None = None) -> None:
        super().__init__(METAWORLD_ACTION_SPACE, model.config.n_action_steps)
        self.adapter: ReferenceAdapter = ReferenceAdapter(model.eval(), self.action_space)
        self.meta = dict(meta or {})
        # The envs.SCENE_VERSION of the training images; None without a training record.
        training = self.meta.get("training")
        self.scene_version: int | None = (
            int(training.get("scene_version", LEGACY_SCENE_VERSION)) if training else None
        )
        # The data.format.DEMO_VERSION of its demonstrations (informational: which experts it imitates).
        self.demo_version: int | None = (
            int(training.get("demo_version", LEGACY_DEMO_VERSION)) if training else None
        )
        self._language_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._language_fingerprint: tuple | None = None

    @property
    def model(self) -> ReferenceVLA:
        return self.adapter.model

    @property
    def config(self) -> ReferenceVLAConfig:
        return self.adapter.model.config

    # What the policy must be shown; evaluation renders its environments from these.
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def camera(self) -> str:
        return self.config.camera

    def info(self) -> PolicyInfo:
        """What the evaluator renders for this policy and the digest of its weights (frozen encoders included)
        and configuration; a quantized model's recipe (``recorded_recipe``) is passed on."""
        config = {"model": self.config.to_dict(), "action_space": self.action_space.to_dict()}
        return PolicyInfo(
            digest=state_digest(self.model, config),
            image_size=self.config.image_size,
            camera=self.config.camera,
            scene_version=self.scene_version,
            demo_version=self.demo_version,
            recipe=self.recorded_recipe(),
        )

    # ---- Policy -------------------------------------------------------------------------------------------
    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        chunk = self.adapter.predict_chunk(self.observation_to_batch(observation), generator=generator)
        return chunk[0].cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def predict_chunks(
        self,
        observations: Sequence[Observation],
        generators: Sequence[torch.Generator],
        slots: int | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> np.ndarray:
        """The actions ``select_action`` would queue, for a batch of observations in one forward pass.

        Row i's sampling noise is drawn from ``generators[i]`` exactly as ``select_action`` draws it from the
        policy's own generator, so a batched rollout samples what the one-env rollout of the same seed does.
        ``slots`` pads the batch to a fixed size (copies of row 0, discarded), so every call runs the same
        tensor shapes and a row's result does not depend on how many episodes needed a chunk.
        ``vision_features``: this batch's vision encoder output, computed by ``vision_features`` of a policy
        with the same ``vision_key`` (the evaluator shares it between a candidate and its shadow).
        Returns (B, n_action_steps, action_dim) float32.
        """
        rows, n = slot_rows(observations, generators, slots, self.observation_to_batch)
        batch = use_vision_features(stack_rows(rows, torch.cat, pad_tokens), vision_features)
        c = self.config
        noise = slot_noise(generators, len(rows), c.chunk_size, c.action_dim)
        z = self.model.condition(batch)
        chunk = self.model.sample(z, noise=noise).clamp(self.action_space.low, self.action_space.high)
        return chunk[:n, : c.n_action_steps].cpu().numpy().astype(np.float32)

    def observation_to_batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        """One environment observation -> a batch of one, with the instruction's cached language features."""
        for key in ("image", "state", "instruction"):
            if key not in observation:
                raise ValueError(f"observation is missing {key!r} (has {sorted(observation)})")
        features, mask = self.language_features(observation["instruction"])
        return {
            "image": self._image(observation),
            "state": torch.as_tensor(observation["state"], dtype=torch.float32).reshape(1, -1),
            "language_features": features,
            "language_mask": mask,
        }

    def _image(self, observation: Observation) -> torch.Tensor:
        """The observation's image as a (1, H, W, 3) uint8 tensor, checked against what this policy sees."""
        if "image" not in observation:
            raise ValueError(f"observation is missing 'image' (has {sorted(observation)})")
        image = torch.as_tensor(np.ascontiguousarray(observation["image"]))
        if image.dtype != torch.uint8:
            raise ValueError(f"observation['image'] must be uint8, got {image.dtype}")
        if tuple(image.shape) != self.config.image_shape:
            raise ValueError(
                f"observation['image'] has shape {tuple(image.shape)}; this policy sees camera "
                f"{self.config.camera!r} at {self.config.image_size} px: {self.config.image_shape}"
            )
        return image[None]


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def transfer_weights(source: ReferenceVLA, target: ReferenceVLA) -> None:
    """Copy ``source``'s trained weights into ``target``, a model that may see more cameras.

    Every trainable tensor must match in shape except the positional embedding, which is copied segment by
    segment: the vision tokens of each camera both models have, then the language, state and cognition
    positions. A camera only ``target`` has keeps its fresh initialization (fine-tuning learns it).
    """
    src_cfg, dst_cfg = source.config, target.config
    if src_cfg.image_size != dst_cfg.image_size:
        raise ValueError(f"image_size differs: {src_cfg.image_size} vs {dst_cfg.image_size}")
    src_state, dst_state = source.trainable_state_dict(), target.trainable_state_dict()
    if set(src_state) != set(dst_state):
        raise ValueError(f"the models differ in tensors: {sorted(set(src_state) ^ set(dst_state))[:5]}")
    per_view = dst_cfg.tokens_per_view
    with torch.no_grad():
        for name, value in src_state.items():
            if name == "pos_emb":
                continue
            if value.shape != dst_state[name].shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} vs {tuple(dst_state[name].shape)}")
            dst_state[name].copy_(value)
        src_pos, dst_pos = source.pos_emb, target.pos_emb
        for view, camera in enumerate(dst_cfg.cameras):
            if camera in src_cfg.cameras:
                i = src_cfg.cameras.index(camera) * per_view
                dst_pos[:, view * per_view : (view + 1) * per_view] = src_pos[:, i : i + per_view]
        tail = src_pos.shape[1] - src_cfg.num_vision_tokens
        if dst_pos.shape[1] - dst_cfg.num_vision_tokens != tail:
            raise ValueError("the models differ in language/state token positions")
        dst_pos[:, dst_cfg.num_vision_tokens :] = src_pos[:, src_cfg.num_vision_tokens :]


_PLACES = (
    (re.compile(r"^blocks\.(\d+)\.(attn|mlp)\."), "backbone"),
    (re.compile(r"^head\.blocks\.(\d+)\.(attn|mlp|adaLN)\b"), "dit"),
    (re.compile(r"^language\.bert\.encoder\.layer\.(\d+)\.(attention|intermediate|output)\."), "language"),
    (re.compile(r"^vision\.blocks\.(\d+)\.()"), "vision"),
)
_PARTS = {"attn": "attention", "attention": "attention", "mlp": "mlp", "intermediate": "mlp", "output": "mlp"}


def module_place(name: str) -> tuple[str | None, int | None, str | None]:
    """(stack, block index, part of the block) of a module of ``ReferenceVLA``, Nones outside a stack."""
    for pattern, stack in _PLACES:
        m = pattern.match(name)
        if m:
            part = "modulation" if m.group(2) == "adaLN" else _PARTS.get(m.group(2))
            return stack, int(m.group(1)), part
    return None, None, None


def module_role(name: str) -> str:
    """Role of a module from its qualified name in ``ReferenceVLA``."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("language."):
        return "language"
    if name == "head.z_proj":
        return "interface"
    if name.startswith("head."):
        return "action_head"
    return "backbone"


# ---- checkpoints ------------------------------------------------------------------------------------------
def save_reference_checkpoint(
    model: ReferenceVLA,
    directory: str | Path,
    meta: Mapping[str, Any] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write model.safetensors (trainable weights only) and config.json to ``directory``, each atomically.

    ``weights`` overrides some of the model's tensors by name (training saves its EMA weights this way).
    """
    from safetensors.torch import save

    directory = Path(directory)
    state = checkpoint_state(model, weights)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in state.items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors))
    payload = {
        "model": model.config.to_dict(),
        "action_space": METAWORLD_ACTION_SPACE.to_dict(),
        **(meta or {}),
    }
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(payload, indent=2) + "\n").encode())
    return directory


def load_reference_checkpoint(directory: str | Path) -> ReferencePolicy:
    """Build a ``ReferencePolicy`` from a directory written by ``save_reference_checkpoint``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"reference VLA checkpoint file not found: {directory / name}")
    try:
        payload = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: invalid JSON ({e})") from e
    if isinstance(payload, dict) and "daptq_reference" in payload:  # the LIBERO reference (SmolVLA layout)
        from daptq.models.libero_smolvla import load_checkpoint

        return load_checkpoint(directory)  # type: ignore[return-value]
    if "model" not in payload:
        raise ValueError(f"{directory / CONFIG_FILE}: missing the 'model' section")
    model = ReferenceVLA(ReferenceVLAConfig.from_dict(payload["model"]))
    state = load_file(directory / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    meta = {k: v for k, v in payload.items() if k != "model"}
    return ReferencePolicy(model, meta)


def load_reference_policy(name: str) -> ReferencePolicy:
    """The bundled reference VLA ``name`` (e.g. ``"metaworld-mt10"``) from ``daptq/checkpoints/<name>/``."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"reference model name must be a plain name like 'metaworld-mt10', got {name!r}")
    directory = CHECKPOINTS_DIR / name
    if not directory.is_dir():
        available = (
            sorted(p.name for p in CHECKPOINTS_DIR.iterdir() if p.is_dir())
            if CHECKPOINTS_DIR.is_dir()
            else []
        )
        raise FileNotFoundError(
            f"no bundled reference VLA {name!r}: {directory} does not exist "
            f"(available: {available or 'none'})"
        )
    return load_reference_checkpoint(directory)


def load_reference(spec: str) -> ReferencePolicy:
    """A reference VLA from ``"ref:<name>"`` (bundled) or a checkpoint directory path (the LIBERO reference,
    ``daptq.models.libero_smolvla``, is recognized by its ``config.json``)."""
    if spec.startswith("ref:"):
        return load_reference_policy(spec.removeprefix("ref:"))
    return load_reference_checkpoint(spec)


__all__ = [
    "ReferenceVLAConfig",
    "ReferenceVLA",
    "ReferencePolicy",
    "ReferenceAdapter",
    "load_reference",
    "load_reference_policy",
    "load_reference_checkpoint",
    "save_reference_checkpoint",
    "module_role",
    "module_place",
    "count_parameters",
    "transfer_weights",
]
