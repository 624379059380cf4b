"""CogACT's architecture and inference settings, with the released 7B model's sizes as defaults.

A CogACT run directory's ``config.json`` (the original's training config, dumped by its ``scripts/train.py``)
does not spell out layer sizes: it names a base VLM (``vla.base_vlm``, e.g. ``prism-dinosiglip-224px+7b``)
and an action model type (``DiT-S``/``DiT-B``/``DiT-L``), and the sizes follow from those names
(``from_run_config``). Directories written by daptq's test writer carry the sizes explicitly under
``"daptq_architecture"`` so tiny random models load the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Prismatic's normalizations (timm data configs of the two towers).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTConfig:
    """One timm VisionTransformer as Prismatic creates it (``num_classes=0``, ``img_size`` = the VLM's)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int  # int(embed_dim * mlp_ratio), as timm computes it
    patch_size: int = 14
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # DINOv2-reg: position embeddings cover the patches only
    init_values: float | None = None  # LayerScale (ls1/ls2.gamma) when set
    global_pool: str = "token"  # "map": SigLIP's attention-pool head (attn_pool.*), unused by Prismatic
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViT embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.depth < 2:
            raise ValueError("ViT depth must be >= 2 (Prismatic reads the second-to-last block)")
        if self.global_pool not in ("token", "map"):
            raise ValueError(f"ViT global_pool must be 'token' or 'map', got {self.global_pool!r}")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


# timm's vit_large_patch14_reg4_dinov2.lvd142m and vit_so400m_patch14_siglip_224 (timm 0.9.10, CogACT's pin).
DINOV2_VIT_L_REG4 = ViTConfig(
    embed_dim=1024,
    depth=24,
    num_heads=16,
    mlp_hidden=4096,
    reg_tokens=4,
    no_embed_class=True,
    init_values=1e-5,
)
SIGLIP_SO400M = ViTConfig(
    embed_dim=1152,
    depth=27,
    num_heads=16,
    mlp_hidden=4304,
    class_token=False,
    global_pool="map",
    mean=SIGLIP_MEAN,
    std=SIGLIP_STD,
)

# CogACT's action_model.DiT_models.
DIT_SIZES = {"DiT-S": (6, 384, 4), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16)}  # depth, hidden, heads

# Prismatic base VLMs CogACT builds on (prismatic/conf/models.py): vision ids, image size, projector.
BASE_VLMS = {
    "prism-dinosiglip-224px+7b": {"image_size": 224, "arch_specifier": "no-align+fused-gelu-mlp"},
}


