"""Prismatic's fused DINOv2 + SigLIP vision backbone, with timm's parameter names.

Prismatic builds both towers with ``timm.create_model(..., num_classes=0, img_size=224)`` and replaces their
``forward`` by ``get_intermediate_layers(n={depth - 2})``: the patch tokens (class and register tokens
dropped) at the output of the second-to-last block, without the final norm. timm cannot be imported here
(it needs torchvision), so these are the few timm 0.9 modules that path uses, written small, with timm's
names so a checkpoint's ``vision_backbone.{dino,siglip}_featurizer.*`` tensors load key for key. The last
block, the final ``norm`` and SigLIP's attention-pool head (``attn_pool``) hold checkpoint tensors but are
never run (``unused_module_names``), as in the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from daptq.models.cogact.config import ViTConfig


class PatchEmbed(nn.Module):
    """timm.layers.PatchEmbed: a stride-p convolution, flattened to (B, N, D)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"ViT input is {tuple(x.shape[-2:])} px; this tower takes {self.img_size} px")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm.models.vision_transformer.Attention: fused ``qkv`` (rows [q; k; v]), ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """timm.layers.Mlp: ``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """timm LayerScale (DINOv2): a learned per-channel ``gamma``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """timm pre-norm ViT block (LayerNorm eps 1e-6), with LayerScale when ``init_values`` is set."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, init_values: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """timm's MAP head (SigLIP ``global_pool="map"``); present for its checkpoint tensors, never run here."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not on Prismatic's path
        raise RuntimeError("the SigLIP attention-pool head is not used by Prismatic (patch features are)")


class VisionTransformer(nn.Module):
    """The timm VisionTransformer parameters Prismatic's towers have, and its intermediate-layer forward."""

    def __init__(self, config: ViTConfig, img_size: int) -> None:
        super().__init__()
        c = self.config = config
        self.num_prefix_tokens = c.num_prefix_tokens
        self.no_embed_class = c.no_embed_class
        self.patch_embed = PatchEmbed(img_size, c.patch_size, c.embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, c.embed_dim)) if c.reg_tokens else None
        embed_len = n if c.no_embed_class else n + c.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, c.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_hidden, c.init_values) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.attn_pool = (
            AttentionPoolLatent(c.embed_dim, c.num_heads, c.mlp_hidden) if c.global_pool == "map" else None
        )
        for p in (self.cls_token, self.reg_token):
            if p is not None:
                nn.init.normal_(p, std=1e-6)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            return torch.cat([*prefix, x + self.pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels -> (B, N, D) patch tokens after block ``depth - 2``."""
        x = self._pos_embed(self.patch_embed(pixels))
        for block in self.blocks[:-1]:  # the last block's output is not read (timm would still run it)
            x = block(x)
        return x[:, self.num_prefix_tokens :]

    def unused_module_names(self) -> list[str]:
        names = [f"blocks.{len(self.blocks) - 1}", "norm"]
        return names + (["attn_pool"] if self.attn_pool is not None else [])


class DinoSigLIPViTBackbone(nn.Module):
    """Prismatic's ``DinoSigLIPViTBackbone``: both towers on their own normalization, patches concatenated."""

    def __init__(self, dino: ViTConfig, siglip: ViTConfig, image_size: int) -> None:
        super().__init__()
        self.dino_featurizer = VisionTransformer(dino, image_size)
        self.siglip_featurizer = VisionTransformer(siglip, image_size)
        if self.dino_featurizer.patch_embed.num_patches != self.siglip_featurizer.patch_embed.num_patches:
            raise ValueError("DINOv2 and SigLIP towers must produce the same number of patches")

    @property
    def num_patches(self) -> int:
        return self.dino_featurizer.patch_embed.num_patches

    @property
    def embed_dim(self) -> int:
        return self.dino_featurizer.config.embed_dim + self.siglip_featurizer.config.embed_dim

    def forward(self, dino_pixels: torch.Tensor, siglip_pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.dino_featurizer(dino_pixels), self.siglip_featurizer(siglip_pixels)], dim=2)
