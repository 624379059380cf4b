"""pi0 / pi0.5 / SmolVLA as a ``VLAAdapter``: what quantization methods may know about them.

Model-input batches (``calibration_batches`` / ``LeRobotVLAAdapter.model_inputs`` build them): ``images`` (B,
C, 3, S, S) float in [-1, 1] (C cameras, missing ones -1 with ``image_masks`` False), ``image_masks`` (B, C)
bool, ``lang_tokens`` / ``lang_masks`` (B, L), ``state`` (B, max_state_dim) normalized and zero-padded, and
for the objective ``actions`` (B, K, action_dim) in the normalized space.

Roles and streams. The prefix stream (``stream="prefix"``) is the VLM: its SigLIP tower is ``vision`` (stack
"vision"), the projector/connector and the LM layers are ``backbone`` (stack "backbone"; SmolVLA's
``state_proj`` feeds the prefix and is ``backbone`` too). The expert stream (``stream="expert"``) is the
``action_head``: the expert's layers (stack "expert", the blocks DA-PTQ's "float last DiT blocks" keeps float)
and the state/action/time projections. The ``interface`` is where the VL representation enters the expert, the
keys and values of the prefix (kind "prefix_kv"):

- pi0 / pi0.5: every PaliGemma layer's ``k_proj`` / ``v_proj``: the expert attends to their outputs layer by
  layer (the prefix's own attention reads them too). ``v_proj``: a per-channel affine folds exactly.
  ``k_proj``: RoPE rotates channel i of each head with i + head_dim/2 after it, so only gains tied across
  each pair fold exactly (fold "tied_pairs").
- SmolVLA: the expert's cross-attention layers' ``k_proj`` / ``v_proj``, which map the VLM's cached (already
  rotated) keys and values; nothing rotates their outputs, so both fold exactly. (In the self-attention
  layers the expert reads the VLM's own projections, declared ``backbone``.)

Modules that hold checkpoint tensors but never run at inference (the VLM's last-layer attention output and
MLP, its final norm, the LM heads) are not declared: calibration never sees them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from daptq.models.adapter import ActionSpace, AttentionLayout, InterfaceModule, QuantizableModule, VLAAdapter
from daptq.models.family_common import require_inputs, stack_layouts, weight_modules
from daptq.models.lerobot_vla.checkpoint import Statistics
from daptq.models.lerobot_vla.config import LeRobotVLAConfig
from daptq.models.lerobot_vla.modeling import FlowMatchingVLA, pad_last
from daptq.quant.smoothing import SmoothingGroup

MODEL_INPUTS = ("images", "image_masks", "lang_tokens", "lang_masks", "state")
LIBERO_ACTION_SPACE = ActionSpace(
    names=("x", "y", "z", "roll", "pitch", "yaw", "gripper"),
    kinds=("translation", "translation", "translation", "rotation", "rotation", "rotation", "gripper"),
    control="delta-eef",
)


def action_space_for(config: LeRobotVLAConfig) -> ActionSpace:
    """7-D delta end-effector with rotation (LIBERO-trained checkpoints) unless the config names its action
    dimensions otherwise; any other width is a joint space (a name containing "gripper" is a gripper)."""
    names = config.action_feature_names
    if names is None and config.action_dim == 7:
        return LIBERO_ACTION_SPACE
    names = tuple(names) if names else tuple(f"joint_{i}" for i in range(config.action_dim))
    if len(names) != config.action_dim:
        raise ValueError(
            f"config: {len(names)} action_feature_names for {config.action_dim} action dimensions"
        )
    kinds = tuple("gripper" if "gripper" in n.lower() else "joint" for n in names)
    return ActionSpace(names, kinds, control="joint")  # type: ignore[arg-type]


def beta_time(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """The original's training times: Beta(1.5, 1) * 0.999 + 0.001, drawn by inverse CDF (u^(1/1.5)) so a
    generator fixes them."""
    u = torch.rand(n, generator=generator)
    return u.pow(1 / 1.5) * 0.999 + 0.001


def target_actions(
    batch: Mapping[str, torch.Tensor], config: LeRobotVLAConfig, name: str, like: torch.Tensor
) -> torch.Tensor:
    """The objective's ``batch["actions"]`` (B, K, action_dim), normalized, on ``like``'s device and dtype."""
    c = config
    if "actions" not in batch:
        raise ValueError(f"{name} objective needs batch['actions'] (B, K, {c.action_dim}) normalized")
    actions = batch["actions"].to(like.device, like.dtype)
    if actions.shape[1:] != (c.chunk_size, c.action_dim):
        raise ValueError(
            f"batch['actions'] has shape {tuple(actions.shape)}, expected (B, {c.chunk_size}, {c.action_dim})"
        )
    return actions


def weighted_mean(errors: torch.Tensor, dim_weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-dimension errors (..., action_dim), each dimension weighted by ``dim_weights``."""
    if dim_weights is not None:
        w = torch.as_tensor(dim_weights, dtype=errors.dtype, device=errors.device)
        if w.shape != errors.shape[-1:]:
            raise ValueError(f"dim_weights has shape {tuple(w.shape)}, expected ({errors.shape[-1]},)")
        errors = errors * w
    return errors.mean()


