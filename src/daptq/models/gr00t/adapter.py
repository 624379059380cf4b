"""GR00T N1.x as a ``VLAAdapter``.

Model-input batches: ``pixel_values`` (B, V, 3, S, S), ``input_ids`` / ``attention_mask`` (B, L), ``state``
(B, 1, max_state_dim) normalized and zero-padded, ``embodiment_id`` (B,), and for the objective ``actions``
(B, H, D) normalized (D: the embodiment's action dimensions).

Roles: SigLIP is ``vision`` (stack "vision"); mlp1 and the LLM layers are ``backbone``; in the action head,
the key and value projections of the DiT blocks that cross-attend to the backbone tokens are the ``interface``
(kind "tokens": the vision-language representation enters the denoiser only there; no rotary embedding
follows, so an output affine folds into W, b exactly); every other action-head layer is ``action_head``,
including the embodiment-specific ``CategorySpecificLinear`` encoders/decoder (meta kind "category_linear",
quantized through their registered type). DiT blocks form the stack "dit" (DA-PTQ's last blocks kept float);
the VL self-attention blocks before the DiT declare no stack. GR00T has no tied weights (its LLM head is
dropped).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from daptq.models.adapter import AttentionLayout, InterfaceModule, QuantizableModule, VLAAdapter
from daptq.models.family_common import qkv_layout, require_inputs, stack_layouts, weight_modules
from daptq.models.gr00t.model import Gr00tN1
from daptq.models.gr00t.processing import Embodiment, image_tensors, tokenize
from daptq.quant.category import CategorySpecificLinear
from daptq.quant.smoothing import SmoothingGroup

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "state", "embodiment_id")
DIT = "action_head.model.transformer_blocks."
VLSA = "action_head.vl_self_attention.transformer_blocks."


class Gr00tAdapter(VLAAdapter):
    objective_kind = "flow_matching"
    capabilities = frozenset({"attention", "smoothing"})

    def __init__(self, model: Gr00tN1, embodiment: Embodiment, tokenizer: Any = None) -> None:
        self.model = model
        self.config = model.config
        embodiment.check(self.config)
        self.embodiment = embodiment
        self.tokenizer = tokenizer
        self.action_space = embodiment.action_space()
        e = model.backbone.eagle_attr
        self.vision = f"backbone.{e}.vision_model.vision_model."
        self.llm = f"backbone.{e}.language_model.model.layers."

    # ---- structure ---------------------------------------------------------------------------------------
    def _cross(self) -> set[int]:
        return set(self.model.action_head.model.cross_blocks())

    def _where(self, name: str) -> tuple[str, int | None, str | None]:
        if name.startswith(self.vision):
            rest = name[len(self.vision) :].split(".")
            return (
                "vision",
                (int(rest[2]) if rest[0] == "encoder" else None),
                ("vision" if rest[0] == "encoder" else None),
            )
        if name.startswith(self.llm):
            return "backbone", int(name[len(self.llm) :].split(".")[0]), "backbone"
        if name.startswith("backbone."):
            return "backbone", None, None
        if name.startswith(DIT):
            i = int(name[len(DIT) :].split(".")[0])
            iface = i in self._cross() and name.endswith((".attn1.to_k", ".attn1.to_v"))
            return ("interface" if iface else "action_head"), i, "dit"
        if name.startswith("action_head."):
            return "action_head", None, None
        return "other", None, None

    def quantizable_modules(self) -> list[QuantizableModule]:
        out = []
        for name, module, kind in weight_modules(
            self.model, extra={CategorySpecificLinear: "category_linear"}
        ):
            role, block, stack = self._where(name)
            out.append(QuantizableModule(name, module, role, {"kind": kind}, block=block, stack=stack))
        return out

    def interface_modules(self) -> list[InterfaceModule]:
        out = []
        for i in sorted(self._cross()):
            for proj in ("to_k", "to_v"):
                name = f"{DIT}{i}.attn1.{proj}"
                out.append(
                    InterfaceModule(
                        name,
                        self.module(name),
                        "tokens",
                        "exact",
                        "DiT cross-attention over the backbone tokens (after vlln and the VL self-attention);"
                        " no rotary embedding follows, so a per-channel affine folds into W, b exactly",
                    )
                )
        return out

    def attention_layouts(self) -> list[AttentionLayout]:
        c = self.config
        out = stack_layouts(
            f"{self.vision}encoder.layers.",
            c.vision_layers,
            c.vision_heads,
            "vision",
            "vision",
            out="out_proj",
        )
        out += stack_layouts(
            self.llm,
            c.select_layer,
            c.num_attention_heads,
            "backbone",
            "backbone",
            kv_heads=c.num_key_value_heads,
        )
        diffusers = {"out": "to_out.0", "names": ("to_q", "to_k", "to_v")}
        vlsa = c.vl_self_attention
        out += [
            qkv_layout(f"{VLSA}{i}.attn1", vlsa["num_attention_heads"], "action_head", **diffusers)
            for i in range(vlsa["num_layers"])
        ]
        out += [
            qkv_layout(
                f"{DIT}{i}.attn1",
                c.dit["num_attention_heads"],
                "action_head",
                block=i,
                stack="dit",
                **diffusers,
            )
            for i in range(c.dit["num_layers"])
        ]
        return out

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """SigLIP layer norms into q/k/v and fc1, v_proj -> out_proj; the VL self-attention's affine layer
        norms into its q/k/v and FF (the DiT's AdaLayerNorms have no affine to fold into)."""
        c = self.config
        groups = []
        for i in range(c.vision_layers):
            p = f"{self.vision}encoder.layers.{i}"
            a = f"{p}.self_attn"
            groups += [
                SmoothingGroup(
                    f"{p}.layer_norm1", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"), "layernorm"
                ),
                SmoothingGroup(f"{a}.v_proj", (f"{a}.out_proj",), "linear", offset=0),
                SmoothingGroup(f"{p}.layer_norm2", (f"{p}.mlp.fc1",), "layernorm"),
            ]
        for i in range(c.vl_self_attention["num_layers"]):
            p = f"{VLSA}{i}"
            groups += [
                SmoothingGroup(
                    f"{p}.norm1", (f"{p}.attn1.to_q", f"{p}.attn1.to_k", f"{p}.attn1.to_v"), "layernorm"
                ),
                SmoothingGroup(f"{p}.norm3", (f"{p}.ff.net.0.proj",), "layernorm"),
            ]
        return groups

    # ---- computation ---------------------------------------------------------------------------------------
    def _prepare(self, batch: Mapping[str, torch.Tensor]):
        require_inputs(batch, MODEL_INPUTS, "GR00T", "build it with calibration_batches() or model_inputs()")
        p = next(self.model.parameters())
        pix, ids, mask, state, emb = (batch[k].to(p.device) for k in MODEL_INPUTS)
        features = self.model.backbone(pix.to(p.dtype), ids, mask)
        vl = self.model.action_head.process_backbone(features)
        return vl, state.to(p.dtype), emb.long()

    def objective(self, batch, dim_weights=None, generator=None) -> torch.Tensor:
        """GR00T's flow-matching loss: t = (s - u) / s with u ~ Beta(alpha, 1) (inverse CDF of a uniform
        from ``generator``), x_t = (1 - t) noise + t actions, MSE of the predicted velocity against
        actions - noise over the embodiment's dimensions (weighted by ``dim_weights``)."""
        if "actions" not in batch:
            raise ValueError("GR00T objective needs batch['actions'] (B, H, D) in the normalized space")
        c = self.config
        vl, state, emb = self._prepare(batch)
        actions = batch["actions"].to(vl.device, vl.dtype)
        B, D = actions.shape[0], self.action_space.dim
        if actions.shape[1:] != (c.action_horizon, D):
            raise ValueError(
                f"batch['actions'] has shape {tuple(actions.shape)}, expected (B, {c.action_horizon}, {D})"
            )
        full = torch.zeros(B, c.action_horizon, c.action_dim, dtype=vl.dtype, device=vl.device)
        full[..., :D] = actions
        noise = torch.randn(full.shape, generator=generator).to(vl.device, vl.dtype)
        u = torch.rand(B, generator=generator) ** (1.0 / c.noise_beta_alpha)
        t = ((c.noise_s - u) / c.noise_s).to(vl.device, vl.dtype)[:, None, None]
        noisy = (1 - t) * noise + t * full
        t_disc = (t[:, 0, 0] * c.num_timestep_buckets).long()
        pred = self.model.action_head.velocity(vl, state, noisy, t_disc, emb)
        err = (pred - (full - noise))[..., :D].pow(2)
        if dim_weights is not None:
            err = err * dim_weights.to(err.device, err.dtype)
        return err.mean()

    def sample(self, batch, generator=None) -> torch.Tensor:
        """GR00T's ``get_action``: Euler over ``num_inference_timesteps`` steps from noise drawn on the CPU
        from ``generator``; the embodiment's dimensions of the chunk (B, H, D), differentiable."""
        c = self.config
        vl, state, emb = self._prepare(batch)
        B = vl.shape[0]
        x = torch.randn((B, c.action_horizon, c.action_dim), generator=generator).to(vl.device, vl.dtype)
        n = c.num_inference_timesteps
        for step in range(n):
            t_disc = torch.full(
                (B,), int(step / n * c.num_timestep_buckets), device=vl.device, dtype=torch.long
            )
            x = x + self.model.action_head.velocity(vl, state, x, t_disc, emb) / n
        return x[..., : self.action_space.dim]

    # ---- data ----------------------------------------------------------------------------------------------
    def model_inputs(
        self, views: Sequence[Any], instructions: Sequence[str], state: Any
    ) -> dict[str, torch.Tensor]:
        """One uint8 (B, H, W, 3) array per camera view, instructions, robot-unit state (B, d_state)."""
        c, e = self.config, self.embodiment
        if self.tokenizer is None:
            raise ValueError("this GR00T adapter has no tokenizer (gr00t:DIR?tokenizer=EAGLE_TOKENIZER_DIR)")
        if len(views) != c.num_views:
            raise ValueError(f"this GR00T model reads {c.num_views} camera views, got {len(views)}")
        pix = torch.stack([image_tensors(v, c) for v in views], dim=1)
        B = pix.shape[0]
        if len(instructions) != B:
            raise ValueError(f"{B} images but {len(instructions)} instructions")
        ids, mask = tokenize(self.tokenizer, list(instructions), c)
        s = np.asarray(state, dtype=np.float32).reshape(B, -1)
        if s.shape[1] != e.state.dim:
            raise ValueError(
                f"state has {s.shape[1]} values, embodiment {e.tag!r} has {e.state.dim} "
                f"({list(e.state.keys)})"
            )
        padded = np.zeros((B, 1, c.max_state_dim), np.float32)
        padded[:, 0, : e.state.dim] = e.state.normalize(s)
        return {
            "pixel_values": pix,
            "input_ids": ids,
            "attention_mask": mask,
            "state": torch.from_numpy(padded),
            "embodiment_id": torch.full((B,), e.index, dtype=torch.long),
        }

    def calibration_batches(self, batches: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Dataset batches (``image`` uint8 (B, H, W, 3) (and ``image_1``... for more views), ``instruction``,
        ``state`` (B, d_state) and optional ``actions`` (B, H, D) in robot units) -> model inputs."""
        keys = ("image", *(f"image_{i}" for i in range(1, self.config.num_views)))
        for raw in batches:
            for k in (*keys, "instruction", "state"):
                if k not in raw:
                    raise ValueError(f"calibration batch is missing {k!r} (has {sorted(raw)})")
            instr = raw["instruction"]
            batch = self.model_inputs(
                [raw[k] for k in keys], [instr] if isinstance(instr, str) else list(instr), raw["state"]
            )
            if "actions" in raw:
                a = np.asarray(raw["actions"], dtype=np.float32)
                if a.ndim != 3 or a.shape[-1] != self.action_space.dim:
                    raise ValueError(
                        f"calibration actions have shape {a.shape}; embodiment {self.embodiment.tag!r} "
                        f"takes (B, H, {self.action_space.dim})"
                    )
                batch["actions"] = torch.from_numpy(self.embodiment.action.normalize(a))
            yield batch
