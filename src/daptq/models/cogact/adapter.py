"""CogACT as a ``VLAAdapter``: what quantization methods may know about it.

Model-input batches (dicts of tensors) of ``objective`` / ``sample`` / ``condition``:
``dino_pixels`` and ``siglip_pixels`` (B, 3, S, S) float (``processing.image_tensors``), ``input_ids`` (B, L)
and ``attention_mask`` (B, L) bool (right-padded prompts, ``processing.tokenize_prompts``), and for the
objective ``actions`` (B, K, 7) in the model's normalized space [-1, 1].

Roles: both ViT towers (and their patch convolutions) are ``vision``; the projector and the Llama layers are
``backbone`` (the projector feeds the LLM, as the reference VLA's input projections do); the DiT's condition
projection ``action_model.net.z_embedder.linear`` is the ``interface`` (the only layer the cognition feature
z passes through into the action model, so CSRC folds its correction there, exactly); the rest of the DiT is
``action_head``. Modules that hold checkpoint tensors but never run at inference (each ViT's last block, final
norm and SigLIP's attention pool, the LLM's ``lm_head`` and embedding table, the DiT's ``history_embedder``)
are not declared: calibration would never see them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from daptq.models.adapter import AttentionLayout, InterfaceModule, QuantizableModule, VLAAdapter
from daptq.models.cogact.model import CogACT
from daptq.models.cogact.processing import (
    COGACT_ACTION_SPACE,
    ActionStatistics,
    image_tensors,
    tokenize_prompts,
)
from daptq.models.family_common import require_inputs, stack_layouts, weight_modules
from daptq.quant.smoothing import SmoothingGroup

INTERFACE = "action_model.net.z_embedder.linear"
MODEL_INPUTS = ("dino_pixels", "siglip_pixels", "input_ids", "attention_mask")
TOWERS = (("dino_featurizer", "vision_dino"), ("siglip_featurizer", "vision_siglip"))


def prismatic_vit_layouts(backbone: nn.Module, towers: Sequence[tuple[str, str]]) -> list[AttentionLayout]:
    """The fused-qkv attention of every block of a Prismatic DINOv2 + SigLIP backbone (``towers``: (attribute,
    stack) pairs) but the last, which never runs (Prismatic reads the second-to-last block's output)."""
    out = []
    for tower, stack in towers:
        vit = getattr(backbone, tower)
        for i in range(len(vit.blocks) - 1):
            p = f"vision_backbone.{tower}.blocks.{i}.attn"
            out.append(
                AttentionLayout(
                    p, vit.config.num_heads, "vision", f"{p}.proj", qkv=f"{p}.qkv", block=i, stack=stack
                )
            )
    return out


def prismatic_vit_groups(backbone: nn.Module, towers: Sequence[tuple[str, str]]) -> list[SmoothingGroup]:
    """Per running ViT block: norm1 -> qkv, value rows of qkv -> proj, norm2 -> fc1."""
    groups = []
    for tower, _ in towers:
        vit = getattr(backbone, tower)
        d = vit.config.embed_dim
        for i in range(len(vit.blocks) - 1):
            p = f"vision_backbone.{tower}.blocks.{i}"
            groups += [
                SmoothingGroup(f"{p}.norm1", (f"{p}.attn.qkv",), "layernorm"),
                SmoothingGroup(f"{p}.attn.qkv", (f"{p}.attn.proj",), "linear", offset=2 * d),
                SmoothingGroup(f"{p}.norm2", (f"{p}.mlp.fc1",), "layernorm"),
            ]
    return groups


class CogACTAdapter(VLAAdapter):
    """The CogACT network for quantization methods (see the module docstring)."""

    objective_kind = "diffusion"
    capabilities = frozenset({"attention", "smoothing", "condition"})

    def __init__(
        self,
        model: CogACT,
        tokenizer: Any = None,
        statistics: ActionStatistics | None = None,
        cfg_scale: float | None = None,
    ) -> None:
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.statistics = statistics
        self.cfg_scale = model.config.cfg_scale if cfg_scale is None else float(cfg_scale)
        self.action_space = COGACT_ACTION_SPACE
        if model.config.action_dim != COGACT_ACTION_SPACE.dim:
            raise ValueError(
                f"CogACT adapter: action_dim {model.config.action_dim} != 7 "
                "(x, y, z, roll, pitch, yaw, gripper)"
            )
        if statistics is not None and statistics.dim != model.config.action_dim:
            raise ValueError(
                f"dataset statistics {statistics.key!r} have {statistics.dim} action dimensions, the model "
                f"{model.config.action_dim}"
            )

    # ---- structure ---------------------------------------------------------------------------------------
    def _where(self, name: str) -> tuple[str, int | None, str | None]:
        """(role, block, stack) of a module by its qualified name."""
        parts = name.split(".")
        if name.startswith("vision_backbone."):
            stack = dict(TOWERS)[parts[1]]
            block = int(parts[3]) if parts[2] == "blocks" else None
            return "vision", block, stack if block is not None else None
        if name.startswith("projector."):
            return "backbone", None, None
        if name.startswith("llm_backbone.llm.model.layers."):
            return "backbone", int(parts[4]), "backbone"
        if name == INTERFACE:
            return "interface", None, None
        if name.startswith("action_model.net.blocks."):
            return "action_head", int(parts[3]), "dit"
        if name.startswith("action_model."):
            return "action_head", None, None
        return "other", None, None

    def quantizable_modules(self) -> list[QuantizableModule]:
        """Every Linear and Conv2d on CogACT's inference path with its role, block and stack."""
        out = []
        for name, module, kind in weight_modules(self.model, skip=self.model.unused_module_names()):
            role, block, stack = self._where(name)
            out.append(QuantizableModule(name, module, role, {"kind": kind}, block=block, stack=stack))
        return out

    def interface_modules(self) -> list[InterfaceModule]:
        return [
            InterfaceModule(
                INTERFACE,
                self.module(INTERFACE),
                "vector",
                "exact",
                "the cognition feature z (B, 1, d_llm) enters the DiT only here; its output plus the "
                "timestep embedding is the condition token. Classifier-free guidance also passes the learned "
                "unconditional embedding through this layer, so a folded correction reaches both branches.",
            )
        ]

    def attention_layouts(self) -> list[AttentionLayout]:
        c = self.config
        out = prismatic_vit_layouts(self.model.vision_backbone, TOWERS)
        out += stack_layouts(
            "llm_backbone.llm.model.layers.",
            c.num_hidden_layers,
            c.num_attention_heads,
            "backbone",
            "backbone",
            kv_heads=c.num_key_value_heads,
        )
        for i in range(c.dit_depth):
            p = f"action_model.net.blocks.{i}.attn"
            out.append(
                AttentionLayout(
                    p, c.dit_num_heads, "action_head", f"{p}.proj", qkv=f"{p}.qkv", block=i, stack="dit"
                )
            )
        return out

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """ViT blocks: norm1 -> qkv, value rows of qkv -> proj, norm2 -> fc1. Llama layers (multi-head only):
        value rows of v_proj -> o_proj (``quant.smoothing`` folds into nn.LayerNorm, not RMSNorm). DiT blocks:
        value rows of qkv -> proj (their LayerNorms have no affine to fold into)."""
        c = self.config
        groups = prismatic_vit_groups(self.model.vision_backbone, TOWERS)
        if c.num_key_value_heads == c.num_attention_heads:
            for i in range(c.num_hidden_layers):
                p = f"llm_backbone.llm.model.layers.{i}.self_attn"
                groups.append(SmoothingGroup(f"{p}.v_proj", (f"{p}.o_proj",), "linear", offset=0))
        for i in range(c.dit_depth):
            p = f"action_model.net.blocks.{i}.attn"
            groups.append(SmoothingGroup(f"{p}.qkv", (f"{p}.proj",), "linear", offset=2 * c.dit_hidden_size))
        return groups

    # ---- computation ---------------------------------------------------------------------------------------
    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        require_inputs(
            batch, MODEL_INPUTS, "CogACT", "build batches with calibration_batches() or observation_batch()"
        )
        device = next(self.model.parameters()).device
        return [batch[k].to(device) for k in MODEL_INPUTS]

    def condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """z (B, d_llm): the Llama hidden state at the cognition token."""
        dtype = next(self.model.parameters()).dtype
        dino, siglip, ids, mask = self._inputs(batch)
        return self.model.cognition_features(dino.to(dtype), siglip.to(dtype), ids, mask)

    def objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The original's epsilon MSE (one noise draw and timestep per sample, from ``generator``)."""
        if "actions" not in batch:
            raise ValueError("CogACT objective needs batch['actions'] (B, K, 7) in the normalized space")
        z = self.condition(batch)
        actions = batch["actions"].to(z.device, z.dtype)
        if actions.shape[1:] != (self.config.chunk_size, self.config.action_dim):
            raise ValueError(
                f"batch['actions'] has shape {tuple(actions.shape)}, expected (B, {self.config.chunk_size}, "
                f"{self.config.action_dim})"
            )
        return self.model.action_model.loss(actions, z[:, None], dim_weights, generator)

    def sample(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The model's chunk (B, K, 7) in the normalized space: DDIM with classifier-free guidance,
        differentiable, initial noise drawn on the CPU from ``generator``. Not clipped: clipping to [-1, 1]
        belongs to un-normalization (the policy's), and would zero the gradients sensitivity methods read."""
        z = self.condition(batch)
        c = self.config
        noise = torch.randn((z.shape[0], c.chunk_size, c.action_dim), generator=generator).to(
            z.device, z.dtype
        )
        return self.model.action_model.sample(z[:, None], noise, self.cfg_scale)

    # ---- data ----------------------------------------------------------------------------------------------
    def model_inputs(self, images: Any, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """uint8 images (B, H, W, 3) and instruction strings -> the model-input tensors."""
        if self.tokenizer is None:
            raise ValueError(
                "this CogACT adapter has no tokenizer: put the Llama-2 tokenizer files in RUN/tokenizer "
                "(or pass tokenizer=DIR) to encode instructions"
            )
        dino, siglip = image_tensors(images, self.config)
        if len(instructions) != dino.shape[0]:
            raise ValueError(f"{dino.shape[0]} images but {len(instructions)} instructions")
        input_ids, attention_mask = tokenize_prompts(self.tokenizer, list(instructions), self.config)
        return {
            "dino_pixels": dino,
            "siglip_pixels": siglip,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }

    def calibration_batches(self, batches: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Dataset batches (``image`` uint8 (B, H, W, 3), ``instruction`` list[str], optional ``actions``
        (B, K, 7) in robot units, normalized here with the run's statistics; ``state`` is ignored: CogACT
        reads no proprioception) -> model-input batches."""
        for raw in batches:
            for key in ("image", "instruction"):
                if key not in raw:
                    raise ValueError(f"calibration batch is missing {key!r} (has {sorted(raw)})")
            instructions = (
                [raw["instruction"]] if isinstance(raw["instruction"], str) else list(raw["instruction"])
            )
            batch = self.model_inputs(raw["image"], instructions)
            if "actions" in raw:
                actions = np.asarray(raw["actions"], dtype=np.float32)
                if actions.ndim != 3 or actions.shape[-1] != self.config.action_dim:
                    raise ValueError(
                        f"calibration actions have shape {actions.shape}; CogACT takes (B, K, "
                        f"{self.config.action_dim}) delta end-effector actions "
                        "(x, y, z, roll, pitch, yaw, gripper)"
                    )
                if self.statistics is not None:
                    actions = self.statistics.normalize(actions)
                batch["actions"] = torch.from_numpy(np.ascontiguousarray(actions))
            yield batch
