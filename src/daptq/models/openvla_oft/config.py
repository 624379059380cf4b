"""OpenVLA-OFT's architecture, with the released LIBERO checkpoints' sizes as defaults.

A checkpoint directory (moojink/openvla-7b-oft-finetuned-libero-*) carries the Hugging Face ``config.json`` of
``OpenVLAForActionPrediction`` (``model_type: "openvla"``): the vision backbone id
(``dinosiglip-vit-so-224px``: DINOv2 ViT-L/14-reg4 + SigLIP SO400M/14), ``image_sizes``, the projector
``arch_specifier`` and the Llama-2 ``text_config``. OFT's own constants (chunk length, action and proprio
dimensions) live in the original's ``prismatic/vla/constants.py`` keyed by robot platform, not in the file;
the directory written by daptq's test writer records them (and the exact tiny sizes) under ``"daptq_oft"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from daptq.models.cogact.config import DINOV2_VIT_L_REG4, SIGLIP_SO400M, ViTConfig

# prismatic/vla/constants.py: NUM_ACTIONS_CHUNK, ACTION_DIM, PROPRIO_DIM per platform.
PLATFORMS = {"LIBERO": (8, 7, 8), "ALOHA": (25, 14, 14), "BRIDGE": (5, 7, 7)}
VISION_BACKBONES = {"dinosiglip-vit-so-224px": 224}


@dataclass(frozen=True)
class OFTConfig:
    """Prismatic VLM (fused DINOv2 + SigLIP, fused GELU MLP projector, Llama-2 7B) + OFT's parallel decoding:
    ``chunk_size * action_dim`` empty action tokens after the prompt, read back by an L1-regression MLP-ResNet
    head; a proprio projector adds one token after the patches; ``num_images`` images (LIBERO: third-person
    + wrist) each give their patches."""

    image_size: int = 224
    dino: ViTConfig = DINOV2_VIT_L_REG4
    siglip: ViTConfig = SIGLIP_SO400M
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    pad_token_id: int = 32000
    prompt_template: str = "In: What action should the robot take to {instruction}?\nOut:"
    empty_token_id: int = 29871  # Llama's '' the original appends when the prompt does not end with it
    stop_token_id: int = 2  # '</s>' after the action tokens
    action_token_id: int = 31743  # any id: the action tokens' embeddings are zeroed before the LLM
    chunk_size: int = 8
    action_dim: int = 7
    proprio_dim: int = 8
    use_proprio: bool = True
    num_images: int = 2
    head_hidden_dim: int = 4096
    head_num_blocks: int = 2
    # OFT fine-tunes with bidirectional attention among all tokens (parallel decoding); False: causal.
    bidirectional: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        if self.image_size % self.dino.patch_size or self.image_size % self.siglip.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the ViT patch sizes")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        for name in ("chunk_size", "action_dim", "proprio_dim", "num_images", "head_num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"OFTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.dino.patch_size) ** 2

    @property
    def num_patches(self) -> int:
        """Tokens inserted after ``<s>``: every image's patches, plus the proprio token."""
        return self.patches_per_image * self.num_images + int(self.use_proprio)

    @property
    def vision_dim(self) -> int:
        return self.dino.embed_dim + self.siglip.embed_dim

    @property
    def num_action_tokens(self) -> int:
        return self.chunk_size * self.action_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for tower in ("dino", "siglip"):
            d[tower]["mean"], d[tower]["std"] = list(d[tower]["mean"]), list(d[tower]["std"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OFTConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown OFTConfig keys: {sorted(unknown)}")
        kwargs = dict(d)
        for tower in ("dino", "siglip"):
            if isinstance(kwargs.get(tower), Mapping):
                t = dict(kwargs[tower])
                for k in ("mean", "std"):
                    if k in t:
                        t[k] = tuple(t[k])
                kwargs[tower] = ViTConfig(**t)
        return cls(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> OFTConfig:
        """The same architecture at toy size: 28 px images (4 patches per tower, 2 images), ViTs of width
        32/48, a 2-layer Llama of width 64, chunks of 3 actions of 7 dimensions, an 8-D proprio state."""
        base = cls(
            image_size=28,
            dino=replace(DINOV2_VIT_L_REG4, embed_dim=32, depth=2, num_heads=2, mlp_hidden=64),
            siglip=replace(SIGLIP_SO400M, embed_dim=48, depth=3, num_heads=2, mlp_hidden=80),
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=0,
            empty_token_id=3,
            action_token_id=4,
            chunk_size=3,
            head_hidden_dim=48,
        )
        return replace(base, **overrides) if overrides else base

    @classmethod
    def from_hf_config(
        cls, hf: Mapping[str, Any], source: str = "config.json", platform: str = "LIBERO"
    ) -> OFTConfig:
        """The architecture an OpenVLA-OFT ``config.json`` names (see the module docstring)."""
        if "daptq_oft" in hf:
            return cls.from_dict(hf["daptq_oft"])
        if hf.get("model_type") != "openvla":
            raise ValueError(
                f"{source}: model_type is {hf.get('model_type')!r}, expected 'openvla' "
                "(an OpenVLA-OFT checkpoint directory's config.json)"
            )
        backbone = hf.get("vision_backbone_id")
        if backbone not in VISION_BACKBONES:
            raise ValueError(
                f"{source}: vision_backbone_id {backbone!r} is not supported; supported: "
                f"{sorted(VISION_BACKBONES)}"
            )
        if str(hf.get("arch_specifier", "")).split("+")[-1] != "fused-gelu-mlp":
            raise ValueError(f"{source}: arch_specifier {hf.get('arch_specifier')!r} is not fused-gelu-mlp")
        if platform not in PLATFORMS:
            raise ValueError(f"unknown OFT platform {platform!r}; known: {sorted(PLATFORMS)}")
        chunk, adim, pdim = PLATFORMS[platform]
        text = hf.get("text_config") or {}
        return cls(
            image_size=VISION_BACKBONES[backbone],
            vocab_size=int(text.get("vocab_size", 32064)),
            hidden_size=int(text.get("hidden_size", 4096)),
            intermediate_size=int(text.get("intermediate_size", 11008)),
            num_hidden_layers=int(text.get("num_hidden_layers", 32)),
            num_attention_heads=int(text.get("num_attention_heads", 32)),
            num_key_value_heads=int(text.get("num_key_value_heads", text.get("num_attention_heads", 32))),
            pad_token_id=int(hf.get("pad_token_id", 32000)),
            chunk_size=chunk,
            action_dim=adim,
            proprio_dim=pdim,
            head_hidden_dim=int(text.get("hidden_size", 4096)),
        )
