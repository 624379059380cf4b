"""The diffusion action head (a small DiT, as in CogACT) and its noise schedule with DDIM sampling.

The head predicts the noise epsilon added to a chunk of K actions, conditioned on the backbone's latent z.
z enters the head through exactly one module, ``z_proj``: its output is both a prefix token of the sequence
(as CogACT's cognition token) and, added to the timestep embedding, the adaLN-Zero condition of every block.
That single entry point is what ``interface_modules()`` reports, so CSRC can fold a correction into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from daptq.models.transformer import DiTBlock, modulate


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the diffusion step followed by a two-layer MLP."""

    def __init__(self, d_model: int, frequency_dim: int = 128) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.fc = nn.Linear(frequency_dim, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.proj(F.silu(self.fc(emb)))


class DiTActionHead(nn.Module):
    """epsilon_theta(noisy action chunk, t, z) -> predicted noise, shape (B, K, action_dim)."""

    def __init__(
        self, d_z: int, action_dim: int, chunk_size: int, d_model: int, n_layer: int, n_head: int
    ) -> None:
        super().__init__()
        self.z_proj = nn.Linear(d_z, d_model)  # the interface: the only place z enters the head
        self.t_embed = TimestepEmbedder(d_model)
        self.action_in = nn.Linear(action_dim, d_model)
        self.pos_emb = nn.Parameter(torch.randn(1, chunk_size + 1, d_model) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(d_model, n_head) for _ in range(n_layer))
        self.final_norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Linear(d_model, 2 * d_model)
        self.action_out = nn.Linear(d_model, action_dim)
        for layer in (self.final_adaLN, self.action_out):  # adaLN-Zero: the head starts by predicting zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, noisy_actions: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z_token = self.z_proj(z)
        c = z_token + self.t_embed(t)
        x = torch.cat([z_token[:, None, :], self.action_in(noisy_actions)], dim=1) + self.pos_emb
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_adaLN(F.silu(c)).chunk(2, dim=1)
        return self.action_out(modulate(self.final_norm(x), shift, scale)[:, 1:])


class NoiseSchedule(nn.Module):
    """Cosine ("squaredcos_cap_v2") DDPM schedule for training and deterministic DDIM (eta=0) sampling.

    Sampling uses few steps (CogACT: 10); the predicted clean chunk is clipped to the action range at each
    step, because actions live in [-1, 1].
    """

    def __init__(self, num_train_timesteps: int = 100, clip: float = 1.0) -> None:
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.clip = clip
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddim_timesteps(self, num_inference_steps: int) -> list[int]:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {num_inference_steps}"
            )
        ratio = self.num_train_timesteps // num_inference_steps
        return [i * ratio for i in reversed(range(num_inference_steps))]  # "leading" spacing, as diffusers

    @torch.no_grad()
    def sample(
        self,
        eps_model,
        shape: tuple[int, ...],
        num_inference_steps: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run DDIM from pure noise; ``eps_model(x_t, t_batch)`` returns the predicted noise.

        ``noise`` (of ``shape``) replaces the draw from ``generator``: batched rollouts draw each row from its
        own episode's generator.
        """
        return self.sample_with_grad(eps_model, shape, num_inference_steps, generator, device, noise)

    def sample_with_grad(
        self,
        eps_model,
        shape: tuple[int, ...],
        num_inference_steps: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sample`` with autograd kept, for methods that differentiate the action w.r.t. a layer (QVLA)."""
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = torch.randn(shape, generator=generator, device=device) if noise is None else noise.to(device)
        timesteps = self.ddim_timesteps(num_inference_steps)
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            a_t = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones((), device=x.device)
            eps = eps_model(x, torch.full((shape[0],), t, device=x.device, dtype=torch.long)).float()
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-self.clip, self.clip)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x
