"""GR00T N1.x with the checkpoint's names (N1.5: ``backbone.eagle_model.*``; N1: ``backbone.model.*``).

    image -> SigLIP (transformers SiglipVisionModel, ``vision_model.vision_model.*``; Conv2d patch embedding)
      -> N1.5: mlp1 (one Linear) per patch token; N1: pixel shuffle 0.5 -> mlp1 (LayerNorm, Linear, GELU,
      Linear)
      -> image tokens scattered into the prompt's IMG_CONTEXT slots
      -> LLM (transformers Qwen3 / Llama under ``language_model``, truncated to ``select_layer`` layers)
      -> final-norm hidden states = backbone tokens (B, T, 2048)
    action_head: vlln (LayerNorm) -> vl_self_attention (self-attention blocks) over the backbone tokens;
      state -> state_encoder (CategorySpecificMLP), noisy actions + tau -> action_encoder (3 category-specific
      linears), + position_embedding; [state, future_tokens, actions] -> DiT (AdaLayerNorm blocks, even ones
      cross-attend to the backbone tokens) -> action_decoder (CategorySpecificMLP) -> velocity

The DiT and VL self-attention blocks are diffusers' ``BasicTransformerBlock`` / ``Attention`` /
``FeedForward`` in the original; diffusers is not a dependency here, so they are written small with its
parameter names (``attn1.to_q``, ``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``, ``norm1.linear``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from daptq.models.family_common import input_dtype
from daptq.models.gr00t.config import Gr00tConfig
from daptq.quant.category import CategorySpecificLinear


# ---- the Eagle backbone ----------------------------------------------------------------------------------
def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Eagle's pixel shuffle (ps_version v2): (N, W, H, C) -> (N, W*s, H*s, C/s^2)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class EagleModel(nn.Module):
    """The parts of Eagle GR00T runs: ``vision_model``, ``mlp1``, ``language_model`` (no ``lm_head``)."""

    def __init__(self, c: Gr00tConfig) -> None:
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        vcfg = SiglipVisionConfig(
            hidden_size=c.vision_hidden,
            intermediate_size=c.vision_intermediate,
            num_hidden_layers=c.vision_layers,
            num_attention_heads=c.vision_heads,
            image_size=c.image_size,
            patch_size=c.patch_size,
            vision_use_head=False,
        )
        vcfg._attn_implementation = "sdpa"
        self.vision_model = _Holder(vision_model=SiglipVisionModel(vcfg))  # keys vision_model.vision_model.*
        d_in = c.connector_in_dim
        if c.mlp_connector_layers == 2:  # N1 (Eagle 2): keys mlp1.0 (norm), mlp1.1, mlp1.3
            self.mlp1 = nn.Sequential(
                nn.LayerNorm(d_in),
                nn.Linear(d_in, c.hidden_size),
                nn.GELU(),
                nn.Linear(c.hidden_size, c.hidden_size),
            )
        else:  # N1.5 (Eagle 2.5, "1mlp"): one Linear, key mlp1.0
            self.mlp1 = nn.Sequential(nn.Linear(d_in, c.hidden_size))
        self.language_model = _llm(c)
        self.downsample_ratio = c.downsample_ratio
        self.use_pixel_shuffle = c.use_pixel_shuffle

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, tokens_per_image, hidden)."""
        x = self.vision_model.vision_model(pixel_values=pixel_values).last_hidden_state
        if self.use_pixel_shuffle:
            side = int(math.isqrt(x.shape[1]))
            x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.downsample_ratio)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.mlp1(x)


class _Holder(nn.Module):
    """A module whose only children are the given ones (the original's nesting, for its key names)."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class _CausalLMBody(nn.Module):
    """``language_model`` with only ``model`` (GR00T replaces ``lm_head`` by Identity: no tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _llm(c: Gr00tConfig) -> nn.Module:
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.select_layer,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        pad_token_id=c.pad_token_id,
        use_cache=False,
        tie_word_embeddings=False,
    )
    if c.llm_type == "qwen3":
        from transformers import Qwen3Config, Qwen3Model

        cfg, cls = Qwen3Config(**common), Qwen3Model
    else:
        from transformers import LlamaConfig, LlamaModel

        cfg, cls = LlamaConfig(**common), LlamaModel
    cfg._attn_implementation = "sdpa"
    return _CausalLMBody(cls(cfg))


