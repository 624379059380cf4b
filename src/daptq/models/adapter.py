"""The two contracts every policy in daptq honours, so methods and evaluation never special-case a model.

``Policy`` is what closed-loop evaluation drives (lerobot-style). ``VLAAdapter`` is what a quantization
method needs to know about a VLA, and the only place model structure is known: which modules may be quantized
(role, repeated-block index, stack, stream), the attention modules' layouts, the interface through which the
vision-language representation enters the action decoder (and whether an affine folds into it exactly), the
decoder's training objective, a differentiable chunk sampler and what the action dimensions mean. Methods read
these declarations; they never guess structure from module names or classes. ``check_adapter`` validates an
adapter once, naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch
from torch import nn

from daptq.envs.actions import ActionSpace, DimKind  # noqa: F401  (re-exported: one type for suites and models)
from daptq.quant.smoothing import SmoothingGroup

Role = Literal["vision", "language", "backbone", "interface", "action_head", "other"]
ObjectiveKind = Literal["diffusion", "flow_matching", "token_ce", "regression_l1", "regression_l2"]
# One vector per sample / a token sequence read by cross-attention / the expert's K, V of a prefix.
InterfaceKind = Literal["vector", "tokens", "prefix_kv"]
# Can a per-output-channel affine be folded into the interface's W, b? "tied_pairs": only with gains tied
# across each RoPE pair of channels; "none": not at all (CSRC refuses).
FoldExactness = Literal["exact", "tied_pairs", "none"]
Capability = Literal["attention", "smoothing", "condition", "batched_eval", "rotation", "denoising_steps"]
ROLES: tuple[str, ...] = get_args(Role)
OBJECTIVE_KINDS: tuple[str, ...] = get_args(ObjectiveKind)
INTERFACE_KINDS: tuple[str, ...] = get_args(InterfaceKind)
FOLD_EXACTNESS: tuple[str, ...] = get_args(FoldExactness)
CAPABILITIES: tuple[str, ...] = get_args(Capability)

# An observation as produced by daptq.envs and consumed by policies.
#   "image":       uint8 array (H, W, 3), upright RGB
#   "state":       float32 array (4,): end-effector xyz (m) and gripper opening
#   "instruction": str, natural-language task instruction
Observation = Mapping[str, Any]


# Meta-World: end-effector position deltas plus a gripper command, all in [-1, 1].
METAWORLD_ACTION_SPACE = ActionSpace(
    names=("dx", "dy", "dz", "grip"), kinds=("translation", "translation", "translation", "gripper")
)


@dataclass(frozen=True)
class PolicyInfo:
    """What a policy tells the evaluator: what to render for it, what it was trained on, and what it is.

    ``digest`` identifies the policy's weights and configuration (``state_digest``): a run records it for
    every model and a resume refuses a model whose digest changed, even when its spec string did not.
    ``None`` fields are not declared (the evaluator then uses its defaults and checks nothing).
    """

    digest: str
    image_size: int | None = None
    camera: str | None = None
    scene_version: int | None = None
    demo_version: int | None = None
    recipe: Mapping[str, Any] | None = None  # the quantization recipe / method summary; None for FP

    def __post_init__(self) -> None:
        if not isinstance(self.digest, str) or not self.digest:
            raise ValueError(f"PolicyInfo.digest must be a non-empty string, got {self.digest!r}")
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0
        ):
            raise ValueError(f"PolicyInfo.image_size must be a positive integer, got {self.image_size!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recipe"] = dict(self.recipe) if self.recipe is not None else None
        return out


def state_digest(module: nn.Module, config: Any) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes) and a JSON-able config."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=repr).encode("utf-8"))
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class QuantizableModule:
    """One module a method may quantize: its qualified name in ``adapter.model``, its role, and where it sits.

    ``block`` is its index inside a repeated stack of blocks (``stack`` names the stack: "vision",
    "backbone", "dit", "expert"...), None outside one; ``stream`` is "prefix" / "expert" where a model runs
    two streams, else None. ``meta`` is free-form (e.g. ``{"kind": "linear"}``).
    """

    name: str
    module: nn.Module
    role: Role
    meta: dict[str, Any] = field(default_factory=dict)
    block: int | None = None
    stack: str | None = None
    stream: str | None = None


@dataclass(frozen=True)
class AttentionLayout:
    """One attention module: its projections as one fused ``qkv`` Linear (rows ``[q; k; v]``) or as separate
    ``q``/``k``/``v`` Linears (exactly one of the two), the output projection ``out`` and the head counts.
    QuantVLA's temperature matching and output-head balancing read this, on either layout."""

    name: str
    heads: int
    role: Role
    out: str
    qkv: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    kv_heads: int | None = None  # grouped-query attention; None = heads
    block: int | None = None
    stack: str | None = None
    stream: str | None = None

    def __post_init__(self) -> None:
        separate = (self.q, self.k, self.v)
        if (self.qkv is None) == all(s is None for s in separate) or (
            self.qkv is None and any(s is None for s in separate)
        ):
            raise ValueError(
                f"AttentionLayout {self.name!r}: give either qkv (fused) or all of q, k, v (separate), "
                f"got qkv={self.qkv!r}, q={self.q!r}, k={self.k!r}, v={self.v!r}"
            )
        if self.heads <= 0 or (self.kv_heads is not None and self.kv_heads <= 0):
            raise ValueError(f"AttentionLayout {self.name!r}: head counts must be positive")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(
                f"AttentionLayout {self.name!r}: heads={self.heads} is not a multiple of "
                f"kv_heads={self.kv_heads}"
            )

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    def linears(self) -> tuple[str, ...]:
        """The qualified names of every projection of this attention module."""
        inputs = (self.qkv,) if self.qkv is not None else (self.q, self.k, self.v)
        return (*inputs, self.out)  # type: ignore[return-value]


