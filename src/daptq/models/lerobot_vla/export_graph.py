"""The graphs of a pi0 / pi0.5 network that ``daptq.deploy.flow_export`` writes as ONNX (family side).

The split follows the computation (see ``modeling``): the prefix (images, language) runs once per call and
leaves every PaliGemma layer's RoPE'd keys and values; the Euler loop then runs the expert on the suffix
``num_steps`` times against that cache. So the deployable pieces are

- ``PrefixGraph``: (images, image_masks, lang_tokens, lang_masks) -> (keys, values, prefix_pad), the
  cache stacked over layers as (layers, B, L, kv_heads, head_dim);
- ``StepGraph``: (keys, values, prefix_pad, state, x_t, t) -> velocity (B, K, max_action_dim), one Euler
  step's network, called ``num_steps`` times by the runtime;
- ``SamplerGraph``: (keys, values, prefix_pad, state, noise) -> actions, the whole Euler loop unrolled in one
  graph (the expert's weights are one set of initializers the steps share).

SmolVLA is refused: SmolVLM's vision embeddings (transformers) compute patch position ids with a bucketize
over the patch mask, which the TorchScript exporter emits as a float ``Gather`` index that ONNX Runtime
rejects (measured with transformers 4.57 / ORT 1.31). pi0 and pi0.5 trace to plain ONNX ops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from daptq.models.lerobot_vla.config import LeRobotVLAConfig, TextConfig, VisionConfig
from daptq.models.lerobot_vla.modeling import PI0, FlowMatchingVLA

EXPORTABLE_TYPES = ("pi0", "pi05")
PREFIX_INPUTS = ("images", "image_masks", "lang_tokens", "lang_masks")
PREFIX_OUTPUTS = ("keys", "values", "prefix_pad")
STEP_INPUTS = ("keys", "values", "prefix_pad", "state", "x_t", "t")
SAMPLER_INPUTS = ("keys", "values", "prefix_pad", "state", "noise")


def check_exportable(model: nn.Module) -> LeRobotVLAConfig:
    """The model's config if its graph exports; a ValueError saying why not otherwise."""
    if not isinstance(model, FlowMatchingVLA):
        raise ValueError(
            f"flow-matching ONNX export takes a lerobot pi0 / pi0.5 network, got {type(model).__name__}"
        )
    c = model.config
    if c.type not in EXPORTABLE_TYPES or not isinstance(model, PI0):
        raise ValueError(
            f"{c.type}: no ONNX export yet (exportable: {list(EXPORTABLE_TYPES)}). SmolVLM's vision "
            "embeddings compute patch positions with a bucketize that the TorchScript exporter turns into a "
            "float Gather index ONNX Runtime rejects; run it with PyTorch (fake-quant or packed)"
        )
    return c


class PrefixGraph(nn.Module):
    """Images + language -> the stacked prefix KV cache and the prefix padding mask."""

    def __init__(self, model: PI0) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, image_masks, lang_tokens, lang_masks):
        embs, pad, ar = self.model.embed_prefix(images, image_masks, lang_tokens, lang_masks)
        cache = self.model.prefix_cache(embs, pad, ar)
        return torch.stack([k for k, _ in cache]), torch.stack([v for _, v in cache]), pad


class StepGraph(nn.Module):
    """One Euler step's network: the expert's velocity at (x_t, t) against the cache."""

    def __init__(self, model: PI0) -> None:
        super().__init__()
        self.model = model

    def forward(self, keys, values, prefix_pad, state, x_t, t):
        cache = list(zip(keys.unbind(0), values.unbind(0), strict=True))
        return self.model.velocity(cache, prefix_pad, state, x_t, t)


class SamplerGraph(nn.Module):
    """The whole Euler loop (t from 1 to 0 in ``num_steps`` steps), unrolled when traced."""

    def __init__(self, model: PI0, num_steps: int) -> None:
        super().__init__()
        self.model = model
        self.num_steps = int(num_steps)

    def forward(self, keys, values, prefix_pad, state, noise):
        cache = list(zip(keys.unbind(0), values.unbind(0), strict=True))
        dt = -1.0 / self.num_steps
        x = noise
        for i in range(self.num_steps):
            t = torch.full((x.shape[0],), 1.0 + i * dt, dtype=torch.float32)
            x = x + dt * self.model.velocity(cache, prefix_pad, state, x, t)
        return x


def example_inputs(config: LeRobotVLAConfig, batch: int = 1, tokens: int = 5) -> dict[str, torch.Tensor]:
    """Tracing inputs of the right shapes and dtypes (values do not matter: no data-dependent branch)."""
    c = config
    n_cameras = max(1, len(c.camera_keys))
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.rand((batch, n_cameras, 3, c.image_size, c.image_size), generator=g) * 2 - 1,
        "image_masks": torch.ones(batch, n_cameras, dtype=torch.bool),
        "lang_tokens": torch.randint(0, c.text.vocab, (batch, tokens), generator=g),
        "lang_masks": torch.ones(batch, tokens, dtype=torch.bool),
        "state": torch.zeros(batch, c.max_state_dim),
        "noise": torch.randn((batch, c.chunk_size, c.max_action_dim), generator=g),
        "t": torch.ones(batch),
    }


def dynamic_axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """Batch (and prefix length) dynamic on every input and output a graph has."""
    axes = {
        "images": {0: "batch"},
        "image_masks": {0: "batch"},
        "lang_tokens": {0: "batch", 1: "tokens"},
        "lang_masks": {0: "batch", 1: "tokens"},
        "keys": {1: "batch", 2: "prefix"},
        "values": {1: "batch", 2: "prefix"},
        "prefix_pad": {0: "batch", 1: "prefix"},
        "state": {0: "batch"},
        "x_t": {0: "batch"},
        "t": {0: "batch"},
        "noise": {0: "batch"},
        "velocity": {0: "batch"},
        "actions": {0: "batch"},
    }
    return {n: axes[n] for n in names}


def config_from_dict(d: Mapping[str, Any]) -> LeRobotVLAConfig:
    """The inverse of ``LeRobotVLAConfig.to_dict`` (an export's manifest records the config that way)."""
    kw = dict(d)
    for key, cls in (("text", TextConfig), ("vision", VisionConfig), ("expert", TextConfig)):
        if not isinstance(kw.get(key), Mapping):
            raise ValueError(f"config field {key!r} must be an object, got {kw.get(key)!r}")
        kw[key] = cls(**kw[key])
    kw["camera_keys"] = tuple(kw.get("camera_keys") or ())
    if kw.get("action_feature_names") is not None:
        kw["action_feature_names"] = tuple(kw["action_feature_names"])
    return LeRobotVLAConfig(**kw)