class EagleBackbone(nn.Module):
    """GR00T's backbone: the Eagle model (attribute ``eagle_model`` in N1.5, ``model`` in N1) and its output
    projection (``eagle_linear`` / ``linear``; Identity, without tensors, unless ``project_to_dim``)."""

    def __init__(self, c: Gr00tConfig) -> None:
        super().__init__()
        n15 = c.model_type == "gr00t_n1_5"
        self.eagle_attr, self.linear_attr = ("eagle_model", "eagle_linear") if n15 else ("model", "linear")
        setattr(self, self.eagle_attr, EagleModel(c))
        proj = nn.Linear(c.hidden_size, c.project_to_dim) if c.project_to_dim else nn.Identity()
        setattr(self, self.linear_attr, proj)
        self.img_context_token_id = c.img_context_token_id

    @property
    def eagle(self) -> EagleModel:
        return getattr(self, self.eagle_attr)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """pixel_values (B, V, 3, S, S), input_ids (B, L) with V * tokens_per_image IMG_CONTEXT ids per row
        -> backbone tokens (B, L, D)."""
        e = self.eagle
        B = pixel_values.shape[0]
        vit = e.image_tokens(pixel_values.flatten(0, 1))
        llm = e.language_model.model
        embeds = llm.get_input_embeddings()(input_ids).to(vit.dtype)
        selected = input_ids == self.img_context_token_id
        want = vit.shape[0] // B * vit.shape[1]
        if not bool((selected.sum(dim=1) == want).all()):
            raise ValueError(
                f"each prompt needs {want} image-context tokens (id {self.img_context_token_id}), got "
                f"{selected.sum(dim=1).tolist()}"
            )
        embeds = embeds.masked_scatter(selected[..., None], vit.reshape(-1, vit.shape[-1]).to(embeds.dtype))
        hidden = llm(
            inputs_embeds=embeds, attention_mask=attention_mask.long(), use_cache=False
        ).last_hidden_state
        return getattr(self, self.linear_attr)(hidden)


# ---- diffusers-named blocks ------------------------------------------------------------------------------
class Attention(nn.Module):
    """diffusers ``Attention`` (AttnProcessor2_0): to_q / to_k / to_v (bias), to_out.0; SDPA, no mask."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        B = x.shape[0]
        q, k, v = (
            t.reshape(B, t.shape[1], self.heads, -1).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, x.shape[1], -1)
        return self.to_out[1](self.to_out[0](out))


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with "gelu-approximate": net.0.proj, dropout, net.2 (, final dropout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProj(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim), nn.Dropout(0.0)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.net:
            x = m(x)
        return x


class AdaLayerNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, 1e-5, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class BasicTransformerBlock(nn.Module):
    """GR00T's block: (Ada)LayerNorm -> attention (self or cross) -> residual; LayerNorm -> FF -> residual."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, ada: bool, cross_attention_dim: int | None = None
    ):
        super().__init__()
        self.ada = ada
        self.norm1 = AdaLayerNorm(dim) if ada else nn.LayerNorm(dim, 1e-5)
        self.attn1 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim, 1e-5, elementwise_affine=not ada)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, temb: torch.Tensor | None = None):
        h = self.norm1(x, temb) if self.ada else self.norm1(x)
        x = x + self.attn1(h, context)
        return x + self.ff(self.norm3(x))


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    emb = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = input_dtype(self.timestep_embedder.linear_1)
        return self.timestep_embedder(timestep_embedding(t).to(dtype))


class DiT(nn.Module):
    """GR00T's DiT: timestep encoder, AdaLayerNorm blocks (even blocks cross-attend to the backbone tokens
    when interleaving), output modulation ``proj_out_1`` and projection ``proj_out_2``."""

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        output_dim: int,
        num_layers: int,
        interleave_self_attention: bool = False,
        cross_attention_dim: int | None = None,
    ) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.interleave = interleave_self_attention
        self.timestep_encoder = TimestepEncoder(inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                num_attention_heads,
                attention_head_dim,
                True,
                None if (interleave_self_attention and i % 2 == 1) else cross_attention_dim,
            )
            for i in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(inner, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(inner, 2 * inner)
        self.proj_out_2 = nn.Linear(inner, output_dim)

    def cross_blocks(self) -> list[int]:
        return [i for i in range(len(self.transformer_blocks)) if not (self.interleave and i % 2 == 1)]

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = self.timestep_encoder(timestep)
        cross = set(self.cross_blocks())
        for i, block in enumerate(self.transformer_blocks):
            hidden = block(hidden, context if i in cross else None, temb)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)
        return self.proj_out_2(self.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None])


class SelfAttentionTransformer(nn.Module):
    def __init__(self, num_attention_heads: int, attention_head_dim: int, num_layers: int) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, False)
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x)
        return x


