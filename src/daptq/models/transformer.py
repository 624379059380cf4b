"""Transformer blocks built only from ``nn.Linear`` and ``nn.LayerNorm``, nanoGPT style.

Quantization methods swap ``nn.Linear`` modules for quantized ones, and torchao-quantized weights break
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (they read ``.weight`` directly). So every
projection here is an ``nn.Linear`` called as a module, never through its ``.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``mask`` (B, T) is True for tokens that may be attended to."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Explicit softmax attention: for these short sequences it is as fast as the fused kernel on CPU and,
        # unlike the fused kernel's bf16 backward, stays fast under CPU autocast.
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        if mask is not None:
            att = att.masked_fill(~mask[:, None, None, :], float("-inf"))  # broadcast over heads and queries
        y = torch.softmax(att.float(), dim=-1).to(v.dtype) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model: int, expansion: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, expansion * d_model)
        self.proj = nn.Linear(expansion * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="none"))


class Block(nn.Module):
    """Pre-norm transformer block (the backbone's layer)."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie, 2023): ``c`` sets shift/scale/gate.

    The modulation layer starts at zero, so each block starts as the identity and training is stable.
    """

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d_model)
        self.adaLN = nn.Linear(d_model, 6 * d_model)
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(c)).chunk(6, dim=1)
        x = x + gate1[:, None, :] * self.attn(modulate(self.ln_1(x), shift1, scale1))
        return x + gate2[:, None, :] * self.mlp(modulate(self.ln_2(x), shift2, scale2))
