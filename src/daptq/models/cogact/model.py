"""The CogACT network with the original's module names, so a checkpoint's groups load key for key.

    image -> DINOv2 (ImageNet norm.) ---+-> concat (B, 256, 2176) -> projector (fused GELU MLP) --+
          -> SigLIP (0.5/0.5 norm.)  ---+                                                        |
    "<s>" + 256 projected patches + "In: What action should the robot take to ...?\\nOut: " + '' + "</s>"
      -> Llama-2 (transformers LlamaForCausalLM) -> final-norm hidden state at the last token ("</s>",
         the cognition token): z (B, 4096)
    z -> action_model.net (DiT): z_embedder.linear -> condition token + timestep; 12 blocks -> epsilon
      -> DDIM 10 steps with classifier-free guidance 1.5 -> 16 normalized actions (B, 16, 7)

``CogACT`` has exactly the four checkpoint groups as children: ``vision_backbone``, ``llm_backbone``,
``projector`` and ``action_model`` (the original nests the first three under ``vlm.``; its checkpoints
strip that prefix), so ``model.<group>.state_dict()`` has the keys of ``checkpoint["model"][<group>]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from daptq.models.cogact.action_model import ActionModel
from daptq.models.cogact.config import CogACTConfig
from daptq.models.cogact.vit import DinoSigLIPViTBackbone

CHECKPOINT_GROUPS = ("vision_backbone", "llm_backbone", "projector", "action_model")


class LinearProjector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.projector = nn.Linear(vision_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)


class MLPProjector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)


class FusedMLPProjector(nn.Module):
    """Prismatic's projector for fused backbones: vision_dim -> 4 vision_dim -> llm_dim -> llm_dim."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(vision_dim, 4 * vision_dim),
            nn.GELU(),
            nn.Linear(4 * vision_dim, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)


PROJECTORS = {"linear": LinearProjector, "gelu-mlp": MLPProjector, "fused-gelu-mlp": FusedMLPProjector}


def llama_config(c: Any):
    """The transformers ``LlamaConfig`` of a Prismatic Llama-2 backbone (SDPA attention, no cache, untied
    lm_head) from a config with its sizes (CogACT's, OpenVLA-OFT's)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=False,
        pad_token_id=c.pad_token_id,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


class LLaMa2LLMBackbone(nn.Module):
    """Prismatic's Llama-2 backbone: the transformers ``LlamaForCausalLM`` under ``llm``."""

    def __init__(self, config: CogACTConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.llm = LlamaForCausalLM(llama_config(config))

    def reset_rotary(self) -> None:
        """Rebuild the rotary embedding's buffers (non-persistent, so never in a checkpoint) on the CPU:
        a model built on the meta device and filled from a checkpoint needs them materialized."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.llm.model.rotary_emb = LlamaRotaryEmbedding(self.llm.config)


class CogACT(nn.Module):
    """Vision backbone, projector, Llama backbone and action model; see the module docstring."""

    def __init__(self, config: CogACTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.vision_backbone = DinoSigLIPViTBackbone(c.dino, c.siglip, c.image_size)
        self.llm_backbone = LLaMa2LLMBackbone(c)
        self.projector = PROJECTORS[c.projector_kind](c.vision_dim, c.hidden_size)
        self.action_model = ActionModel(
            token_size=c.hidden_size,
            in_channels=c.action_dim,
            hidden_size=c.dit_hidden_size,
            depth=c.dit_depth,
            num_heads=c.dit_num_heads,
            mlp_ratio=c.dit_mlp_ratio,
            class_dropout_prob=c.class_dropout_prob,
            future_action_window_size=c.future_action_window_size,
            diffusion_steps=c.diffusion_steps,
            num_ddim_steps=c.num_ddim_steps,
        )

    def cognition_features(
        self,
        dino_pixels: torch.Tensor,
        siglip_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """z (B, hidden_size): the LLM's final-norm hidden state at each row's last attended token (the
        cognition token; rows are right-padded), with the projected patches inserted after ``<s>``."""
        patches = self.projector(self.vision_backbone(dino_pixels, siglip_pixels))
        llm = self.llm_backbone.llm
        embeds = llm.get_input_embeddings()(input_ids).to(patches.dtype)
        B, n = patches.shape[:2]
        mask = attention_mask.to(torch.long)
        embeds = torch.cat([embeds[:, :1], patches, embeds[:, 1:]], dim=1)
        ones = torch.ones(B, n, dtype=mask.dtype, device=mask.device)
        full_mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
        hidden = llm.model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).last_hidden_state
        # The original's index of the last attended text token (first position where the cumulative sum
        # of the mask reaches its maximum), shifted by the inserted patches.
        cum = mask.cumsum(dim=1)
        last = (cum == cum.max(dim=1, keepdim=True).values).float().argmax(dim=1)
        return hidden[torch.arange(B, device=hidden.device), n + last]

    def unused_module_names(self) -> list[str]:
        """Modules whose tensors are in the checkpoint but which CogACT's inference never runs."""
        names = [
            f"vision_backbone.dino_featurizer.{m}"
            for m in self.vision_backbone.dino_featurizer.unused_module_names()
        ]
        names += [
            f"vision_backbone.siglip_featurizer.{m}"
            for m in self.vision_backbone.siglip_featurizer.unused_module_names()
        ]
        return [*names, "llm_backbone.llm.lm_head", "action_model.net.history_embedder"]
