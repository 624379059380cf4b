"""OpenVLA-OFT as a ``VLAAdapter``.

Model-input batches: ``dino_pixels`` / ``siglip_pixels`` (B, N, 3, S, S) float (N images per sample),
``input_ids`` / ``attention_mask`` (B, L) (``<s>`` + prompt + K*A action tokens + ``</s>``, right-padded),
``proprio`` (B, P) normalized, and for the objective ``actions`` (B, K, A) normalized to [-1, 1].

Roles: both ViT towers are ``vision`` (stacks ``vision_dino`` / ``vision_siglip``); the projector, the proprio
projector (it feeds a token to the LLM) and the Llama layers are ``backbone``; the action head's first layer
``action_head.model.fc1`` is the ``interface`` (kind "tokens": it reads the LLM's hidden states at the action
positions, so CSRC compensates its outputs and folds exactly into its W, b: a ReLU follows, nothing mixes
channels before it); the rest of the head is ``action_head``. The MLP-ResNet's residual blocks are not a DiT
stack, so no action-head module declares a stack: DA-PTQ keeps no "last DiT blocks" float here (and says so).
Modules that never run at L1 inference (each ViT's last block, final norm and SigLIP's attention pool, the
LLM's ``lm_head``) are not declared.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import AttentionLayout, InterfaceModule, QuantizableModule, VLAAdapter
from daptq.models.cogact.adapter import prismatic_vit_groups, prismatic_vit_layouts
from daptq.models.family_common import require_inputs, stack_layouts, weight_modules
from daptq.models.openvla_oft.model import OpenVLAOFT
from daptq.models.openvla_oft.processing import (
    OFT_ACTION_SPACE,
    OFTStatistics,
    image_tensors,
    tokenize_prompts,
)
from daptq.quant.smoothing import SmoothingGroup

INTERFACE = "action_head.model.fc1"
MODEL_INPUTS = ("dino_pixels", "siglip_pixels", "input_ids", "attention_mask")
TOWERS = (("featurizer", "vision_dino"), ("fused_featurizer", "vision_siglip"))
LLM_LAYERS = "language_model.model.layers."


class OFTAdapter(VLAAdapter):
    """The OpenVLA-OFT network for quantization methods (see the module docstring)."""

    objective_kind = "regression_l1"
    capabilities = frozenset({"attention", "smoothing"})

    def __init__(self, model: OpenVLAOFT, tokenizer: Any = None, statistics: OFTStatistics | None = None):
        self.model = model
        self.config = c = model.config
        self.tokenizer = tokenizer
        self.statistics = statistics
        if c.action_dim != OFT_ACTION_SPACE.dim:
            raise ValueError(f"OpenVLA-OFT adapter: action_dim {c.action_dim} != 7 (LIBERO's delta EEF)")
        self.action_space = OFT_ACTION_SPACE
        if statistics is not None:
            statistics.check(c)

    # ---- structure ---------------------------------------------------------------------------------------
    def _where(self, name: str) -> tuple[str, int | None, str | None]:
        parts = name.split(".")
        if name.startswith("vision_backbone."):
            stack = dict(TOWERS)[parts[1]]
            block = int(parts[3]) if parts[2] == "blocks" else None
            return "vision", block, stack if block is not None else None
        if name.startswith(("projector.", "proprio_projector.")):
            return "backbone", None, None
        if name.startswith(LLM_LAYERS):
            return "backbone", int(parts[3]), "backbone"
        if name == INTERFACE:
            return "interface", None, None
        if name.startswith("action_head."):
            return "action_head", None, None
        return "other", None, None

    def quantizable_modules(self) -> list[QuantizableModule]:
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
                "tokens",
                "exact",
                "the LLM's hidden states at the K*A action positions (grouped A per chunk step) enter the "
                "action head only here; a ReLU follows, so an output affine folds into W, b exactly",
            )
        ]

    def attention_layouts(self) -> list[AttentionLayout]:
        c = self.config
        out = prismatic_vit_layouts(self.model.vision_backbone, TOWERS)
        out += stack_layouts(
            LLM_LAYERS,
            c.num_hidden_layers,
            c.num_attention_heads,
            "backbone",
            "backbone",
            kv_heads=c.num_key_value_heads,
        )
        return out

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """ViT blocks (norm1 -> qkv, value rows -> proj, norm2 -> fc1), Llama v_proj -> o_proj (multi-head
        only), and the head's LayerNorms into the Linear each feeds."""
        c = self.config
        groups = prismatic_vit_groups(self.model.vision_backbone, TOWERS)
        if c.num_key_value_heads == c.num_attention_heads:
            for i in range(c.num_hidden_layers):
                p = f"{LLM_LAYERS}{i}.self_attn"
                groups.append(SmoothingGroup(f"{p}.v_proj", (f"{p}.o_proj",), "linear", offset=0))
        h = "action_head.model"
        groups.append(SmoothingGroup(f"{h}.layer_norm1", (f"{h}.fc1",), "layernorm"))
        for i in range(c.head_num_blocks):
            groups.append(
                SmoothingGroup(
                    f"{h}.mlp_resnet_blocks.{i}.ffn.0", (f"{h}.mlp_resnet_blocks.{i}.ffn.1",), "layernorm"
                )
            )
        groups.append(SmoothingGroup(f"{h}.layer_norm2", (f"{h}.fc2",), "layernorm"))
        return groups

    # ---- computation ---------------------------------------------------------------------------------------
    def _forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        require_inputs(
            batch, MODEL_INPUTS, "OpenVLA-OFT", "build batches with calibration_batches() or model_inputs()"
        )
        p = next(self.model.parameters())
        dino, siglip, ids, mask = (batch[k].to(p.device) for k in MODEL_INPUTS)
        proprio = batch.get("proprio")
        proprio = proprio.to(p.device, p.dtype) if proprio is not None else None
        hidden = self.model.action_hidden_states(dino.to(p.dtype), siglip.to(p.dtype), ids, mask, proprio)
        return self.model.action_head.predict_action(hidden, self.config.chunk_size)

    def objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """OFT's L1 loss between the head's chunk and the normalized target chunk (no noise: ``generator``
        is unused); ``dim_weights`` scales each action dimension's error (all ones: the plain loss)."""
        if "actions" not in batch:
            raise ValueError("OpenVLA-OFT objective needs batch['actions'] (B, K, 7) in the normalized space")
        pred = self._forward(batch)
        actions = batch["actions"].to(pred.device, pred.dtype)
        if actions.shape[1:] != pred.shape[1:]:
            raise ValueError(
                f"batch['actions'] has shape {tuple(actions.shape)}, expected "
                f"(B, {pred.shape[1]}, {pred.shape[2]})"
            )
        err = (pred - actions).abs()
        if dim_weights is not None:
            err = err * dim_weights.to(err.device, err.dtype)
        return err.mean()

    def sample(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The head's chunk (B, K, 7), normalized: deterministic (``generator`` unused) and differentiable."""
        return self._forward(batch)

    # ---- data ----------------------------------------------------------------------------------------------
    def model_inputs(
        self, images: Sequence[Any], instructions: Sequence[str], proprio: Any = None
    ) -> dict[str, torch.Tensor]:
        """``images``: one uint8 (B, H, W, 3) array per camera (num_images of them); robot-unit ``proprio``
        (B, P) normalized here with the checkpoint's statistics."""
        c = self.config
        if self.tokenizer is None:
            raise ValueError("this OpenVLA-OFT adapter has no tokenizer (the checkpoint directory's files)")
        if len(images) != c.num_images:
            raise ValueError(
                f"this OpenVLA-OFT checkpoint reads {c.num_images} images per sample, got {len(images)}"
            )
        pix = [image_tensors(im, c) for im in images]
        dino = torch.stack([d for d, _ in pix], dim=1)
        siglip = torch.stack([s for _, s in pix], dim=1)
        if len(instructions) != dino.shape[0]:
            raise ValueError(f"{dino.shape[0]} images but {len(instructions)} instructions")
        ids, mask = tokenize_prompts(self.tokenizer, list(instructions), c)
        out = {"dino_pixels": dino, "siglip_pixels": siglip, "input_ids": ids, "attention_mask": mask}
        if c.use_proprio:
            if proprio is None:
                raise ValueError(f"this OpenVLA-OFT checkpoint reads a {c.proprio_dim}-D proprio state")
            state = np.asarray(proprio, dtype=np.float32).reshape(dino.shape[0], -1)
            if state.shape[1] != c.proprio_dim:
                raise ValueError(f"proprio has {state.shape[1]} values, the checkpoint takes {c.proprio_dim}")
            if self.statistics is not None:
                state = self.statistics.normalize_proprio(state)
            out["proprio"] = torch.from_numpy(np.ascontiguousarray(state))
        return out

    def calibration_batches(self, batches: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Dataset batches (``image`` and, for two-camera checkpoints, ``wrist_image`` uint8 (B, H, W, 3),
        ``instruction``, ``state`` (B, P), optional ``actions`` (B, K, 7) in robot units) -> model inputs."""
        for raw in batches:
            keys = ("image", "wrist_image")[: self.config.num_images]
            for key in (*keys, "instruction"):
                if key not in raw:
                    raise ValueError(f"calibration batch is missing {key!r} (has {sorted(raw)})")
            instr = raw["instruction"]
            instructions = [instr] if isinstance(instr, str) else list(instr)
            batch = self.model_inputs([raw[k] for k in keys], instructions, raw.get("state"))
            if "actions" in raw:
                actions = np.asarray(raw["actions"], dtype=np.float32)
                if actions.ndim != 3 or actions.shape[-1] != self.config.action_dim:
                    raise ValueError(f"calibration actions have shape {actions.shape}; expected (B, K, 7)")
                if self.statistics is not None:
                    actions = self.statistics.action.normalize(actions)
                batch["actions"] = torch.from_numpy(np.ascontiguousarray(actions))
            yield batch
