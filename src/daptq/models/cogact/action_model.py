"""CogACT's diffusion action model (``action_model.net`` is a DiT), with the original's parameter names.

The cognition feature z (B, 1, token_size) enters through one layer, ``net.z_embedder.linear``; its output
plus the timestep embedding is a single condition token prepended to the K noisy action tokens (no adaLN:
CogACT's DiT blocks are plain pre-norm transformer blocks with timm's fused-qkv attention). The model
predicts epsilon. Training: epsilon MSE on the 100-step ``squaredcos_cap_v2`` schedule. Inference: DDIM
(eta 0, no clipping of the predicted x0) on the original's respaced schedule, with classifier-free guidance
against the learned ``z_embedder.uncondition`` embedding (``eps = eps_u + s (eps_c - eps_u)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from daptq.models.cogact.vit import Attention, Mlp
from daptq.models.family_common import input_dtype


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (cos first, 256 frequencies) -> ``mlp`` (Linear, SiLU, Linear)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(input_dtype(self.mlp[0])))


class LabelEmbedder(nn.Module):
    """The condition projection (``linear``: the interface) and the unconditional embedding for guidance.

    The original sizes ``uncondition`` (1, 4096) whatever the LLM width; here it is (1, token_size), which is
    the same for every released model (Llama-2 7B: 4096) and lets smaller backbones use guidance.
    """

    def __init__(self, in_size: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_size, hidden_size)
        self.dropout_prob = dropout_prob
        self.uncondition = nn.Parameter(torch.empty(1, in_size)) if dropout_prob > 0 else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


class ActionEmbedder(nn.Module):
    def __init__(self, action_size: int, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(action_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class DiTBlock(nn.Module):
    """CogACT's DiTBlock: affine-free LayerNorms, timm Attention (fused qkv) and a tanh-GELU timm Mlp."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class DiT(nn.Module):
    """epsilon_theta(x_t (B, K, A), t (B,), z (B, 1, token_size)) -> (B, K, A)."""

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        class_dropout_prob: float,
        token_size: int,
        future_action_window_size: int,
        past_action_window_size: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.num_heads = num_heads
        self.history_embedder = ActionEmbedder(in_channels, hidden_size)  # in the checkpoint, unused
        self.x_embedder = ActionEmbedder(in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.z_embedder = LabelEmbedder(token_size, hidden_size, class_dropout_prob)
        # One position per action plus the condition token.
        n_pos = future_action_window_size + past_action_window_size + 2
        self.positional_embedding = nn.Parameter(hidden_size**-0.5 * torch.randn(n_pos, hidden_size))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The original's initialization (xavier linears, N(0, 0.02) embedders, zero final layer)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.x_embedder.linear, self.history_embedder.linear, self.z_embedder.linear):
            nn.init.normal_(lin.weight, std=0.02)
        if self.z_embedder.uncondition is not None:
            nn.init.normal_(self.z_embedder.uncondition, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t)[:, None, :] + self.z_embedder(z)
        h = torch.cat([c, self.x_embedder(x)], dim=1) + self.positional_embedding
        for block in self.blocks:
            h = block(h)
        return self.final_layer(h)[:, 1:]


class DDIMSchedule:
    """The original's GaussianDiffusion quantities (float64, cast to float32 where used) for training
    (``q_sample`` over all steps) and for its DDIM respacing ``"ddimN"`` (timesteps 0, s, 2s, ... with the
    integer stride s giving exactly N steps; N == 1 uses step 50, as the original)."""

    def __init__(self, diffusion_steps: int, num_ddim_steps: int) -> None:
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array(
            [
                min(1 - alpha_bar((i + 1) / diffusion_steps) / alpha_bar(i / diffusion_steps), 0.999)
                for i in range(diffusion_steps)
            ],
            dtype=np.float64,
        )
        self.num_timesteps = diffusion_steps
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.timesteps = ddim_timesteps(diffusion_steps, num_ddim_steps)
        spaced = self.alphas_cumprod[self.timesteps]
        self.spaced_alphas_cumprod = spaced
        self.spaced_alphas_cumprod_prev = np.append(1.0, spaced[:-1])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        shape = (-1, *[1] * (x0.ndim - 1))
        a = torch.from_numpy(np.sqrt(self.alphas_cumprod)).to(x0.device)[t].float().view(shape)
        b = torch.from_numpy(np.sqrt(1.0 - self.alphas_cumprod)).to(x0.device)[t].float().view(shape)
        return a * x0 + b * noise

    def ddim_steps(self) -> list[tuple[int, float, float]]:
        """(original timestep, alpha_bar, alpha_bar_prev) per step, from the noisiest to the last."""
        return [
            (
                int(self.timesteps[i]),
                float(self.spaced_alphas_cumprod[i]),
                float(self.spaced_alphas_cumprod_prev[i]),
            )
            for i in reversed(range(len(self.timesteps)))
        ]


def ddim_timesteps(num_timesteps: int, count: int) -> np.ndarray:
    if count == 1:
        return np.array([50])
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return np.arange(0, num_timesteps, stride)
    raise ValueError(f"cannot create exactly {count} DDIM steps from {num_timesteps} with an integer stride")


def _f32(x: float) -> torch.Tensor:
    """A schedule coefficient as the original uses it: float64 numpy cast to a float32 tensor."""
    return torch.tensor(x, dtype=torch.float64).float()


class ActionModel(nn.Module):
    """CogACT's ``ActionModel``: the DiT as ``net`` plus its diffusion processes (not modules)."""

    def __init__(
        self,
        token_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        class_dropout_prob: float,
        future_action_window_size: int,
        diffusion_steps: int,
        num_ddim_steps: int,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.net = DiT(
            in_channels,
            hidden_size,
            depth,
            num_heads,
            mlp_ratio,
            class_dropout_prob,
            token_size,
            future_action_window_size,
        )
        self.schedule = DDIMSchedule(diffusion_steps, num_ddim_steps)

    def loss(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Epsilon MSE at a random timestep (the original's ``ActionModel.loss``), optionally weighted per
        action dimension; noise and timesteps come from ``generator`` (on the CPU, then moved)."""
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        t = torch.randint(0, self.schedule.num_timesteps, (x.shape[0],), generator=generator).to(x.device)
        err = (self.net(self.schedule.q_sample(x, t, noise), t, z) - noise) ** 2
        if dim_weights is not None:
            w = torch.as_tensor(dim_weights, dtype=err.dtype, device=err.device)
            if w.shape != (x.shape[-1],):
                raise ValueError(f"dim_weights must have shape ({x.shape[-1]},), got {tuple(w.shape)}")
            err = err * w
        return err.mean()

    def sample(self, z: torch.Tensor, noise: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """DDIM (eta 0) from ``noise`` (B, K, A) given z (B, 1, D); differentiable (no ``no_grad`` inside)."""
        net = self.net
        use_cfg = cfg_scale > 1.0
        if use_cfg:
            if net.z_embedder.uncondition is None:
                raise ValueError(
                    "classifier-free guidance needs z_embedder.uncondition (class_dropout_prob > 0)"
                )
            uncond = net.z_embedder.uncondition[None].expand(z.shape[0], 1, -1).to(z.dtype)
            z_in = torch.cat([z, uncond], dim=0)
        x = noise
        for t, ab, ab_prev in self.schedule.ddim_steps():
            if use_cfg:
                tt = torch.full((2 * x.shape[0],), t, dtype=torch.long, device=x.device)
                eps_c, eps_u = net(torch.cat([x, x], dim=0), tt, z_in).chunk(2, dim=0)
                eps = eps_u + cfg_scale * (eps_c - eps_u)
            else:
                eps = net(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), z)
            x0 = _f32(math.sqrt(1.0 / ab)) * x - _f32(math.sqrt(1.0 / ab - 1)) * eps
            eps = (_f32(math.sqrt(1.0 / ab)) * x - x0) / _f32(math.sqrt(1.0 / ab - 1))
            ab_prev32 = _f32(ab_prev)  # the original takes these square roots in float32
            x = x0 * ab_prev32.sqrt() + (1 - ab_prev32).sqrt() * eps
        return x
