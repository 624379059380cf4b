"""OpenVLA-OFT with the Hugging Face checkpoint's parameter names, so its shards load key for key.

    images (N per sample) -> DINOv2 + SigLIP (CogACT's Prismatic towers, under ``featurizer`` /
      ``fused_featurizer``, LayerScale as ``scale_factor``) -> projector (fc1, fc2, fc3)  -> N x 256 patches
    proprio (B, P) normalized -> proprio_projector (fc1, GELU, fc2) -> 1 token after the patches
    "<s>" + patches [+ proprio] + "In: What action should the robot take to ...?\\nOut:" + K*A empty action
      tokens + "</s>" -> Llama-2 (transformers LlamaForCausalLM under ``language_model``), bidirectional
    final-norm hidden states at the K*A action positions -> (B, K, A*D) -> action_head (MLP-ResNet, L1)
      -> (B, K, A) normalized actions

The action head and proprio projector are separate files in the original layout; here they are children of
one module (``action_head.*``, ``proprio_projector.*``) so a quantized directory addresses every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from daptq.models.cogact.config import ViTConfig
from daptq.models.cogact.model import llama_config
from daptq.models.cogact.vit import VisionTransformer
from daptq.models.openvla_oft.config import OFTConfig

CHECKPOINT_GROUPS = ("vision_backbone", "projector", "language_model")  # the safetensors shards
HEAD_FILES = {"action_head": "action_head", "proprio_projector": "proprio_projector"}


class LayerScale(nn.Module):
    """timm's LayerScale as OpenVLA's HF code patches it: ``gamma`` renamed ``scale_factor``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def _hf_tower(config: ViTConfig, image_size: int) -> VisionTransformer:
    vit = VisionTransformer(config, image_size)
    if config.init_values:
        for block in vit.blocks:
            for name in ("ls1", "ls2"):
                ls = LayerScale(config.embed_dim)
                with torch.no_grad():
                    ls.scale_factor.copy_(getattr(block, name).gamma)
                setattr(block, name, ls)
    return vit


class PrismaticVisionBackbone(nn.Module):
    """The fused backbone: ``featurizer`` (DINOv2) and ``fused_featurizer`` (SigLIP) per image, patches
    concatenated on the channel axis, images on the sequence axis."""

    def __init__(self, config: OFTConfig) -> None:
        super().__init__()
        self.featurizer = _hf_tower(config.dino, config.image_size)
        self.fused_featurizer = _hf_tower(config.siglip, config.image_size)

    def forward(self, dino_pixels: torch.Tensor, siglip_pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, S, S) each -> (B, N * patches, vision_dim)."""
        B, N = dino_pixels.shape[:2]
        d = self.featurizer(dino_pixels.flatten(0, 1))
        s = self.fused_featurizer(siglip_pixels.flatten(0, 1))
        return torch.cat([d, s], dim=2).reshape(B, N * d.shape[1], -1)

    def unused_module_names(self) -> list[str]:
        return [f"featurizer.{m}" for m in self.featurizer.unused_module_names()] + [
            f"fused_featurizer.{m}" for m in self.fused_featurizer.unused_module_names()
        ]


class PrismaticProjector(nn.Module):
    """Fused-backbone projector: fc1 (vision -> 4 vision), GELU, fc2 (-> llm), GELU, fc3 (llm -> llm)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


class ProprioProjector(nn.Module):
    """OFT's proprio projector: fc1 (proprio -> llm), GELU, fc2 (llm -> llm)."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """OFT's L1 head: each chunk step's A action-token states, concatenated (A * D), through an MLP-ResNet."""

    def __init__(self, input_dim: int, hidden_dim: int, action_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.model = MLPResNet(num_blocks, input_dim * action_dim, hidden_dim, action_dim)

    def predict_action(self, actions_hidden_states: torch.Tensor, chunk_size: int) -> torch.Tensor:
        B = actions_hidden_states.shape[0]
        return self.model(actions_hidden_states.reshape(B, chunk_size, -1))


class OpenVLAOFT(nn.Module):
    """Vision backbone, projector, Llama-2, proprio projector and L1 action head; see the module docstring."""

    def __init__(self, config: OFTConfig) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.config = c = config
        self.vision_backbone = PrismaticVisionBackbone(c)
        self.projector = PrismaticProjector(c.vision_dim, c.hidden_size)
        self.language_model = LlamaForCausalLM(llama_config(c))
        self.action_head = L1RegressionActionHead(
            c.hidden_size, c.head_hidden_dim, c.action_dim, c.head_num_blocks
        )
        self.proprio_projector = ProprioProjector(c.hidden_size, c.proprio_dim) if c.use_proprio else None

    def reset_rotary(self) -> None:
        """Rebuild the rotary buffers (non-persistent) on the CPU after a meta-device build."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.language_model.model.rotary_emb = LlamaRotaryEmbedding(self.language_model.config)

    def action_hidden_states(
        self,
        dino_pixels: torch.Tensor,
        siglip_pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        proprio: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, K*A, D): the LLM's final-norm hidden states at the action tokens. ``input_ids`` are
        ``<s>`` + prompt + K*A action tokens + ``</s>``, left-aligned and right-padded; the action tokens sit
        right before each row's last attended token."""
        c = self.config
        patches = self.projector(self.vision_backbone(dino_pixels, siglip_pixels))
        if c.use_proprio:
            if proprio is None:
                raise ValueError("this OpenVLA-OFT model reads proprio: the batch needs 'proprio' (B, P)")
            patches = torch.cat([patches, self.proprio_projector(proprio.to(patches.dtype))[:, None]], dim=1)
        lm = self.language_model
        embeds = lm.get_input_embeddings()(input_ids).to(patches.dtype)
        B, n = patches.shape[:2]
        mask = attention_mask.to(torch.long)
        length = mask.sum(dim=1)  # <s> + prompt + actions + </s>
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        first = (length - 1 - c.num_action_tokens)[:, None]
        is_action = (pos >= first) & (pos < (length - 1)[:, None])
        embeds = embeds * ~is_action[..., None]  # the original zeroes the action tokens' embeddings
        embeds = torch.cat([embeds[:, :1], patches, embeds[:, 1:]], dim=1)
        full = torch.cat(
            [mask[:, :1], torch.ones(B, n, dtype=mask.dtype, device=mask.device), mask[:, 1:]], 1
        )
        if c.bidirectional:
            keep = full.bool()[:, None, None, :].expand(B, 1, full.shape[1], full.shape[1])
            attn = torch.zeros(keep.shape, dtype=embeds.dtype, device=embeds.device)
            attn = attn.masked_fill(~keep, torch.finfo(embeds.dtype).min)
        else:
            attn = full
        hidden = lm.model(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state
        index = n + first + torch.arange(c.num_action_tokens, device=hidden.device)[None]  # (B, K*A)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    def unused_module_names(self) -> list[str]:
        """Modules whose tensors are in the checkpoint but which OFT's L1 inference never runs."""
        return [f"vision_backbone.{m}" for m in self.vision_backbone.unused_module_names()] + [
            "language_model.lm_head"
        ]
