"""GR00T N1 / N1.5's architecture, with GR00T-N1.5-3B's sizes as defaults.

A checkpoint directory's ``config.json`` (``model_type`` ``gr00t_n1_5`` or ``gr00t_n1``) carries
``backbone_cfg`` (``select_layer``: how many LLM layers are kept; ``project_to_dim``) and ``action_head_cfg``
(the DiT, the VL self-attention, the embodiment-specific encoders, flow-matching settings) as the original's
``FlowmatchingActionHeadConfig``. The Eagle VLM's own sizes live in the gr00t package, not in the checkpoint:
the defaults here are N1.5's Eagle 2.5 (``backbone_cfg.eagle_path`` ``...Siglip2_400M..._1mlp_nops``:
SigLIP-2 400M weights in transformers' ``SiglipVisionModel`` layout, Conv2d patch embedding, at 224 px -> 256
patch tokens per image, no pixel shuffle, a one-Linear connector ``mlp1.0`` (1152 -> 2048), Qwen3-1.7B
truncated to 12 layers). N1's Eagle 2 pixel-shuffles 0.5 (64 tokens per image) into a LayerNorm +
two-Linear ``mlp1``; the layout follows ``model_type``. Directories written by daptq's test writer record
the exact (tiny) sizes under ``"daptq_gr00t"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# gr00t/data/embodiment_tags.py: the category (projector) index of each embodiment tag.
EMBODIMENT_TAGS = {"new_embodiment": 31, "oxe_droid": 17, "agibot_genie1": 26, "gr1": 24}


@dataclass(frozen=True)
class Gr00tConfig:
    """Eagle backbone (SigLIP -> pixel shuffle -> mlp1 -> LLM layers) + flow-matching DiT action head."""

    model_type: str = "gr00t_n1_5"  # "gr00t_n1": backbone.model.* / backbone.linear names
    # vision (transformers SiglipVisionConfig)
    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_intermediate: int = 4304
    downsample_ratio: float = 0.5
    use_pixel_shuffle: bool = False  # Eagle 2.5 (N1.5): patch tokens go to mlp1 as they are; N1: True
    mlp_connector_layers: int = 1  # 1: mlp1 = (Linear,); 2 (N1): (LayerNorm, Linear, GELU, Linear)
    num_views: int = 1
    # LLM (transformers Qwen3 or Llama), truncated to select_layer layers
    llm_type: str = "qwen3"
    vocab_size: int = 151680
    hidden_size: int = 2048
    intermediate_size: int = 6144
    select_layer: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 40960
    img_context_token_id: int = 151669
    img_start_token_id: int = 151670
    img_end_token_id: int = 151671
    pad_token_id: int = 151643
    project_to_dim: int | None = None
    # action head (FlowmatchingActionHeadConfig)
    action_dim: int = 32
    action_horizon: int = 16
    max_state_dim: int = 64
    max_num_embodiments: int = 32
    ah_hidden_size: int = 1024
    input_embedding_dim: int = 1536
    backbone_embedding_dim: int = 2048
    dit: Mapping[str, Any] = field(
        default_factory=lambda: {
            "num_attention_heads": 32,
            "attention_head_dim": 48,
            "output_dim": 1024,
            "num_layers": 16,
            "interleave_self_attention": True,
            "cross_attention_dim": 2048,
        }
    )
    vl_self_attention: Mapping[str, Any] = field(
        default_factory=lambda: {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 4}
    )
    use_vlln: bool = True
    add_pos_embed: bool = True
    max_seq_len: int = 1024
    num_target_vision_tokens: int = 32
    num_timestep_buckets: int = 1000
    num_inference_timesteps: int = 4
    noise_beta_alpha: float = 1.5
    noise_beta_beta: float = 1.0
    noise_s: float = 0.999
    version: int = 1

    def __post_init__(self) -> None:
        if self.model_type not in ("gr00t_n1", "gr00t_n1_5"):
            raise ValueError(f"model_type {self.model_type!r} is not 'gr00t_n1' or 'gr00t_n1_5'")
        if self.llm_type not in ("qwen3", "llama"):
            raise ValueError(f"llm_type {self.llm_type!r} is not 'qwen3' or 'llama'")
        if self.noise_beta_beta != 1.0:
            raise ValueError(
                f"noise_beta_beta={self.noise_beta_beta}: only Beta(alpha, 1) time sampling is supported "
                "(every released GR00T uses 1.0)"
            )
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.use_pixel_shuffle and (grid * self.downsample_ratio) % 1:
            raise ValueError("image_size / patch_size must give a grid the pixel shuffle can halve")
        if self.mlp_connector_layers not in (1, 2):
            raise ValueError(f"mlp_connector_layers must be 1 or 2, got {self.mlp_connector_layers}")
        if self.mlp_connector_layers == 2 and not self.use_pixel_shuffle:
            raise ValueError("a two-layer mlp1 reads pixel-shuffled tokens (use_pixel_shuffle=True)")
        d = self.dit
        if d.get("positional_embeddings"):
            raise ValueError("DiT positional_embeddings are not supported (released GR00T N1.5: null)")
        if d["output_dim"] != self.ah_hidden_size:
            raise ValueError(
                f"DiT output_dim {d['output_dim']} != action head hidden_size {self.ah_hidden_size}"
            )
        if d["num_attention_heads"] * d["attention_head_dim"] != self.input_embedding_dim:
            raise ValueError("DiT heads x head dim must equal input_embedding_dim")

    @property
    def tokens_per_image(self) -> int:
        patches = (self.image_size // self.patch_size) ** 2
        return int(patches * self.downsample_ratio**2) if self.use_pixel_shuffle else patches

    @property
    def connector_in_dim(self) -> int:
        """mlp1's input width: a patch token, or 1 / ratio^2 of them after the pixel shuffle."""
        return self.vision_hidden * (int(1 / self.downsample_ratio) ** 2 if self.use_pixel_shuffle else 1)

    @property
    def backbone_out_dim(self) -> int:
        return self.project_to_dim or self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dit"], d["vl_self_attention"] = dict(self.dit), dict(self.vl_self_attention)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Gr00tConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown Gr00tConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def tiny(cls, **overrides: Any) -> Gr00tConfig:
        """Toy sizes: 28 px images (16 patch tokens; 4 after N1's pixel shuffle), a 2-layer SigLIP of width
        32, a 2-layer Qwen3 of width 64 (4 heads, 2 KV heads), a 4-block DiT of width 64 interleaving cross-
        and self-attention, a 1-block VL self-attention, 8-D padded actions over 4 steps, 10-D padded
        state."""
        base = cls(
            image_size=28,
            patch_size=7,
            vision_hidden=32,
            vision_layers=2,
            vision_heads=2,
            vision_intermediate=64,
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            select_layer=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
            img_context_token_id=100,
            img_start_token_id=101,
            img_end_token_id=102,
            pad_token_id=0,
            action_dim=8,
            action_horizon=4,
            max_state_dim=10,
            ah_hidden_size=48,
            input_embedding_dim=64,
            backbone_embedding_dim=64,
            dit={
                "num_attention_heads": 4,
                "attention_head_dim": 16,
                "output_dim": 48,
                "num_layers": 4,
                "interleave_self_attention": True,
                "cross_attention_dim": 64,
            },
            vl_self_attention={"num_attention_heads": 4, "attention_head_dim": 16, "num_layers": 1},
            max_seq_len=32,
            num_target_vision_tokens=2,
        )
        if overrides.get("model_type") == "gr00t_n1":  # N1's Eagle 2 connector unless named
            overrides = {"use_pixel_shuffle": True, "mlp_connector_layers": 2, **overrides}
        return replace(base, **overrides) if overrides else base

    @classmethod
    def from_checkpoint_config(cls, cfg: Mapping[str, Any], source: str = "config.json") -> Gr00tConfig:
        """The architecture a GR00T ``config.json`` names (see the module docstring)."""
        if "daptq_gr00t" in cfg:
            return cls.from_dict(cfg["daptq_gr00t"])
        model_type = cfg.get("model_type")
        if model_type not in ("gr00t_n1", "gr00t_n1_5"):
            raise ValueError(f"{source}: model_type {model_type!r} is not a GR00T N1 / N1.5 checkpoint")
        bb, ah = cfg.get("backbone_cfg"), cfg.get("action_head_cfg")
        if not isinstance(bb, Mapping) or not isinstance(ah, Mapping):
            raise ValueError(f"{source}: needs 'backbone_cfg' and 'action_head_cfg' objects")
        try:
            dit = dict(ah["diffusion_model_cfg"])
            vlsa = dict(ah.get("vl_self_attention_cfg") or {})
            kw: dict[str, Any] = {
                "model_type": model_type,
                "select_layer": int(bb.get("select_layer", 12)),
                "project_to_dim": bb.get("project_to_dim"),
                "action_dim": int(ah["action_dim"]),
                "action_horizon": int(ah["action_horizon"]),
                "max_state_dim": int(ah["max_state_dim"]),
                "max_num_embodiments": int(ah.get("max_num_embodiments", 32)),
                "ah_hidden_size": int(ah["hidden_size"]),
                "input_embedding_dim": int(ah["input_embedding_dim"]),
                "backbone_embedding_dim": int(ah["backbone_embedding_dim"]),
                "dit": {
                    k: dit[k]
                    for k in (
                        "num_attention_heads",
                        "attention_head_dim",
                        "output_dim",
                        "num_layers",
                        "interleave_self_attention",
                        "cross_attention_dim",
                    )
                    if k in dit
                },
                "vl_self_attention": {
                    k: vlsa[k]
                    for k in ("num_attention_heads", "attention_head_dim", "num_layers")
                    if k in vlsa
                },
                "use_vlln": bool(ah.get("use_vlln", True)),
                "add_pos_embed": bool(ah.get("add_pos_embed", True)),
                "max_seq_len": int(ah.get("max_seq_len", 1024)),
                "num_target_vision_tokens": int(ah.get("num_target_vision_tokens", 32)),
                "num_timestep_buckets": int(ah.get("num_timestep_buckets", 1000)),
                "num_inference_timesteps": int(ah.get("num_inference_timesteps", 4)),
                "noise_beta_alpha": float(ah.get("noise_beta_alpha", 1.5)),
                "noise_beta_beta": float(ah.get("noise_beta_beta", 1.0)),
                "noise_s": float(ah.get("noise_s", 0.999)),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: action_head_cfg is incomplete or malformed ({e!r})") from e
        if model_type == "gr00t_n1":  # Eagle 2 with SmolLM2-1.7B (Llama), 1536-wide DiT input
            kw.update(
                use_pixel_shuffle=True,
                mlp_connector_layers=2,
                llm_type="llama",
                num_key_value_heads=32,
                num_attention_heads=32,
                head_dim=64,
                intermediate_size=8192,
                vocab_size=49164,  # SmolLM2's 49152 + Eagle's 12 added tokens (<img> 49152 ...)
                pad_token_id=2,
                img_start_token_id=49152,
                img_end_token_id=49153,
                img_context_token_id=49154,
                max_position_embeddings=8192,
                rope_theta=130000.0,
                rms_norm_eps=1e-5,
            )
        return cls(**kw)