def chunk_actions(
    actions: Any,
    config: LeRobotVLAConfig,
    space: ActionSpace,
    statistics: Statistics | None,
    name: str,
    what: str,
) -> torch.Tensor:
    """Robot-unit chunks (B, K', action_dim) -> (B, K, action_dim), cut or padded with the last action to the
    chunk size, normalized with ``statistics`` if given; ``what`` and the model's ``name`` word a refusal."""
    c = config
    a = torch.as_tensor(np.asarray(actions, dtype=np.float32))
    if a.ndim != 3 or a.shape[-1] != c.action_dim:
        raise ValueError(
            f"{what} have shape {tuple(a.shape)}; {name} takes (B, K, {c.action_dim}) "
            f"({', '.join(space.names)})"
        )
    if a.shape[1] != c.chunk_size:
        a = (
            a[:, : c.chunk_size]
            if a.shape[1] > c.chunk_size
            else torch.cat([a, a[:, -1:].expand(-1, c.chunk_size - a.shape[1], -1)], dim=1)
        )
    if statistics is not None:
        a = statistics.normalize(a, "action", "ACTION")
    return a.contiguous()


def resize_with_pad(images: torch.Tensor, size: int, center: bool) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size): aspect ratio kept, bilinear, black padding (centered for
    pi0 as openpi, top-left for SmolVLA as lerobot's ``resize_with_pad``)."""
    h, w = images.shape[-2:]
    ratio = max(h / size, w / size)
    nh, nw = max(1, int(h / ratio)), max(1, int(w / ratio))
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False).clamp(0, 1)
    ph, pw = size - nh, size - nw
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2) if center else (pw, 0, ph, 0)
    return F.pad(out, pad, value=0.0)