# ---- embodiment-specific encoders ------------------------------------------------------------------------
class CategorySpecificMLP(nn.Module):
    def __init__(self, num_categories: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.num_categories = num_categories
        self.layer1 = CategorySpecificLinear(num_categories, input_dim, hidden_dim)
        self.layer2 = CategorySpecificLinear(num_categories, hidden_dim, output_dim)

    def forward(self, x: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x, cat_ids)), cat_ids)


def sinusoidal_encoding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """GR00T's ``SinusoidalPositionalEncoding``: (B, T) -> (B, T, dim) as [sin, cos]."""
    half = dim // 2
    exponent = -torch.arange(half, dtype=torch.float32, device=timesteps.device) * (math.log(10000.0) / half)
    freqs = timesteps.float().unsqueeze(-1) * exponent.exp()
    return torch.cat([torch.sin(freqs), torch.cos(freqs)], dim=-1)


class MultiEmbodimentActionEncoder(nn.Module):
    def __init__(self, action_dim: int, hidden_size: int, num_embodiments: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.W1 = CategorySpecificLinear(num_embodiments, action_dim, hidden_size)
        self.W2 = CategorySpecificLinear(num_embodiments, 2 * hidden_size, hidden_size)
        self.W3 = CategorySpecificLinear(num_embodiments, hidden_size, hidden_size)

    def forward(self, actions: torch.Tensor, timesteps: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        B, T, _ = actions.shape
        a = self.W1(actions, cat_ids)
        tau = sinusoidal_encoding(timesteps[:, None].expand(B, T), self.hidden_size).to(a.dtype)
        x = F.silu(self.W2(torch.cat([a, tau], dim=-1), cat_ids))
        return self.W3(x, cat_ids)


class FlowmatchingActionHead(nn.Module):
    def __init__(self, c: Gr00tConfig) -> None:
        super().__init__()
        self.config = c
        self.model = DiT(**c.dit)
        self.state_encoder = CategorySpecificMLP(
            c.max_num_embodiments, c.max_state_dim, c.ah_hidden_size, c.input_embedding_dim
        )
        self.action_encoder = MultiEmbodimentActionEncoder(
            c.action_dim, c.input_embedding_dim, c.max_num_embodiments
        )
        self.action_decoder = CategorySpecificMLP(
            c.max_num_embodiments, c.ah_hidden_size, c.ah_hidden_size, c.action_dim
        )
        self.future_tokens = nn.Embedding(c.num_target_vision_tokens, c.input_embedding_dim)
        self.vlln = nn.LayerNorm(c.backbone_embedding_dim) if c.use_vlln else nn.Identity()
        self.vl_self_attention = (
            SelfAttentionTransformer(**c.vl_self_attention) if c.use_vlln else nn.Identity()
        )
        self.position_embedding = (
            nn.Embedding(c.max_seq_len, c.input_embedding_dim) if c.add_pos_embed else None
        )

    def process_backbone(self, features: torch.Tensor) -> torch.Tensor:
        return self.vl_self_attention(self.vlln(features))

    def velocity(
        self,
        vl: torch.Tensor,
        state: torch.Tensor,
        actions: torch.Tensor,
        t_disc: torch.Tensor,
        embodiment_id: torch.Tensor,
    ) -> torch.Tensor:
        """One DiT evaluation: the velocity (B, H, action_dim) at the noisy ``actions`` and time buckets."""
        state_features = self.state_encoder(state, embodiment_id)
        action_features = self.action_encoder(actions, t_disc, embodiment_id)
        if self.position_embedding is not None:
            pos = torch.arange(action_features.shape[1], device=actions.device)
            action_features = action_features + self.position_embedding(pos)[None]
        future = self.future_tokens.weight[None].expand(vl.shape[0], -1, -1)
        sa = torch.cat((state_features, future, action_features), dim=1)
        out = self.model(sa, vl, t_disc)
        return self.action_decoder(out, embodiment_id)[:, -actions.shape[1] :]


class Gr00tN1(nn.Module):
    """``backbone`` + ``action_head`` (the two groups of GR00T's checkpoint)."""

    def __init__(self, config: Gr00tConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = EagleBackbone(config)
        self.action_head = FlowmatchingActionHead(config)

    def reset_rotary(self) -> None:
        """Rebuild the non-persistent buffers (LLM rotary, SigLIP position ids) after a meta-device build."""
        llm = self.backbone.eagle.language_model.model
        llm.rotary_emb = type(llm.rotary_emb)(llm.config)
        emb = self.backbone.eagle.vision_model.vision_model.embeddings
        n = emb.position_embedding.num_embeddings
        emb.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
