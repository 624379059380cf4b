"""The configuration of lerobot's flow-matching VLAs (pi0, pi0.5, SmolVLA): lerobot's ``config.json`` fields
that decide the network and its conventions, plus the architecture sizes the original takes from elsewhere.

The original builds pi0's PaliGemma and Gemma expert from fixed variants (``paligemma_variant`` /
``action_expert_variant``: "gemma_2b", "gemma_300m", SigLIP So400m/14 at ``image_resolution``) and SmolVLA's
VLM from the Hugging Face config of ``vlm_model_name`` (SmolVLM2-500M-Video-Instruct by default), of which
it keeps the first ``num_vlm_layers`` text layers. daptq has no hub access, so those sizes are built in
(``VARIANTS``, ``SMOLVLM2_500M``) and can be given explicitly under the key ``daptq_architecture`` of
``config.json`` (the tiny test checkpoints do; lerobot's own files never carry it), or for SmolVLA from a
local copy of the VLM's ``config.json`` (``vlm_config=``). Every size is checked against the checkpoint's
tensor shapes when loading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

FAMILIES = ("pi0", "pi05", "smolvla")

# openpi's gemma.get_config: width, depth, mlp_dim, num_heads, num_kv_heads, head_dim
VARIANTS = {
    "gemma_300m": (1024, 18, 4096, 8, 1, 256),
    "gemma_2b": (2048, 18, 16384, 8, 1, 256),
}
PALIGEMMA_VOCAB = 257152
# PaliGemma's SigLIP So400m/14 as the original configures it (intermediate 4304, 27 layers, 16 heads).
SIGLIP_SO400M = {"hidden": 1152, "intermediate": 4304, "heads": 16, "layers": 27, "patch": 14}
# HuggingFaceTB/SmolVLM2-500M-Video-Instruct: SmolLM2-360M text, SigLIP base/16 at 512 px, pixel shuffle 4.
SMOLVLM2_500M = {
    "text": {
        "hidden": 960,
        "intermediate": 2560,
        "heads": 15,
        "kv_heads": 5,
        "head_dim": 64,
        "layers": 32,
        "vocab": 49280,
        "rms_norm_eps": 1e-5,
    },
    "vision": {"hidden": 768, "intermediate": 3072, "heads": 12, "layers": 12, "patch": 16, "image": 512},
    "scale_factor": 4,
}


@dataclass(frozen=True)
class TextConfig:
    """One decoder stack (the prefix LM or the action expert)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP tower."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    patch: int
    image: int