class LeRobotVLAAdapter(VLAAdapter):
    """A pi0 / pi0.5 / SmolVLA network for quantization methods (see the module docstring)."""

    objective_kind = "flow_matching"
    capabilities = frozenset({"attention", "smoothing"})

    def __init__(
        self, model: FlowMatchingVLA, tokenizer: Any = None, statistics: Statistics | None = None
    ) -> None:
        self.model = model
        self.config: LeRobotVLAConfig = model.config
        self.tokenizer = tokenizer
        self.statistics = statistics
        self.action_space = action_space_for(self.config)
        c = self.config
        if c.type == "smolvla":
            self._prefix_names = {
                "vision": "vlm_with_expert.vlm.model.vision_model.",
                "projector": "vlm_with_expert.vlm.model.connector.",
                "lm": "vlm_with_expert.vlm.model.text_model.layers.",
                "expert": "vlm_with_expert.lm_expert.layers.",
            }
            self._prefix_inputs = ("state_proj",)
        else:
            self._prefix_names = {
                "vision": "paligemma_with_expert.paligemma.model.vision_tower.",
                "projector": "paligemma_with_expert.paligemma.model.multi_modal_projector.",
                "lm": "paligemma_with_expert.paligemma.model.language_model.layers.",
                "expert": "paligemma_with_expert.gemma_expert.model.layers.",
            }
            self._prefix_inputs = ()

    # ---- structure ---------------------------------------------------------------------------------------
    def _interface_names(self) -> list[str]:
        c, p = self.config, self._prefix_names
        if c.type == "smolvla":
            return [
                f"{p['expert']}{j}.self_attn.{w}_proj"
                for j in range(c.expert.layers)
                if c.is_cross_layer(j)
                for w in ("k", "v")
            ]
        return [f"{p['lm']}{i}.self_attn.{w}_proj" for i in range(c.text.layers) for w in ("k", "v")]

    def _where(self, name: str) -> tuple[str, int | None, str | None, str]:
        """(role, block, stack, stream) of a module by its qualified name."""
        p = self._prefix_names
        role = "interface" if name in set(self._interface_names()) else None
        for key, stack, base_role, stream in (
            ("vision", "vision", "vision", "prefix"),
            ("lm", "backbone", "backbone", "prefix"),
            ("expert", "expert", "action_head", "expert"),
        ):
            if name.startswith(p[key]):
                rest = name[len(p[key]) :].split(".")
                block = int(rest[2]) if key == "vision" and rest[:2] == ["encoder", "layers"] else None
                if key != "vision":
                    block = int(rest[0])
                return role or base_role, block, stack if block is not None else None, stream
        if name.startswith(p["projector"]) or name in self._prefix_inputs:
            return "backbone", None, None, "prefix"
        return role or "action_head", None, None, "expert"

    def quantizable_modules(self) -> list[QuantizableModule]:
        """Every Linear and Conv2d on the inference path with its role, block, stack and stream."""
        out = []
        for name, module, kind in weight_modules(self.model, skip=self.model.unused_module_names()):
            role, block, stack, stream = self._where(name)
            meta: dict[str, Any] = {"kind": kind}
            if ".mlp." in name:
                meta["part"] = "mlp"
            out.append(QuantizableModule(name, module, role, meta, block=block, stack=stack, stream=stream))  # type: ignore[arg-type]
        return out

    def interface_modules(self) -> list[InterfaceModule]:
        c = self.config
        out = []
        for name in self._interface_names():
            is_k = name.endswith("k_proj")
            if c.type == "smolvla":
                out.append(
                    InterfaceModule(
                        name,
                        self.module(name),
                        "prefix_kv",
                        "exact",
                        f"the expert's cross-attention {'keys' if is_k else 'values'} of the VLM's "
                        "cached prefix "
                        "(no rotary embedding follows)",
                    )
                )
            elif is_k:
                out.append(
                    InterfaceModule(
                        name,
                        self.module(name),
                        "prefix_kv",
                        "tied_pairs",
                        "prefix keys the expert attends to; RoPE follows, so gains must be tied per "
                        "rotary pair",
                        rope_head_dim=c.text.head_dim,
                    )
                )
            else:
                out.append(
                    InterfaceModule(
                        name, self.module(name), "prefix_kv", "exact", "prefix values the expert attends to"
                    )
                )
        return out

    def attention_layouts(self) -> list[AttentionLayout]:
        c, p = self.config, self._prefix_names
        vision = f"{p['vision']}encoder.layers."
        return [
            *stack_layouts(
                vision, c.vision.layers, c.vision.heads, "vision", "vision", stream="prefix", out="out_proj"
            ),
            *self.text_and_expert_layouts(),
        ]

    def text_and_expert_layouts(self) -> list[AttentionLayout]:
        """The VLM text layers (prefix stream) and the expert's (expert stream). The VLM's last layer is left
        out: its attention output never reaches the expert (the expert reads only its keys and values)."""
        c, p = self.config, self._prefix_names
        return [
            *stack_layouts(
                p["lm"],
                c.text.layers - 1,
                c.text.heads,
                "backbone",
                "backbone",
                kv_heads=c.text.kv_heads,
                stream="prefix",
            ),
            *stack_layouts(
                p["expert"],
                c.expert.layers,
                c.expert.heads,
                "action_head",
                "expert",
                kv_heads=c.expert.kv_heads,
                stream="expert",
            ),
        ]

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """SigLIP layers: layer_norm1 -> q/k/v, v_proj -> out_proj, layer_norm2 -> fc1. The Gemma / Llama
        stacks have RMSNorm sources (not a kind ``quant.smoothing`` folds) and grouped-query attention where
        v_proj -> o_proj is not a per-channel rescale, except a multi-head stack's v_proj -> o_proj."""
        c, p = self.config, self._prefix_names
        groups = []
        for i in range(c.vision.layers):
            b = f"{p['vision']}encoder.layers.{i}"
            groups += [
                SmoothingGroup(
                    f"{b}.layer_norm1",
                    (f"{b}.self_attn.q_proj", f"{b}.self_attn.k_proj", f"{b}.self_attn.v_proj"),
                    "layernorm",
                ),
                SmoothingGroup(f"{b}.self_attn.v_proj", (f"{b}.self_attn.out_proj",), "linear", offset=0),
                SmoothingGroup(f"{b}.layer_norm2", (f"{b}.mlp.fc1",), "layernorm"),
            ]
        return groups

    # ---- computation ---------------------------------------------------------------------------------------
    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        hint = "build batches with calibration_batches() or model_inputs()"
        require_inputs(batch, MODEL_INPUTS, self.config.type, hint)
        p = next(self.model.parameters())
        out = [batch[k].to(p.device) for k in MODEL_INPUTS]
        out[0] = out[0].to(p.dtype)
        out[4] = out[4].to(p.dtype)
        return out

    def objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The original's velocity MSE on the real action dimensions (one noise draw and Beta(1.5, 1) time per
        sample from ``generator``), each dimension weighted by ``dim_weights`` (mean 1 keeps the scale)."""
        c = self.config
        actions = target_actions(batch, c, c.type, next(self.model.parameters()))  # where _inputs puts them
        inputs = self._inputs(batch)
        b = actions.shape[0]
        noise = torch.randn((b, c.chunk_size, c.max_action_dim), generator=generator).to(actions)
        time = beta_time(b, generator).to(actions)
        losses = self.model.flow_loss(*inputs, pad_last(actions, c.max_action_dim), noise, time)
        return weighted_mean(losses[..., : c.action_dim], dim_weights)

    def sample(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The chunk (B, K, action_dim) in the normalized space: ``num_steps`` Euler steps from noise drawn on
        the CPU from ``generator`` (padded to max_action_dim as the original), differentiable."""
        c = self.config
        inputs = self._inputs(batch)
        b = inputs[0].shape[0]
        noise = torch.randn((b, c.chunk_size, c.max_action_dim), generator=generator).to(inputs[0])
        return self.model.sample_actions(*inputs, noise)[..., : c.action_dim]

    # ---- data ----------------------------------------------------------------------------------------------
    def n_cameras(self) -> int:
        c = self.config
        extra = len(c.camera_keys) - 1
        return 1 + (min(extra, c.empty_cameras) if c.type == "smolvla" else extra)

    def image_tensor(self, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) or (H, W, 3) images of the first camera -> (B, C, 3, S, S) in [-1, 1] and the
        (B, C) camera mask (cameras the config lists beyond the first are absent: -1 and masked)."""
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
        x = resize_with_pad(x, self.config.image_size, center=self.config.type != "smolvla") * 2 - 1
        b, n = x.shape[0], self.n_cameras()
        imgs = torch.full((b, n, *x.shape[1:]), -1.0)
        imgs[:, 0] = x
        masks = torch.zeros(b, n, dtype=torch.bool)
        masks[:, 0] = True
        return imgs, masks

    def normalized_state(self, state: Any) -> torch.Tensor:
        c = self.config
        s = torch.as_tensor(np.asarray(state, dtype=np.float32))
        if s.ndim == 1:
            s = s[None]
        if s.shape[-1] != c.state_dim:
            raise ValueError(
                f"state has {s.shape[-1]} values, the {c.type} checkpoint takes {c.state_dim} "
                "(observation.state)"
            )
        if self.statistics is not None:
            s = self.statistics.normalize(s, "observation.state", "STATE")
        return pad_last(s, c.max_state_dim)

    def prompts(self, instructions: Sequence[str], state: torch.Tensor) -> list[str]:
        """The original's prompt: pi0 and SmolVLA the task with a trailing newline; pi0.5 "Task: ..., State:
        <256-bin digits of the normalized (unpadded) state>;\\nAction: "."""
        if self.config.type != "pi05":
            return [t if t.endswith("\n") else t + "\n" for t in instructions]
        bins = np.linspace(-1, 1, 257)[:-1]
        out = []
        for t, s in zip(instructions, state[:, : self.config.state_dim].numpy(), strict=True):
            digits = np.digitize(s, bins) - 1
            clean = t.strip().replace("_", " ").replace("\n", " ")
            out.append(f"Task: {clean}, State: {' '.join(map(str, digits))};\nAction: ")
        return out

    def model_inputs(self, images: Any, instructions: Sequence[str], state: Any) -> dict[str, torch.Tensor]:
        """uint8 images, instruction strings and robot-unit states -> the model-input tensors."""
        if self.tokenizer is None:
            raise ValueError(
                f"this {self.config.type} adapter has no tokenizer: put the tokenizer files in "
                "PATH/tokenizer (or "
                "pass tokenizer=DIR) to encode instructions"
            )
        imgs, masks = self.image_tensor(images)
        st = self.normalized_state(state)
        if not (len(instructions) == imgs.shape[0] == st.shape[0]):
            raise ValueError(
                f"{imgs.shape[0]} images, {st.shape[0]} states, {len(instructions)} instructions"
            )
        c = self.config
        longest = c.type == "smolvla" and c.pad_language_to == "longest"
        enc = self.tokenizer(
            self.prompts(list(instructions), st),
            padding="longest" if longest else "max_length",
            max_length=c.tokenizer_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {
            "images": imgs,
            "image_masks": masks,
            "lang_tokens": enc["input_ids"].long(),
            "lang_masks": enc["attention_mask"].bool(),
            "state": st,
        }

    def calibration_batches(self, batches: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Dataset batches (``image`` uint8 (B, H, W, 3), ``state`` (B, state_dim) and optional ``actions``
        (B, K, action_dim) in robot units, normalized here with the checkpoint's statistics; ``instruction``)
        -> model-input batches."""
        for raw in batches:
            for key in ("image", "instruction", "state"):
                if key not in raw:
                    raise ValueError(f"calibration batch is missing {key!r} (has {sorted(raw)})")
            ins = [raw["instruction"]] if isinstance(raw["instruction"], str) else list(raw["instruction"])
            batch = self.model_inputs(raw["image"], ins, raw["state"])
            if "actions" in raw:
                batch["actions"] = self.normalized_actions(raw["actions"])
            yield batch

    def normalized_actions(self, actions: Any) -> torch.Tensor:
        """Robot-unit chunks (B, K', action_dim) -> normalized (B, K, action_dim) (``chunk_actions``)."""
        c = self.config
        return chunk_actions(actions, c, self.action_space, self.statistics, c.type, "calibration actions")
