"""A tiny seeded state-only policy that honours the Policy contract, for tests and smoke runs of evaluation.

It behaves like a small chunked stochastic VLA: from the end-effector state and a per-task embedding it
predicts a chunk of actions, adds seeded sampling noise (so paired rollouts must share the noise to be
comparable) and plays the chunk from a queue. ``weight_noise`` perturbs every parameter with seeded Gaussian
noise scaled by that parameter's std, a stand-in for quantization error whose size the tests control.

Spec: ``toy`` or ``toy:seed=0,weight_noise=0.01`` (keys: see ``ToyConfig``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from daptq.models.adapter import (
    METAWORLD_ACTION_SPACE,
    ActionSpace,
    InterfaceModule,
    Observation,
    PolicyInfo,
    QuantizableModule,
    VLAAdapter,
    state_digest,
)
from daptq.models.batching import slot_noise, slot_rows
from daptq.models.policy import ChunkedPolicy

# Centre and half-extent of the Meta-World Sawyer workspace (m), used to normalise the state input.
_WORKSPACE_CENTRE = (0.0, 0.6, 0.15)
_WORKSPACE_HALF = (0.5, 0.3, 0.15)


# A toy is small: a typo must not allocate gigabytes, overflow a seed or make every weight inf.
_TOY_LIMITS = {"hidden": 4096, "chunk": 1024, "embed_dim": 4096, "action_dim": 64, "seed": 2**63 - 1}
_TOY_LIMITS |= {"noise_seed": 2**63 - 1, "weight_noise": 1e3, "action_noise": 1e3, "gain": 1e3}


@dataclass(frozen=True)
class ToyConfig:
    """Everything that defines a toy policy; two equal configs give bit-identical policies."""

    seed: int = 0  # initialises the weights
    weight_noise: float = 0.0  # relative (to each parameter's std) Gaussian weight perturbation
    noise_seed: int = 12345  # seeds the weight perturbation (same direction for every weight_noise level)
    hidden: int = 32
    chunk: int = 4  # actions predicted per forward pass and played from the queue
    action_noise: float = 0.05  # std of the sampling noise added before the tanh
    gain: float = 4.0  # proportional pull towards the task's target point, keeps the arm inside the workspace
    embed_dim: int = 8
    action_dim: int = 4  # != 4 gives a non-Meta-World action space (tests of mismatch checks)

    def __post_init__(self) -> None:
        if self.weight_noise < 0 or self.action_noise < 0:
            raise ValueError(f"toy: weight_noise and action_noise must be >= 0, got {self}")
        if min(self.hidden, self.chunk, self.embed_dim, self.action_dim) <= 0:
            raise ValueError(f"toy: hidden, chunk, embed_dim and action_dim must be positive, got {self}")
        for name in ("weight_noise", "action_noise", "gain"):  # nan passes every comparison above
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"toy: {name} must be finite, got {getattr(self, name)}")
        for name, limit in _TOY_LIMITS.items():
            if abs(getattr(self, name)) > limit:
                raise ValueError(f"toy: |{name}| must be <= {limit:g}, got {getattr(self, name)}")


def parse_toy_spec(spec: str) -> ToyConfig:
    """Parse ``toy`` / ``toy:key=value,...`` into a ToyConfig; unknown keys or bad values raise ValueError."""
    if spec == "toy":
        return ToyConfig()
    if not spec.startswith("toy:"):
        raise ValueError(f"toy spec must start with 'toy:', got {spec!r}")
    types = {f.name: f.type for f in fields(ToyConfig)}
    kwargs: dict[str, int | float] = {}
    body = spec[len("toy:") :]
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(
                f"toy spec {spec!r}: bad item {item!r}; expected key=value with key in {list(types)}"
            )
        if key in kwargs:
            raise ValueError(f"toy spec {spec!r}: {key} is given twice")
        try:
            kwargs[key] = int(value) if types[key] in (int, "int") else float(value)
        except ValueError as exc:
            raise ValueError(f"toy spec {spec!r}: {key}={value!r} is not a valid {types[key]}") from exc
    return ToyConfig(**kwargs)


def _instruction_seed(instruction: str) -> int:
    """A stable (process-independent, unlike hash()) integer for an instruction string."""
    return int.from_bytes(hashlib.sha256(instruction.encode("utf-8")).digest()[:4], "little")


def _toy_action_space(action_dim: int) -> ActionSpace:
    if action_dim == METAWORLD_ACTION_SPACE.dim:
        return METAWORLD_ACTION_SPACE
    return ActionSpace(tuple(f"a{i}" for i in range(action_dim)), ("translation",) * action_dim)


class ToyNet(nn.Module):
    """MLP(state, task embedding) -> action chunk, plus a pull towards a per-task target point."""

    def __init__(self, config: ToyConfig = ToyConfig()) -> None:
        super().__init__()
        self.config = config
        dim = config.action_dim
        gen = torch.Generator().manual_seed(config.seed)
        self.net = nn.Sequential(
            nn.Linear(4 + config.embed_dim, config.hidden),
            nn.Tanh(),
            nn.Linear(config.hidden, config.hidden),
            nn.Tanh(),
            nn.Linear(config.hidden, 2 * dim),  # per dimension: a base action and its drift across the chunk
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim > 1 else 0.1))
            self.net[-1].weight.mul_(0.3)  # keep the MLP's share of the pre-tanh action moderate
            if config.weight_noise > 0:
                self._perturb(config.weight_noise, config.noise_seed)
        self.register_buffer("centre", torch.tensor(_WORKSPACE_CENTRE))
        self.register_buffer("half_extent", torch.tensor(_WORKSPACE_HALF))
        self.eval()
        self._embeddings: dict[str, torch.Tensor] = {}

    def _perturb(self, rel_std: float, noise_seed: int) -> None:
        gen = torch.Generator().manual_seed(noise_seed)
        for p in self.net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (rel_std * p.std()))

    def task_embedding(self, instruction: str) -> torch.Tensor:
        """A fixed seeded embedding per instruction (a stand-in for a language encoder)."""
        if instruction not in self._embeddings:
            gen = torch.Generator().manual_seed(_instruction_seed(instruction))
            self._embeddings[instruction] = torch.randn(self.config.embed_dim, generator=gen)
        return self._embeddings[instruction]

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = batch["state"].float()
        if state.ndim != 2 or state.shape[1] != 4:
            raise ValueError(f"toy: batch['state'] must be (B, 4), got {tuple(state.shape)}")
        emb = batch.get("task_embedding")
        if emb is None:
            emb = torch.zeros(state.shape[0], self.config.embed_dim)
        ee = (state[:, :3] - self.centre) / self.half_extent
        return torch.cat([ee, state[:, 3:4], emb.float()], dim=1), ee, emb

    def chunk(
        self,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``batch["state"]`` (B, 4), optional ``batch["task_embedding"]`` (B, E) -> actions (B, chunk, D).

        ``noise`` (B, chunk, D), already scaled, replaces the draw from ``generator`` (batched rollouts)."""
        x, ee, emb = self.inputs(batch)
        base, slope = self.net(x).chunk(2, dim=1)
        # A smooth chunk: the base action drifting linearly over its K steps (a short motion primitive).
        k = torch.arange(self.config.chunk, dtype=torch.float32).view(1, -1, 1) / self.config.chunk
        out = base.unsqueeze(1) + k * slope.unsqueeze(1)
        # Pull towards a per-task target (the embedding's first three entries, squashed into the workspace).
        target = torch.tanh(emb[:, :3]) * 0.5
        pull = torch.zeros_like(out)
        n = min(3, pull.shape[-1])
        pull[..., :n] = (self.config.gain * (target - ee))[:, :n].unsqueeze(1)
        if noise is not None:
            if noise.shape != out.shape:
                raise ValueError(f"toy: noise has shape {tuple(noise.shape)}, expected {tuple(out.shape)}")
        elif self.config.action_noise > 0:
            noise = torch.randn(out.shape, generator=generator) * self.config.action_noise
        else:
            noise = torch.zeros_like(out)
        return torch.tanh(out + pull + noise)