def smolvla_intermediate(hidden: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """SmolVLA's expert MLP width: 2/3 of 4x, rounded up to a multiple of 256 (its
    ``get_intermediate_size``)."""
    h = int(2 * hidden / 3)
    h = int(multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class LeRobotVLAConfig:
    """What decides the network and its conventions (see the module docstring)."""

    type: str
    text: TextConfig
    vision: VisionConfig
    expert: TextConfig
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_steps: int = 10
    min_period: float = 4e-3
    max_period: float = 4.0
    tokenizer_max_length: int = 48
    state_dim: int = 8
    action_dim: int = 7
    camera_keys: tuple[str, ...] = ("observation.images.image",)
    empty_cameras: int = 0
    normalization_mapping: Mapping[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    action_feature_names: tuple[str, ...] | None = None
    # SmolVLA only
    scale_factor: int = 4
    self_attn_every_n_layers: int = 2
    attention_mode: str = "cross_attn"
    pad_language_to: str = "longest"
    add_image_special_tokens: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.type not in FAMILIES:
            raise ValueError(f"lerobot VLA type {self.type!r} is not one of {list(FAMILIES)}")
        if self.type == "smolvla" and self.add_image_special_tokens:
            raise ValueError("SmolVLA with add_image_special_tokens=true is not supported by daptq")
        if self.type == "smolvla" and self.attention_mode != "cross_attn":
            raise ValueError(
                f"SmolVLA attention_mode {self.attention_mode!r}: daptq supports the released 'cross_attn'"
            )
        if self.type != "smolvla":
            t, e = self.text, self.expert
            if (t.heads, t.kv_heads, t.head_dim, t.layers) != (e.heads, e.kv_heads, e.head_dim, e.layers):
                raise ValueError(
                    "pi0: the PaliGemma and expert stacks attend jointly, so they need the same heads, kv "
                    f"heads, head_dim and depth; got {t} and {e}"
                )
        elif self.text.layers % self.expert.layers:
            raise ValueError(
                f"SmolVLA: {self.text.layers} VLM layers are not a multiple of {self.expert.layers} "
                "expert layers"
            )
        if self.action_dim > self.max_action_dim or self.state_dim > self.max_state_dim:
            raise ValueError(
                f"action_dim {self.action_dim} / state_dim {self.state_dim} exceed max_action_dim "
                f"{self.max_action_dim} / max_state_dim {self.max_state_dim}"
            )
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(
                f"n_action_steps {self.n_action_steps} must be in [1, chunk_size={self.chunk_size}]"
            )

    @property
    def image_size(self) -> int:
        return self.vision.image

    def expert_layer_of(self, vlm_layer: int) -> int | None:
        """SmolVLA: the expert layer paired with a VLM layer (None: the expert skips it); pi0: the same."""
        every = self.text.layers // self.expert.layers
        if every > 1 and vlm_layer % every:
            return None
        return vlm_layer // every

    def is_cross_layer(self, expert_layer: int) -> bool:
        """SmolVLA: does this expert layer cross-attend to the prefix KV (else it self-attends jointly)?"""
        n = self.self_attn_every_n_layers
        return self.type == "smolvla" and not (n > 0 and expert_layer % n == 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["camera_keys"] = list(self.camera_keys)
        d["normalization_mapping"] = dict(self.normalization_mapping)
        return d

    def architecture(self) -> dict[str, Any]:
        """The ``daptq_architecture`` block a written ``config.json`` carries (sizes lerobot takes
        elsewhere)."""
        return {
            "text": asdict(self.text),
            "vision": asdict(self.vision),
            "expert": asdict(self.expert),
            "scale_factor": self.scale_factor,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def replace(self, **changes: Any) -> LeRobotVLAConfig:
        return dataclasses.replace(self, **changes)

    # ---- lerobot's config.json -----------------------------------------------------------------------------
    @classmethod
    def from_lerobot(
        cls, raw: Mapping[str, Any], vlm_config: Mapping[str, Any] | None = None
    ) -> LeRobotVLAConfig:
        """A lerobot ``config.json`` (``type`` pi0 / pi05 / smolvla) -> config; ``vlm_config``: SmolVLA's VLM
        ``config.json`` content (default: SmolVLM2-500M's sizes)."""
        kind = raw.get("type")
        if kind not in FAMILIES:
            raise ValueError(
                f"config.json: 'type' is {kind!r}; daptq's lerobot loader knows {list(FAMILIES)}"
            )
        inputs = raw.get("input_features") or {}
        outputs = raw.get("output_features") or {}
        cameras = tuple(k for k, v in inputs.items() if _feature_type(v) == "VISUAL")
        state = inputs.get("observation.state")
        action = outputs.get("action")
        if action is None:
            raise ValueError("config.json: output_features has no 'action' feature")
        common: dict[str, Any] = {
            "chunk_size": int(raw.get("chunk_size", 50)),
            "n_action_steps": int(raw.get("n_action_steps", 50)),
            "max_state_dim": int(raw.get("max_state_dim", 32)),
            "max_action_dim": int(raw.get("max_action_dim", 32)),
            "min_period": float(raw.get("min_period", 4e-3)),
            "max_period": float(raw.get("max_period", 4.0)),
            "state_dim": int(_feature_shape(state)[-1])
            if state is not None
            else int(raw.get("max_state_dim", 32)),
            "action_dim": int(_feature_shape(action)[-1]),
            "camera_keys": cameras or ("observation.images.image",),
            "empty_cameras": int(raw.get("empty_cameras", 0)),
            "normalization_mapping": {k: str(v) for k, v in (raw.get("normalization_mapping") or {}).items()}
            or {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
            "action_feature_names": tuple(raw["action_feature_names"])
            if raw.get("action_feature_names")
            else None,
        }
        arch = raw.get("daptq_architecture")
        if kind == "smolvla":
            common.update(
                num_steps=int(raw.get("num_steps", 10)),
                tokenizer_max_length=int(raw.get("tokenizer_max_length", 48)),
                self_attn_every_n_layers=int(raw.get("self_attn_every_n_layers", 2)),
                attention_mode=str(raw.get("attention_mode", "cross_attn")),
                pad_language_to=str(raw.get("pad_language_to", "longest")),
                add_image_special_tokens=bool(raw.get("add_image_special_tokens", False)),
            )
            if arch is None:
                arch = _smolvla_architecture(raw, vlm_config)
        else:
            common.update(
                num_steps=int(raw.get("num_inference_steps", 10)),
                tokenizer_max_length=int(raw.get("tokenizer_max_length", 48 if kind == "pi0" else 200)),
            )
            if arch is None:
                arch = _pi_architecture(raw)
        return cls(
            type=kind,
            text=TextConfig(**arch["text"]),
            vision=VisionConfig(**arch["vision"]),
            expert=TextConfig(**arch["expert"]),
            scale_factor=int(arch.get("scale_factor", 4)),
            tie_word_embeddings=bool(arch.get("tie_word_embeddings", kind != "smolvla")),
            **common,
        )

    def to_lerobot(self) -> dict[str, Any]:
        """lerobot's ``config.json`` for this configuration (with ``daptq_architecture``)."""
        features = {
            k: {"type": "VISUAL", "shape": [3, self.image_size, self.image_size]} for k in self.camera_keys
        }
        if self.type != "pi05" or True:
            features["observation.state"] = {"type": "STATE", "shape": [self.state_dim]}
        out: dict[str, Any] = {
            "type": self.type,
            "n_obs_steps": 1,
            "input_features": features,
            "output_features": {"action": {"type": "ACTION", "shape": [self.action_dim]}},
            "chunk_size": self.chunk_size,
            "n_action_steps": self.n_action_steps,
            "max_state_dim": self.max_state_dim,
            "max_action_dim": self.max_action_dim,
            "min_period": self.min_period,
            "max_period": self.max_period,
            "empty_cameras": self.empty_cameras,
            "normalization_mapping": dict(self.normalization_mapping),
            "tokenizer_max_length": self.tokenizer_max_length,
        }
        if self.action_feature_names:
            out["action_feature_names"] = list(self.action_feature_names)
        if self.type == "smolvla":
            out.update(
                num_steps=self.num_steps,
                vlm_model_name="HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
                num_vlm_layers=self.text.layers,
                num_expert_layers=self.expert.layers,
                self_attn_every_n_layers=self.self_attn_every_n_layers,
                attention_mode=self.attention_mode,
                pad_language_to=self.pad_language_to,
                add_image_special_tokens=self.add_image_special_tokens,
                expert_width_multiplier=self.expert.hidden / self.text.hidden,
                resize_imgs_with_padding=[self.image_size, self.image_size],
            )
        else:
            out.update(
                paligemma_variant="gemma_2b",
                action_expert_variant="gemma_300m",
                num_inference_steps=self.num_steps,
                image_resolution=[self.image_size, self.image_size],
                dtype="float32",
            )
        out["daptq_architecture"] = self.architecture()
        return out

    @classmethod
    def tiny(cls, kind: str = "pi0", **overrides: Any) -> LeRobotVLAConfig:
        """A few-thousand-parameter member of the family for tests (seconds to build)."""
        vision = VisionConfig(hidden=16, intermediate=32, heads=2, layers=2, patch=8, image=32)
        if kind == "smolvla":
            text = TextConfig(32, 64, 4, 2, 8, 4, 64, 1e-5)
            expert = TextConfig(24, smolvla_intermediate(24), 4, 2, 8, 4, 64, 1e-5)
            base = {"tie_word_embeddings": False, "scale_factor": 2, "tokenizer_max_length": 16}
        else:
            text = TextConfig(32, 64, 4, 1, 8, 3, 64)
            expert = TextConfig(24, 48, 4, 1, 8, 3, 64)
            base = {"tokenizer_max_length": 16}
        base.update(
            type=kind,
            text=text,
            vision=vision,
            expert=expert,
            chunk_size=4,
            n_action_steps=4,
            max_state_dim=10,
            max_action_dim=8,
            num_steps=3,
            state_dim=8,
            action_dim=7,
        )
        base.update(overrides)
        return cls(**base)


def _feature_type(v: Any) -> str | None:
    return v.get("type") if isinstance(v, Mapping) else None


def _feature_shape(v: Any) -> tuple[int, ...]:
    shape = v.get("shape") if isinstance(v, Mapping) else None
    if not shape:
        raise ValueError(f"config.json: feature {v!r} has no shape")
    return tuple(int(s) for s in shape)


def _pi_architecture(raw: Mapping[str, Any]) -> dict[str, Any]:
    names = (raw.get("paligemma_variant", "gemma_2b"), raw.get("action_expert_variant", "gemma_300m"))
    for n in names:
        if n not in VARIANTS:
            raise ValueError(f"config.json: unknown Gemma variant {n!r}; known: {sorted(VARIANTS)}")
    res = raw.get("image_resolution", [224, 224])
    if res[0] != res[1]:
        raise ValueError(f"config.json: image_resolution {res} is not square (PaliGemma needs square images)")
    stacks = []
    for n in names:
        w, d, m, h, kv, hd = VARIANTS[n]
        stacks.append(
            {
                "hidden": w,
                "intermediate": m,
                "heads": h,
                "kv_heads": kv,
                "head_dim": hd,
                "layers": d,
                "vocab": PALIGEMMA_VOCAB,
            }
        )
    return {
        "text": stacks[0],
        "expert": stacks[1],
        "vision": {**SIGLIP_SO400M, "image": int(res[0])},
        "tie_word_embeddings": True,
    }


def _smolvla_architecture(raw: Mapping[str, Any], vlm: Mapping[str, Any] | None) -> dict[str, Any]:
    if vlm is not None:
        t, v = vlm.get("text_config", {}), vlm.get("vision_config", {})
        hidden = int(t["hidden_size"])
        heads = int(t["num_attention_heads"])
        text = {
            "hidden": hidden,
            "intermediate": int(t["intermediate_size"]),
            "heads": heads,
            "kv_heads": int(t.get("num_key_value_heads", heads)),
            "head_dim": int(t.get("head_dim") or hidden // heads),
            "layers": int(t["num_hidden_layers"]),
            "vocab": int(t["vocab_size"]),
            "rms_norm_eps": float(t.get("rms_norm_eps", 1e-5)),
        }
        vision = {
            "hidden": int(v["hidden_size"]),
            "intermediate": int(v["intermediate_size"]),
            "heads": int(v["num_attention_heads"]),
            "layers": int(v["num_hidden_layers"]),
            "patch": int(v["patch_size"]),
            "image": int(v["image_size"]),
        }
        scale = int(vlm.get("scale_factor", 4))
        tie = bool(vlm.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    else:
        text, vision, scale, tie = (
            dict(SMOLVLM2_500M["text"]),
            dict(SMOLVLM2_500M["vision"]),
            SMOLVLM2_500M["scale_factor"],
            False,
        )
    n_vlm = int(raw.get("num_vlm_layers", 16))
    if n_vlm > 0:
        text["layers"] = n_vlm
    width = int(text["hidden"] * float(raw.get("expert_width_multiplier", 0.75)))
    n_exp = int(raw.get("num_expert_layers", -1))
    expert = {
        **text,
        "hidden": width,
        "intermediate": smolvla_intermediate(width),
        "layers": n_exp if n_exp > 0 else text["layers"],
    }
    return {
        "text": text,
        "vision": vision,
        "expert": expert,
        "scale_factor": scale,
        "tie_word_embeddings": tie,
    }