@dataclass(frozen=True)
class InterfaceModule:
    """Where the vision-language representation enters the action decoder (CSRC's target): an nn.Linear
    whose output channels CSRC compensates and folds into its weight and bias, as exactly as ``fold`` says."""

    name: str
    module: nn.Module
    kind: InterfaceKind
    fold: FoldExactness = "exact"
    note: str = ""
    # fold="tied_pairs": the head size of the rotary embedding that follows, which rotates channel i of each
    # head with channel i + rope_head_dim // 2 (the "rotate_half" convention of Llama-style models).
    rope_head_dim: int | None = None

    def rope_pairs(self) -> torch.Tensor:
        """(P, 2) channel indices rotated together by the rotary embedding (fold="tied_pairs")."""
        out_features = self.module.out_features
        hd = self.rope_head_dim
        if hd is None or hd % 2 or out_features % hd:
            raise ValueError(
                f"interface {self.name!r}: fold='tied_pairs' needs an even rope_head_dim dividing its "
                f"{out_features} outputs, got {hd!r}"
            )
        first = torch.cat([h * hd + torch.arange(hd // 2) for h in range(out_features // hd)])
        return torch.stack([first, first + hd // 2], dim=1)


@dataclass(frozen=True)
class NormReaders:
    """A norm reading a residual stream (a LayerNorm, or an RMSNorm computing ``weight * x / rms(x)``, over
    the stream's width) and the Linears that read its output and nothing else: a rotation fuses the norm's
    elementwise ``weight`` (and ``bias``) into them. A norm of another form (Gemma's ``1 + weight``) is
    not rotatable this way. ``substitutes``: parameters the readers take instead of the norm's output
    (CogACT's learned unconditional embedding for classifier-free guidance): turned by ``Q^T diag(1/weight)``
    so the readers see them unchanged (needs a bias-free norm with non-zero gains)."""

    norm: str
    readers: tuple[str, ...]
    substitutes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResidualStream:
    """A residual stream an orthogonal rotation Q may turn exactly (capability "rotation", QuaRot-style).

    ``writers``: Linears whose output rows are added into the stream; ``embeddings``: parameters (qualified
    names) added into it, last dim = ``width``; ``norms``: every place the stream is read. Nothing else may
    read or write it (and no per-channel op may act on it), else the rotation is not exact."""

    name: str
    width: int
    writers: tuple[str, ...]
    norms: tuple[NormReaders, ...]
    embeddings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RotationLayout:
    """What rotations fold exactly (capability "rotation"): the residual ``streams`` and ``value_output``,
    the names of attention layouts whose value rows reach ``out``'s columns with nothing channel-wise in
    between (per-head rotation of V/O). ``not_rotated``: what cannot be folded and why (recorded)."""

    streams: tuple[ResidualStream, ...]
    value_output: tuple[str, ...] = ()
    not_rotated: tuple[str, ...] = ()


class VLAAdapter(ABC):
    """What a quantization method needs to know about a VLA: pi(a | V, p) = Psi(f(V, p)).

    Methods take this, never ``Any``; ``check_adapter`` validates one once. Optional capabilities are declared
    in ``capabilities`` (no ``hasattr`` probes): "attention" (``attention_layouts``), "smoothing"
    (``smoothing_groups``), "condition" (``condition``), "batched_eval" (the policy batches episodes),
    "rotation" (``rotation_layout``), "denoising_steps" (``denoising_steps``, ``denoising_step_hook``).
    """

    model: nn.Module
    action_space: ActionSpace
    objective_kind: ObjectiveKind
    capabilities: frozenset[str] = frozenset()

    @abstractmethod
    def quantizable_modules(self) -> list[QuantizableModule]:
        """Every module a method may quantize, with its role, block, stack and stream."""

    @abstractmethod
    def interface_modules(self) -> list[InterfaceModule]:
        """The modules through which the VL representation enters the action decoder."""

    @abstractmethod
    def objective(
        self,
        batch: Mapping[str, torch.Tensor],
        dim_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scalar training loss of the action decoder on a model-input batch (needs ``batch["actions"]``);
        ``dim_weights`` (action_dim,) re-weights per action dimension (DA-PTQ's drift weighting)."""

    @abstractmethod
    def sample(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Differentiable action chunk (B, K, action_dim), same noise for the same generator state."""

    def predict_chunk(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Action chunk (B, K, action_dim) without autograd (calibration forwards, tests)."""
        with torch.no_grad():
            return self.sample(batch, generator)

    @abstractmethod
    def calibration_batches(self, batches: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        """Dataset-style batches -> model-input batches (moves, normalizes, encodes as the model expects)."""

    # ---- declared optional capabilities -------------------------------------------------------------------
    def attention_layouts(self) -> list[AttentionLayout]:
        """Attention modules (capability "attention"); none by default."""
        return []

    def smoothing_groups(self) -> list[SmoothingGroup]:
        """Layers sharing an input whose channels a preceding module rescales exactly (SmoothQuant, AWQ;
        capability "smoothing"); none by default."""
        return []

    def condition(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The backbone forward f: model inputs -> conditioning latent z (B, d_z) (capability "condition")."""
        raise NotImplementedError(f"{type(self).__name__} does not declare the 'condition' capability")

    def rotation_layout(self) -> RotationLayout:
        """Residual streams and V/O pairs a rotation folds into weights exactly (capability "rotation")."""
        raise NotImplementedError(
            f"{type(self).__name__} does not declare the 'rotation' capability (rotation_layout(): its "
            "residual streams' writers, norms and readers, and its rotatable V/O pairs); rotation needs it"
        )

    def denoising_steps(self) -> int:
        """Denoising steps per sampled chunk (capability "denoising_steps")."""
        raise NotImplementedError(
            f"{type(self).__name__} does not declare the 'denoising_steps' capability; per-step "
            "activation scales need denoising_steps() and denoising_step_hook()"
        )

    def denoising_step_hook(self, callback: Any) -> Any:
        """Call ``callback(step)`` before every action-head evaluation: ``step`` in ``[0, denoising_steps())``
        during sampling, None outside it (e.g. the training objective at random noise levels). Returns a
        handle with ``remove()`` (capability "denoising_steps")."""
        raise NotImplementedError(f"{type(self).__name__} does not declare the 'denoising_steps' capability")

    def block_modules(self) -> dict[tuple[str, int], str]:
        """``{(stack, block): qualified name of the block's container}`` (sequential calibration runs and
        streams these one at a time). Default: derived from ``quantizable_modules``: the common dotted
        prefix of a block's modules, cut after the component equal to the block index (``blocks.3.attn.qkv``
        and ``blocks.3.mlp.fc`` give ``blocks.3``); override where a container is not named so."""
        names: dict[tuple[str, int], list[list[str]]] = {}
        for m in self.quantizable_modules():
            if m.block is not None and m.stack is not None:
                names.setdefault((m.stack, m.block), []).append(m.name.split("."))
        out: dict[tuple[str, int], str] = {}
        for key, parts in names.items():
            common: list[str] = []
            for column in zip(*parts, strict=False):
                if any(c != column[0] for c in column):
                    break
                common.append(column[0])
            ends = [i for i, c in enumerate(common) if c == str(key[1])]
            if not ends:
                raise ValueError(
                    f"{type(self).__name__}: block {key} has no container named by its index in "
                    f"{['.'.join(p) for p in parts][:3]}; override block_modules()"
                )
            out[key] = ".".join(common[: ends[-1] + 1])
        return out

    def module(self, name: str) -> nn.Module:
        """The module ``name`` of ``model``, with an error naming the adapter when it does not exist."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(self).__name__}: the model has no module {name!r}") from None


def check_adapter(adapter: Any) -> VLAAdapter:
    """``adapter`` if it honours the contract, else a ValueError listing every problem found (by name)."""
    if not isinstance(adapter, VLAAdapter):
        raise ValueError(
            f"{type(adapter).__name__} is not a VLAAdapter (daptq.models.adapter.VLAAdapter); a policy "
            "exposes its adapter as `.adapter`"
        )
    who = type(adapter).__name__
    problems: list[str] = []
    model = getattr(adapter, "model", None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{who}.model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(getattr(adapter, "action_space", None), ActionSpace):
        problems.append("action_space must be an ActionSpace")
    kind = getattr(adapter, "objective_kind", None)
    if kind not in OBJECTIVE_KINDS:
        problems.append(f"objective_kind must be one of {list(OBJECTIVE_KINDS)}, got {kind!r}")
    caps = getattr(adapter, "capabilities", None)
    if not isinstance(caps, frozenset) or not caps <= set(CAPABILITIES):
        problems.append(f"capabilities must be a frozenset of {list(CAPABILITIES)}, got {caps!r}")
        caps = frozenset()
    named = dict(model.named_modules())

    def resolve(what: str, name: Any, module: Any = None, linear: bool = False) -> None:
        if not isinstance(name, str) or name not in named:
            problems.append(f"{what} {name!r} is not a module of the model")
        elif module is not None and named[name] is not module:
            problems.append(f"{what} {name!r}: the declared module is not model.{name}")
        elif linear and not isinstance(named[name], nn.Linear):
            problems.append(f"{what} {name!r} must be an nn.Linear, got {type(named[name]).__name__}")

    seen: set[str] = set()
    for m in adapter.quantizable_modules():
        if not isinstance(m, QuantizableModule):
            problems.append(f"quantizable_modules() returned a {type(m).__name__}, not a QuantizableModule")
            continue
        resolve("quantizable module", m.name, m.module)
        if m.name in seen:
            problems.append(f"quantizable module {m.name!r} is declared twice")
        seen.add(m.name)
        if m.role not in ROLES:
            problems.append(f"quantizable module {m.name!r}: role {m.role!r} is not one of {list(ROLES)}")
        if m.block is not None and (m.stack is None or m.block < 0):
            problems.append(
                f"quantizable module {m.name!r}: block {m.block!r} needs a stack and must be >= 0"
            )
    for i in adapter.interface_modules():
        if not isinstance(i, InterfaceModule):
            problems.append(f"interface_modules() returned a {type(i).__name__}, not an InterfaceModule")
            continue
        resolve("interface module", i.name, i.module, linear=True)
        if i.kind not in INTERFACE_KINDS:
            problems.append(
                f"interface module {i.name!r}: kind {i.kind!r} is not one of {list(INTERFACE_KINDS)}"
            )
        if i.fold not in FOLD_EXACTNESS:
            problems.append(
                f"interface module {i.name!r}: fold {i.fold!r} is not one of {list(FOLD_EXACTNESS)}"
            )
        elif i.fold == "tied_pairs" and isinstance(i.module, nn.Linear):
            try:
                i.rope_pairs()
            except ValueError as e:
                problems.append(str(e))
    layouts = adapter.attention_layouts()
    if layouts and "attention" not in caps:
        problems.append("attention_layouts() declares layouts but 'attention' is not in capabilities")
    for a in layouts:
        if not isinstance(a, AttentionLayout):
            problems.append(f"attention_layouts() returned a {type(a).__name__}, not an AttentionLayout")
            continue
        resolve("attention module", a.name)
        for name in a.linears():
            resolve(f"attention {a.name!r} projection", name, linear=True)
        if problems:
            continue
        out = named[a.out]
        if a.fused:
            rows = named[a.qkv].out_features
            if rows != out.in_features * 3 or out.in_features % a.heads:
                problems.append(
                    f"attention {a.name!r}: fused qkv has {rows} rows, expected 3 x {out.in_features} "
                    f"divisible into {a.heads} heads"
                )
        else:
            q, k, v = named[a.q], named[a.k], named[a.v]
            if q.out_features % a.heads or k.out_features % a.n_kv_heads or v.out_features % a.n_kv_heads:
                problems.append(f"attention {a.name!r}: q/k/v rows do not divide into the declared heads")
            elif q.out_features // a.heads != k.out_features // a.n_kv_heads:
                problems.append(f"attention {a.name!r}: q and k head dims differ")
            elif v.out_features * (a.heads // a.n_kv_heads) != out.in_features:
                problems.append(
                    f"attention {a.name!r}: out has {out.in_features} inputs, v gives {v.out_features}"
                )
    groups = adapter.smoothing_groups()
    if groups and "smoothing" not in caps:
        problems.append("smoothing_groups() declares groups but 'smoothing' is not in capabilities")
    for g in groups:
        resolve("smoothing group source", g.source)
        for name in g.layers:
            resolve(f"smoothing group ({g.source}) layer", name)
    if "rotation" in caps and not problems:
        problems += _rotation_problems(adapter, named)
    if problems:
        raise ValueError(f"{who} does not honour the VLAAdapter contract:\n  - " + "\n  - ".join(problems))
    return adapter


def _rotation_problems(adapter: VLAAdapter, named: Mapping[str, nn.Module]) -> list[str]:
    """What is wrong with a declared ``rotation_layout()`` (names, widths, norm types)."""
    problems: list[str] = []
    layout = adapter.rotation_layout()
    if not isinstance(layout, RotationLayout):
        return [f"rotation_layout() returned a {type(layout).__name__}, not a RotationLayout"]
    params = dict(adapter.model.named_parameters())
    for s in layout.streams:
        for w in s.writers:
            m = named.get(w)
            if not isinstance(m, nn.Linear) or m.out_features != s.width:
                problems.append(
                    f"stream {s.name!r}: writer {w!r} must be an nn.Linear with {s.width} outputs"
                )
        for e in s.embeddings:
            if e not in params or params[e].shape[-1] != s.width:
                problems.append(
                    f"stream {s.name!r}: embedding {e!r} must be a parameter of last dim {s.width}"
                )
        for n in s.norms:
            norm = named.get(n.norm)
            affine = [getattr(norm, a, None) for a in ("weight", "bias")]
            if norm is None or any(t is not None and tuple(t.shape) != (s.width,) for t in affine):
                problems.append(f"stream {s.name!r}: norm {n.norm!r} must be a norm over {s.width} channels")
            for p in n.substitutes:
                if p not in params or params[p].shape[-1] != s.width:
                    problems.append(
                        f"stream {s.name!r}: substitute {p!r} must be a parameter of last dim {s.width}"
                    )
                elif getattr(norm, "bias", None) is not None:
                    problems.append(f"stream {s.name!r}: norm {n.norm!r} has a bias; substitutes need none")
            for r in n.readers:
                m = named.get(r)
                if not isinstance(m, nn.Linear) or m.in_features != s.width:
                    problems.append(
                        f"stream {s.name!r}: reader {r!r} must be an nn.Linear with {s.width} inputs"
                    )
    layouts = {a.name for a in adapter.attention_layouts()}
    for name in layout.value_output:
        if name not in layouts:
            problems.append(f"rotation_layout().value_output names {name!r}, not one of attention_layouts()")
    return problems


@runtime_checkable
class Policy(Protocol):
    """Closed-loop control: ``reset`` at episode start, then one ``select_action`` per environment step."""

    action_space: ActionSpace

    def reset(self, seed: int | None = None) -> None:
        """Clear the action queue; ``seed`` fixes the sampling noise so paired rollouts can share it."""

    def select_action(self, observation: Observation) -> np.ndarray:
        """Return one action (float32, shape ``(action_space.dim,)``) for the current observation."""

    def info(self) -> PolicyInfo:
        """What the evaluator needs to know about this policy (observation settings, digest, recipe)."""

    def predict_chunk(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None):
        """Batched action chunks ``(B, K, action_dim)`` from a batch of model inputs (calibration, tests)."""