class ToyAdapter(VLAAdapter):
    """The toy as a quantization target (so methods, `daptq quantize` and CI can run on it).

    Roles: net.0 plays the backbone, net.2 the interface producing the latent, net.4 the action head. Its
    objective is the L2 regression of the sampled chunk on ``batch["actions"]`` (no diffusion head).
    """

    ROLES = {"net.0": "backbone", "net.2": "interface", "net.4": "action_head"}
    objective_kind = "regression_l2"
    capabilities = frozenset({"condition", "batched_eval"})

    def __init__(self, model: ToyNet) -> None:
        self.model = model
        self.action_space = _toy_action_space(model.config.action_dim)

    @property
    def chunk_size(self) -> int:
        return self.model.config.chunk

    def condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The latent the action head reads: the second hidden layer's output (B, hidden)."""
        x, _, _ = self.model.inputs(batch)
        return self.model.net[:4](x)

    def sample(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The action chunk with autograd kept (same noise for the same generator state)."""
        return self.model.chunk(batch, generator)

    def objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """MSE of the sampled chunk against ``batch["actions"]``, optionally weighted per dimension."""
        if "actions" not in batch:
            raise ValueError("objective needs batch['actions'] (B, K, action_dim)")
        actions = batch["actions"].float()
        err = (self.model.chunk(batch, generator)[:, : actions.shape[1]] - actions) ** 2
        if dim_weights is not None:
            err = err * torch.as_tensor(dim_weights, dtype=err.dtype)
        return err.mean()

    def interface_modules(self) -> list[InterfaceModule]:
        return [
            InterfaceModule("net.2", self.model.net[2], "vector", "exact", f"(B, {self.model.config.hidden})")
        ]

    def quantizable_modules(self) -> list[QuantizableModule]:
        """None of the toy's layers sits in a repeated block; a tanh follows each, so no smoothing groups."""
        return [
            QuantizableModule(name, self.model.get_submodule(name), role, {"kind": "linear"})
            for name, role in self.ROLES.items()
        ]

    def calibration_batches(self, batches: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Dataset batches (``state`` (B,4), ``instruction`` list[str], optional ``actions``) -> inputs."""
        for raw in batches:
            for key in ("state", "instruction"):
                if key not in raw:
                    raise ValueError(f"calibration batch is missing {key!r} (has {sorted(raw)})")
            batch = {
                "state": torch.as_tensor(np.asarray(raw["state"]), dtype=torch.float32),
                "task_embedding": torch.stack(
                    [self.model.task_embedding(str(s)) for s in raw["instruction"]]
                ),
            }
            if "actions" in raw:
                batch["actions"] = torch.as_tensor(np.asarray(raw["actions"]), dtype=torch.float32)
            yield batch


class ToyPolicy(ChunkedPolicy):
    """The toy as a closed-loop policy: plays every action of each chunk; ``reset()`` without a seed keeps
    the sampling stream (seeded 0 at construction) so two fresh toys act identically."""

    keep_generator_on_none_seed = True

    def __init__(self, config: ToyConfig = ToyConfig()) -> None:
        model = ToyNet(config)
        self.adapter: ToyAdapter = ToyAdapter(model)
        super().__init__(self.adapter.action_space, config.chunk, seed=0)

    @property
    def model(self) -> ToyNet:
        return self.adapter.model

    @property
    def config(self) -> ToyConfig:
        return self.adapter.model.config

    @property
    def net(self) -> nn.Sequential:
        return self.adapter.model.net

    @property
    def chunk_size(self) -> int:
        """Actions per predicted chunk (calibration sampling labels chunks of this length)."""
        return self.config.chunk

    @property
    def recipe(self) -> dict:
        """Recorded in a run's config.json so the run can be reproduced (a quantized toy: its record's
        summary, set by ``load_quantized_policy``)."""
        override = self.__dict__.get("_quant_recipe")
        return dict(override) if override is not None else {"method": "toy", **asdict(self.config)}

    @recipe.setter
    def recipe(self, value: dict) -> None:
        self.__dict__["_quant_recipe"] = dict(value)

    def info(self) -> PolicyInfo:
        """State-only: declares no image size, camera or scene; identified by its weights and config."""
        return PolicyInfo(digest=state_digest(self.model, self.recipe), recipe=self.recipe)

    def task_embedding(self, instruction: str) -> torch.Tensor:
        return self.model.task_embedding(instruction)

    def _batch(self, observation: Observation) -> dict[str, torch.Tensor]:
        state = torch.as_tensor(np.asarray(observation["state"], dtype=np.float32)).unsqueeze(0)
        emb = self.task_embedding(str(observation.get("instruction", ""))).unsqueeze(0)
        return {"state": state, "task_embedding": emb}

    def chunk_for_observation(self, observation: Observation, generator: torch.Generator) -> np.ndarray:
        return self.adapter.predict_chunk(self._batch(observation), generator)[0].numpy().astype(np.float32)

    @torch.no_grad()
    def predict_chunks(
        self,
        observations: Sequence[Observation],
        generators: Sequence[torch.Generator],
        slots: int | None = None,
    ) -> np.ndarray:
        """The chunks ``select_action`` would queue, for a batch of observations in one forward pass: row i's
        noise comes from ``generators[i]`` as ``select_action``'s comes from the policy's own; ``slots``
        pads the batch to a fixed size (discarded rows). Returns (B, chunk, action_dim) float32."""
        obs, n = slot_rows(observations, generators, slots, lambda o: o)
        state = torch.as_tensor(np.stack([np.asarray(o["state"], dtype=np.float32) for o in obs]))
        emb = torch.stack([self.task_embedding(str(o.get("instruction", ""))) for o in obs])
        noise = slot_noise(generators, len(obs), self.config.chunk, self.action_space.dim)
        chunk = self.model.chunk(
            {"state": state, "task_embedding": emb}, None, noise=noise * self.config.action_noise
        )
        return chunk[:n].numpy().astype(np.float32)


def toy_policy_from_spec(spec: str) -> ToyPolicy:
    """Build the toy policy a ``toy:...`` spec names (see ``ToyConfig`` for the keys)."""
    return ToyPolicy(parse_toy_spec(spec))