@dataclass(frozen=True)
class CogACTConfig:
    """CogACT = Prismatic VLM (DINOv2 + SigLIP, fused MLP projector, Llama-2) + DiT diffusion action model.

    Defaults are CogACT-Base as released: ``prism-dinosiglip-224px+7b`` (DINOv2 ViT-L/14-reg4 + SigLIP
    SO400M/14 at 224 px, 256 patches each; Llama-2 7B with the pad token added and the vocabulary padded to
    32064) and DiT-B (12 blocks, width 768) predicting 16 actions of 7 dimensions; DDIM with 10 steps over the
    100-step cosine schedule and classifier-free guidance 1.5 (the original's SimplerEnv inference settings).
    """

    image_size: int = 224
    dino: ViTConfig = DINOV2_VIT_L_REG4
    siglip: ViTConfig = SIGLIP_SO400M
    arch_specifier: str = "no-align+fused-gelu-mlp"  # projector: "linear", "gelu-mlp" or "fused-gelu-mlp"
    # Llama-2 7B (meta-llama/Llama-2-7b-hf's config.json), vocabulary after Prismatic's <PAD> + pad to 64.
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    llm_max_length: int = 2048  # Prismatic's tokenizer model_max_length
    # Prompt: Prismatic's PurePromptBuilder turn, then the original appends these ids: Llama's empty token
    # '' (29871, what training saw after "Out:") and EOS (2), the cognition token.
    prompt_template: str = "In: What action should the robot take to {instruction}?\nOut: "
    suffix_token_ids: tuple[int, ...] = (29871, 2)
    pad_token_id: int = 32000  # Prismatic's added <PAD>
    # Action model (DiT).
    action_model_type: str = "DiT-B"
    dit_depth: int = 12
    dit_hidden_size: int = 768
    dit_num_heads: int = 12
    dit_mlp_ratio: float = 4.0
    action_dim: int = 7
    future_action_window_size: int = 15  # chunk K = future + 1 (current action)
    past_action_window_size: int = 0  # the original asserts 0 ("action history is not used now")
    class_dropout_prob: float = 0.1  # > 0 gives z_embedder.uncondition, used by classifier-free guidance
    diffusion_steps: int = 100
    noise_schedule: str = "squaredcos_cap_v2"
    num_ddim_steps: int = 10
    cfg_scale: float = 1.5
    version: int = 1

    def __post_init__(self) -> None:
        if self.past_action_window_size != 0:
            raise ValueError("past_action_window_size must be 0 (CogACT does not use action history)")
        if self.noise_schedule != "squaredcos_cap_v2":
            raise ValueError(
                f"noise_schedule {self.noise_schedule!r} is not supported (CogACT: squaredcos_cap_v2)"
            )
        if self.arch_specifier.split("+")[-1] not in ("linear", "gelu-mlp", "fused-gelu-mlp"):
            raise ValueError(f"arch_specifier {self.arch_specifier!r} is not supported")
        if self.image_size % self.dino.patch_size or self.image_size % self.siglip.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the ViT patch sizes")
        if self.num_patches != (self.image_size // self.siglip.patch_size) ** 2:
            raise ValueError("the DINOv2 and SigLIP towers must produce the same number of patches")
        if self.dit_hidden_size % self.dit_num_heads or self.hidden_size % self.num_attention_heads:
            raise ValueError("DiT and Llama widths must be divisible by their head counts")
        if self.cfg_scale > 1.0 and self.class_dropout_prob <= 0:
            raise ValueError("cfg_scale > 1 needs class_dropout_prob > 0 (the unconditional embedding)")
        if not 1 <= self.num_ddim_steps <= self.diffusion_steps:
            raise ValueError(
                f"num_ddim_steps must be in [1, {self.diffusion_steps}], got {self.num_ddim_steps}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.dino.patch_size) ** 2

    @property
    def vision_dim(self) -> int:
        return self.dino.embed_dim + self.siglip.embed_dim

    @property
    def chunk_size(self) -> int:
        return self.future_action_window_size + self.past_action_window_size + 1

    @property
    def projector_kind(self) -> str:
        return self.arch_specifier.split("+")[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for tower in ("dino", "siglip"):
            d[tower]["mean"], d[tower]["std"] = list(d[tower]["mean"]), list(d[tower]["std"])
        d["suffix_token_ids"] = list(self.suffix_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CogACTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CogACTConfig keys: {sorted(unknown)}")
        kwargs = dict(d)
        for tower in ("dino", "siglip"):
            if tower in kwargs and isinstance(kwargs[tower], Mapping):
                t = dict(kwargs[tower])
                for k in ("mean", "std"):
                    if k in t:
                        t[k] = tuple(t[k])
                kwargs[tower] = ViTConfig(**t)
        if "suffix_token_ids" in kwargs:
            kwargs["suffix_token_ids"] = tuple(kwargs["suffix_token_ids"])
        return cls(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> CogACTConfig:
        """The same architecture at toy size (random weights build in a fraction of a second once
        transformers is imported): 28 px images (4 patches per tower), 2- and 3-block ViTs of width 32/48, a
        2-layer Llama of width 64 (4 heads), a 2-block DiT of width 64 predicting 4 actions, 20 diffusion
        steps sampled in 4 DDIM steps. Token ids fit a test tokenizer of < 128 entries."""
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
            llm_max_length=128,
            suffix_token_ids=(3, 2),
            pad_token_id=0,
            action_model_type="custom",
            dit_depth=2,
            dit_hidden_size=64,
            dit_num_heads=4,
            future_action_window_size=3,
            diffusion_steps=20,
            num_ddim_steps=4,
        )
        return replace(base, **overrides) if overrides else base

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], source: str = "config.json", action_model_type: str | None = None
    ) -> CogACTConfig:
        """The architecture a CogACT run's ``config.json`` names (see the module docstring);
        ``action_model_type`` overrides the file's (the original takes it as an argument at load time)."""
        if "daptq_architecture" in run_config:
            return cls.from_dict(run_config["daptq_architecture"])
        vla = run_config.get("vla")
        if not isinstance(vla, Mapping) or "base_vlm" not in vla:
            raise ValueError(
                f"{source}: missing 'vla.base_vlm' (is this a CogACT run directory's config.json?)"
            )
        base_vlm = str(vla["base_vlm"])
        if base_vlm not in BASE_VLMS:
            raise ValueError(
                f"{source}: base VLM {base_vlm!r} is not supported; supported: {sorted(BASE_VLMS)}"
            )
        model_type = action_model_type or str(run_config.get("action_model_type", "DiT-B"))
        if model_type not in DIT_SIZES:
            raise ValueError(f"{source}: action_model_type {model_type!r} is not one of {sorted(DIT_SIZES)}")
        depth, hidden, heads = DIT_SIZES[model_type]
        return cls(
            image_size=BASE_VLMS[base_vlm]["image_size"],
            arch_specifier=BASE_VLMS[base_vlm]["arch_specifier"],
            action_model_type=model_type,
            dit_depth=depth,
            dit_hidden_size=hidden,
            dit_num_heads=heads,
            action_dim=int(run_config.get("action_dim", 7)),
            future_action_window_size=int(run_config.get("future_action_window_size", 15)),
            past_action_window_size=int(run_config.get("past_action_window_size", 0)),
        )
