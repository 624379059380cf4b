"""pi0 / pi0.5 and SmolVLA with lerobot's module tree and parameter names, on ``transformers`` classes.

Module tree (parameter names are these paths, under ``model.`` in lerobot's ``model.safetensors``):

- pi0 / pi0.5 (``PI0Pytorch``): ``paligemma_with_expert.paligemma`` is a
  ``PaliGemmaForConditionalGeneration`` (SigLIP without attention-pool head, linear projector, Gemma;
  ``lm_head`` tied to the embedding), ``paligemma_with_expert.gemma_expert`` a ``GemmaForCausalLM`` without
  its embedding (its ``lm_head`` is kept, unused); ``state_proj`` (pi0), ``action_in_proj``,
  ``action_out_proj``, the time MLP (``action_time_mlp_in/out`` in pi0, ``time_mlp_in/out`` in pi0.5, where
  the expert's RMSNorms are adaptive: ``dense`` Linear from the time embedding to scale, shift and a
  residual gate).
- SmolVLA (``VLAFlowMatching``): ``vlm_with_expert.vlm`` is a ``SmolVLMForConditionalGeneration`` with its
  text model cut to the first ``num_vlm_layers`` layers, ``vlm_with_expert.lm_expert`` a ``LlamaModel``
  without embedding whose cross-attention layers' ``k_proj``/``v_proj`` map the VLM's cached keys/values;
  ``state_proj`` (into the VLM), ``action_in_proj``, ``action_out_proj``, ``action_time_mlp_in/out``.

The computation is rebuilt from the papers' and lerobot's description, not copied: the prefix (images,
language, SmolVLA's state) runs once through the VLM and leaves each layer's keys and values; each of the
``num_steps`` Euler steps of the flow (t from 1 to 0, x <- x + dt v) runs the expert on the suffix (pi0's
state token and the noisy action tokens with the time embedding), attending layer by layer to that cache. The
prefix never attends to the suffix, so this is also the training forward (the objective reuses it with one
time per sample). Everything is differentiable (DA-PTQ's sensitivities and QVLA's Jacobians backpropagate
through the sampler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from daptq.models.lerobot_vla.config import LeRobotVLAConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (B, L, kv_heads, head_dim) keys (after RoPE where roped) and values


# ---- shared pieces
def sinusoidal_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """(B,) times -> (B, dim) sine-cosine features with periods log-spaced in [min_period, max_period]."""
    if dim % 2:
        raise ValueError(f"time embedding width {dim} must be even")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    x = t.to(torch.float64)[:, None] * (2 * math.pi / period)[None]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1).to(torch.float32)


def block_masks(pad: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """big_vision's prefix-LM blocks: token i attends to valid token j when cumsum(ar)[j] <= cumsum(ar)[i]."""
    c = torch.cumsum(ar.to(torch.int64), dim=1)
    return (c[:, None, :] <= c[:, :, None]) & pad[:, None, :] & pad[:, :, None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Eager attention, (B, Lq, H, D) x (B, Lk, KVH, D) -> (B, Lq, H*D); ``mask`` (B, Lq, Lk) True = attend.
    Grouped-query: each kv head serves H/KVH query heads. Softmax in float32, masked logits at the
    dtype's min."""
    b, lq, h, d = q.shape
    groups = h // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    work = torch.promote_types(q.dtype, torch.float32)  # float32 at least (bf16 weights), float64 kept
    logits = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    logits = logits.masked_fill(~mask[:, None], torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, h * d)


def rope_halves(x: torch.Tensor, positions: torch.Tensor, wavelength: float = 10_000.0) -> torch.Tensor:
    """SmolVLA's rotary embedding of (B, L, H, D) at integer ``positions`` (B, L): channel i rotates with
    channel i + D/2 (frequencies wavelength^(-2i/D)), computed in float32."""
    half = x.shape[-1] // 2
    freq = wavelength ** ((2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device))
    ang = positions.to(torch.float32)[..., None, None] / freq
    sin, cos = torch.sin(ang), torch.cos(ang)
    xf = x.float()
    a, b = xf[..., :half], xf[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim)


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension to ``size`` (lerobot's ``pad_vector``)."""
    if x.shape[-1] > size:
        raise ValueError(f"a vector of {x.shape[-1]} values does not fit max dim {size}")
    return F.pad(x, (0, size - x.shape[-1]))


class AdaRMSNorm(nn.Module):
    """pi0.5's adaptive RMSNorm (parameter ``dense``): from a condition c, scale s, shift b and gate g =
    dense(c); y = rms(x) * (1 + s) + b, and the block's residual adds g * f(y). Without a condition a plain
    Gemma RMSNorm (``weight``, y = rms(x) * (1 + w))."""

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.cond_dim = cond_dim
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).type_as(x), None
        if cond is None:
            raise ValueError("adaptive RMSNorm needs the time condition")
        scale, shift, gate = self.dense(cond)[:, None].chunk(3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def _norm(
    module: nn.Module, x: torch.Tensor, cond: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, AdaRMSNorm):
        return module(x, cond)
    return module(x), None


def _residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class FlowMatchingVLA(nn.Module):
    """What both families share: the prefix cache, the Euler sampler and the velocity-MSE objective."""

    config: LeRobotVLAConfig

    # subclasses: embed_prefix, prefix_cache, velocity
    def embed_prefix(self, images, image_masks, lang_tokens, lang_masks, state):  # pragma: no cover
        raise NotImplementedError

    def prefix_cache(
        self, embs: torch.Tensor, pad: torch.Tensor, ar: torch.Tensor
    ) -> list[KV]:  # pragma: no cover
        raise NotImplementedError

    def velocity(self, cache, pad, state, x_t, t):  # pragma: no cover
        raise NotImplementedError

    def _prefix(self, images, image_masks, lang_tokens, lang_masks, state):
        embs, pad, ar = self.embed_prefix(images, image_masks, lang_tokens, lang_masks, state)
        return self.prefix_cache(embs, pad, ar), pad

    def sample_actions(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        lang_tokens: torch.Tensor,
        lang_masks: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """Euler integration of the learned velocity from ``noise`` (B, K, max_action_dim) at t=1 to t=0."""
        cache, pad = self._prefix(images, image_masks, lang_tokens, lang_masks, state)
        return self.euler(cache, pad, state, noise, num_steps)

    def euler(
        self,
        cache: list[KV],
        pad: torch.Tensor,
        state: torch.Tensor | None,
        noise: torch.Tensor,
        num_steps: int | None,
    ) -> torch.Tensor:
        """``num_steps`` (default the config's) Euler steps of the velocity from ``noise`` at t=1 to t=0, on a
        computed prefix (``cache``, ``pad``)."""
        steps = int(num_steps or self.config.num_steps)
        dt = -1.0 / steps
        x = noise
        for i in range(steps):
            t = torch.full((x.shape[0],), 1.0 + i * dt, dtype=torch.float32, device=x.device)
            x = x + dt * self.velocity(cache, pad, state, x, t)
        return x

    def flow_loss(
        self, images, image_masks, lang_tokens, lang_masks, state, actions, noise, time
    ) -> torch.Tensor:
        """Per-element squared error (B, K, max_action_dim) of the velocity at x_t = t noise + (1-t) actions
        against u = noise - actions."""
        cache, pad = self._prefix(images, image_masks, lang_tokens, lang_masks, state)
        return self.velocity_errors(cache, pad, state, actions, noise, time)

    def velocity_errors(
        self,
        cache: list[KV],
        pad: torch.Tensor,
        state: torch.Tensor | None,
        actions: torch.Tensor,
        noise: torch.Tensor,
        time: torch.Tensor,
    ) -> torch.Tensor:
        """Squared error of the velocity at x_t = t noise + (1-t) actions against u = noise - actions, on a
        computed prefix."""
        tt = time[:, None, None]
        x_t = tt * noise + (1 - tt) * actions
        return (self.velocity(cache, pad, state, x_t, time) - (noise - actions)).pow(2)

    def image_batches(
        self, images: torch.Tensor, image_masks: torch.Tensor
    ) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        return [(images[:, c], image_masks[:, c]) for c in range(images.shape[1])]


# ---- pi0 / pi0.5
class PaliGemmaWithExpert(nn.Module):
    """``paligemma`` and ``gemma_expert``, by lerobot's names."""

    def __init__(self, config: LeRobotVLAConfig) -> None:
        super().__init__()
        from transformers import (
            GemmaConfig,
            GemmaForCausalLM,
            PaliGemmaConfig,
            PaliGemmaForConditionalGeneration,
        )

        t, v, e = config.text, config.vision, config.expert
        text = {
            "model_type": "gemma",
            "hidden_size": t.hidden,
            "intermediate_size": t.intermediate,
            "num_attention_heads": t.heads,
            "num_key_value_heads": t.kv_heads,
            "head_dim": t.head_dim,
            "num_hidden_layers": t.layers,
            "vocab_size": t.vocab,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": t.rms_norm_eps,
        }
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": v.hidden,
            "intermediate_size": v.intermediate,
            "num_attention_heads": v.heads,
            "num_hidden_layers": v.layers,
            "patch_size": v.patch,
            "image_size": v.image,
            "vision_use_head": False,
            "projection_dim": t.hidden,
        }
        pc = PaliGemmaConfig(
            text_config=text,
            vision_config=vision,
            vocab_size=t.vocab,
            image_token_index=t.vocab - 1,
            projection_dim=t.hidden,
            tie_word_embeddings=config.tie_word_embeddings,
        )
        pc.text_config.tie_word_embeddings = config.tie_word_embeddings
        pc._attn_implementation = "eager"
        self.paligemma = PaliGemmaForConditionalGeneration(pc)
        if config.tie_word_embeddings:  # explicit: transformers skips tying when initializers are skipped
            self.paligemma.lm_head.weight = self.paligemma.model.language_model.embed_tokens.weight
        ec = GemmaConfig(
            hidden_size=e.hidden,
            intermediate_size=e.intermediate,
            num_attention_heads=e.heads,
            num_key_value_heads=e.kv_heads,
            head_dim=e.head_dim,
            num_hidden_layers=e.layers,
            vocab_size=e.vocab,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=e.rms_norm_eps,
        )
        self.gemma_expert = GemmaForCausalLM(ec)
        self.gemma_expert.model.embed_tokens = None
        if config.type == "pi05":  # adaptive norms conditioned on the time embedding
            for layer in self.gemma_expert.model.layers:
                layer.input_layernorm = AdaRMSNorm(e.hidden, e.rms_norm_eps, e.hidden)
                layer.post_attention_layernorm = AdaRMSNorm(e.hidden, e.rms_norm_eps, e.hidden)
            self.gemma_expert.model.norm = AdaRMSNorm(e.hidden, e.rms_norm_eps, e.hidden)


class PI0(FlowMatchingVLA):
    """lerobot's ``PI0Pytorch`` / ``PI05Pytorch`` (see the module docstring)."""

    def __init__(self, config: LeRobotVLAConfig) -> None:
        super().__init__()
        if config.type not in ("pi0", "pi05"):
            raise ValueError(f"PI0 builds pi0 / pi05, got {config.type!r}")
        self.config = config
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        w = config.expert.hidden
        self.action_in_proj = nn.Linear(config.max_action_dim, w)
        self.action_out_proj = nn.Linear(w, config.max_action_dim)
        if config.type == "pi0":
            self.state_proj = nn.Linear(config.max_state_dim, w)
            self.action_time_mlp_in = nn.Linear(2 * w, w)
            self.action_time_mlp_out = nn.Linear(w, w)
        else:
            self.time_mlp_in = nn.Linear(w, w)
            self.time_mlp_out = nn.Linear(w, w)

    @property
    def vlm(self) -> nn.Module:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> nn.Module:
        return self.paligemma_with_expert.gemma_expert.model

    def embed_prefix(self, images, image_masks, lang_tokens, lang_masks, state=None):
        pg = self.paligemma_with_expert.paligemma.model
        embs, pads = [], []
        for img, m in self.image_batches(images, image_masks):
            e = pg.get_image_features(img.to(torch.float32)).pooler_output
            embs.append(e)
            pads.append(m[:, None].expand(e.shape[0], e.shape[1]))
        embs.append(self.vlm.embed_tokens(lang_tokens))
        pads.append(lang_masks.bool())
        embs_t = torch.cat(embs, dim=1)
        pad = torch.cat(pads, dim=1)
        return embs_t, pad, torch.zeros_like(pad)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor):
        return self.vlm.rotary_emb(x, positions)

    def prefix_cache(self, embs, pad, ar) -> list[KV]:
        """Each PaliGemma layer's (RoPE'd keys, values) over the prefix (the expert reads them)."""
        from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

        mask = block_masks(pad, ar)
        pos = torch.cumsum(pad.to(torch.int64), dim=1) - 1
        h = embs
        cos, sin = self._rope(h, pos)
        cache = []
        layers = self.vlm.layers
        for i, layer in enumerate(layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            k = split_heads(a.k_proj(x), a.head_dim).transpose(1, 2)
            v = split_heads(a.v_proj(x), a.head_dim)
            if (
                i == len(layers) - 1
            ):  # the last layer's queries, attention output and MLP never reach the expert
                cache.append((apply_rotary_pos_emb(k, k, cos, sin)[1].transpose(1, 2), v))
                break
            q = split_heads(a.q_proj(x), a.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.transpose(1, 2)
            cache.append((k, v))
            h = h + a.o_proj(attend(q.transpose(1, 2), k, v, mask, a.scaling))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return cache

    def embed_suffix(self, state, x_t, t):
        c = self.config
        w = c.expert.hidden
        time_emb = sinusoidal_embedding(t, w, c.min_period, c.max_period).to(x_t.dtype)
        actions = self.action_in_proj(x_t)
        b, k = actions.shape[:2]
        if c.type == "pi0":
            at = torch.cat([actions, time_emb[:, None].expand(b, k, w)], dim=-1)
            at = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))
            embs = torch.cat([self.state_proj(state.to(actions.dtype))[:, None], at], dim=1)
            ar = [1, 1] + [0] * (k - 1)
            cond = None
        else:
            embs = actions
            ar = [1] + [0] * (k - 1)
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
        ar_t = torch.tensor(ar, dtype=torch.bool, device=embs.device)[None].expand(b, -1)
        return embs, ar_t, cond

    def velocity(self, cache, pad, state, x_t, t):
        from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

        embs, ar, cond = self.embed_suffix(state, x_t, t)
        b, s = embs.shape[:2]
        spad = torch.ones(b, s, dtype=torch.bool, device=embs.device)
        mask = torch.cat([pad[:, None, :].expand(b, s, pad.shape[1]), block_masks(spad, ar)], dim=2)
        pos = pad.sum(-1, keepdim=True) + torch.cumsum(spad.to(torch.int64), dim=1) - 1
        h = embs
        cos, sin = self._rope(h, pos)
        for layer, (pk, pv) in zip(self.expert.layers, cache, strict=True):
            a = layer.self_attn
            x, gate = _norm(layer.input_layernorm, h, cond)
            q = split_heads(a.q_proj(x), a.head_dim).transpose(1, 2)
            k = split_heads(a.k_proj(x), a.head_dim).transpose(1, 2)
            v = split_heads(a.v_proj(x), a.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = attend(
                q.transpose(1, 2),
                torch.cat([pk, k.transpose(1, 2)], 1),
                torch.cat([pv, v], 1),
                mask,
                a.scaling,
            )
            h = _residual(h, a.o_proj(out), gate)
            x, gate = _norm(layer.post_attention_layernorm, h, cond)
            h = _residual(h, layer.mlp(x), gate)
        h, _ = _norm(self.expert.norm, h, cond)
        return self.action_out_proj(h[:, -self.config.chunk_size :].float())

    def unused_module_names(self) -> list[str]:
        """Modules holding checkpoint tensors that never run at inference (not offered to methods)."""
        last = f"paligemma_with_expert.paligemma.model.language_model.layers.{self.config.text.layers - 1}"
        return [
            f"{last}.self_attn.q_proj",
            f"{last}.self_attn.o_proj",
            f"{last}.mlp",
            f"{last}.post_attention_layernorm",
            "paligemma_with_expert.paligemma.model.language_model.norm",
            "paligemma_with_expert.paligemma.lm_head",
            "paligemma_with_expert.gemma_expert.lm_head",
        ]


# ---- SmolVLA
class SmolVLMWithExpert(nn.Module):
    """``vlm`` and ``lm_expert``, by lerobot's names."""

    def __init__(self, config: LeRobotVLAConfig) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel, SmolVLMConfig, SmolVLMForConditionalGeneration

        t, v, e = config.text, config.vision, config.expert
        text = {
            "model_type": "llama",
            "hidden_size": t.hidden,
            "intermediate_size": t.intermediate,
            "num_attention_heads": t.heads,
            "num_key_value_heads": t.kv_heads,
            "head_dim": t.head_dim,
            "num_hidden_layers": t.layers,
            "vocab_size": t.vocab,
            "rms_norm_eps": t.rms_norm_eps,
            "tie_word_embeddings": config.tie_word_embeddings,
        }
        vision = {
            "hidden_size": v.hidden,
            "intermediate_size": v.intermediate,
            "num_attention_heads": v.heads,
            "num_hidden_layers": v.layers,
            "patch_size": v.patch,
            "image_size": v.image,
        }
        vc = SmolVLMConfig(
            text_config=text,
            vision_config=vision,
            scale_factor=config.scale_factor,
            vocab_size=t.vocab,
            image_token_id=t.vocab - 1,
            tie_word_embeddings=config.tie_word_embeddings,
        )
        self.vlm = SmolVLMForConditionalGeneration(vc)
        if config.tie_word_embeddings:
            self.vlm.lm_head.weight = self.vlm.model.text_model.embed_tokens.weight
        ec = LlamaConfig(
            hidden_size=e.hidden,
            intermediate_size=e.intermediate,
            num_attention_heads=e.heads,
            num_key_value_heads=e.kv_heads,
            head_dim=e.head_dim,
            num_hidden_layers=e.layers,
            vocab_size=e.vocab,
            rms_norm_eps=e.rms_norm_eps,
        )
        self.lm_expert = LlamaModel(ec)
        self.lm_expert.embed_tokens = None
        kv_in = t.kv_heads * t.head_dim
        for i, layer in enumerate(self.lm_expert.layers):
            if config.is_cross_layer(i):
                layer.self_attn.k_proj = nn.Linear(kv_in, e.kv_heads * e.head_dim, bias=False)
                layer.self_attn.v_proj = nn.Linear(kv_in, e.kv_heads * e.head_dim, bias=False)


class SmolVLA(FlowMatchingVLA):
    """lerobot's ``VLAFlowMatching`` (see the module docstring)."""

    def __init__(self, config: LeRobotVLAConfig) -> None:
        super().__init__()
        if config.type != "smolvla":
            raise ValueError(f"SmolVLA builds smolvla, got {config.type!r}")
        if config.text.heads != config.expert.heads or config.text.kv_heads != config.expert.kv_heads:
            raise ValueError(
                "SmolVLA: the VLM and the expert share their head counts (one attention function)"
            )
        self.config = config
        self.vlm_with_expert = SmolVLMWithExpert(config)
        w = config.expert.hidden
        self.state_proj = nn.Linear(config.max_state_dim, config.text.hidden)
        self.action_in_proj = nn.Linear(config.max_action_dim, w)
        self.action_out_proj = nn.Linear(w, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * w, w)
        self.action_time_mlp_out = nn.Linear(w, w)

    @property
    def vlm(self) -> nn.Module:
        return self.vlm_with_expert.vlm.model.text_model

    @property
    def expert(self) -> nn.Module:
        return self.vlm_with_expert.lm_expert

    def embed_prefix(self, images, image_masks, lang_tokens, lang_masks, state):
        vm = self.vlm_with_expert.vlm.model
        embs, pads = [], []
        for img, m in self.image_batches(images, image_masks):
            e = vm.connector(vm.vision_model(pixel_values=img, patch_attention_mask=None).last_hidden_state)
            embs.append(e * math.sqrt(e.shape[-1]))
            pads.append(m[:, None].expand(e.shape[0], e.shape[1]))
        lang = self.vlm.embed_tokens(lang_tokens)
        embs.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(lang_masks.bool())
        embs.append(self.state_proj(state.to(lang.dtype))[:, None])
        pads.append(torch.ones(lang.shape[0], 1, dtype=torch.bool, device=lang.device))
        pad = torch.cat(pads, dim=1)
        ar = torch.zeros_like(pad)
        ar[:, -1] = True
        return torch.cat(embs, dim=1), pad, ar

    def prefix_cache(self, embs, pad, ar) -> list[KV]:
        mask = block_masks(pad, ar)
        pos = torch.cumsum(pad.to(torch.int64), dim=1) - 1
        h = embs
        cache = []
        layers = self.vlm.layers
        hd = self.config.text.head_dim
        for i, layer in enumerate(layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            k = rope_halves(split_heads(a.k_proj(x), hd), pos)
            v = split_heads(a.v_proj(x), hd)
            cache.append((k, v))
            if (
                i == len(layers) - 1
            ):  # the last layer's queries, attention output and MLP never reach the expert
                break
            q = rope_halves(split_heads(a.q_proj(x), hd), pos)
            h = h + a.o_proj(attend(q, k, v, mask, hd**-0.5))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return cache

    def embed_suffix(self, x_t, t):
        c = self.config
        w = c.expert.hidden
        actions = self.action_in_proj(x_t)
        b, k = actions.shape[:2]
        time_emb = sinusoidal_embedding(t, w, c.min_period, c.max_period).to(actions.dtype)
        at = torch.cat([actions, time_emb[:, None].expand(b, k, w)], dim=-1)
        return self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))

    def velocity(self, cache, pad, state, x_t, t):
        c = self.config
        hd = c.expert.head_dim
        h = self.embed_suffix(x_t, t)
        b, s = h.shape[:2]
        spad = torch.ones(b, s, dtype=torch.bool, device=h.device)
        causal = block_masks(spad, torch.ones_like(spad))
        prefix_mask = pad[:, None, :].expand(b, s, pad.shape[1])
        self_mask = torch.cat([prefix_mask, causal], dim=2)
        pos = pad.sum(-1, keepdim=True) + torch.cumsum(spad.to(torch.int64), dim=1) - 1
        cross_pos = pos - pos.min(dim=1, keepdim=True).values
        for i in range(c.text.layers):
            j = c.expert_layer_of(i)
            if j is None:
                continue
            layer = self.expert.layers[j]
            a = layer.self_attn
            pk, pv = cache[i]
            x = layer.input_layernorm(h)
            if c.is_cross_layer(j):
                q = rope_halves(split_heads(a.q_proj(x), hd), cross_pos)
                k = split_heads(a.k_proj(pk.reshape(b, pk.shape[1], -1)), hd)
                v = split_heads(a.v_proj(pv.reshape(b, pv.shape[1], -1)), hd)
                out = attend(q, k, v, prefix_mask, hd**-0.5)
            else:
                q = rope_halves(split_heads(a.q_proj(x), hd), pos)
                k = rope_halves(split_heads(a.k_proj(x), hd), pos)
                v = split_heads(a.v_proj(x), hd)
                out = attend(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1), self_mask, hd**-0.5)
            h = h + a.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.expert.norm(h)
        return self.action_out_proj(h[:, -c.chunk_size :].float())

    def unused_module_names(self) -> list[str]:
        n = self.config.text.layers
        last = f"vlm_with_expert.vlm.model.text_model.layers.{n - 1}"
        dead_kv = (
            []
            if self.config.expert_layer_of(n - 1) is not None
            else [f"{last}.self_attn.k_proj", f"{last}.self_attn.v_proj", f"{last}.input_layernorm"]
        )
        return [
            *dead_kv,
            f"{last}.self_attn.q_proj",
            f"{last}.self_attn.o_proj",
            f"{last}.mlp",
            f"{last}.post_attention_layernorm",
            "vlm_with_expert.vlm.model.text_model.norm",
            "vlm_with_expert.vlm.lm_head",
        ]


def build_model(config: LeRobotVLAConfig) -> FlowMatchingVLA:
    """The family's network for ``config`` (random weights)."""
    return (SmolVLA if config.type == "smolvla" else PI0)(config)
