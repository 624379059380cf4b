"""QuantVLA (CVPR 2026): a selective layout plus two calibrated rescalings folded into existing weights.

- **Selective layout**: backbone linears and the action head's MLPs are quantized (W4A8 by default); the
  action head's attention projections stay float (the paper's ablation: quantizing the DiT attention is what
  breaks it). Everything else in the head (timestep MLP, adaLN, action in/out, the interface) stays float too.
- **Attention temperature matching (ATM)**: upstream quantization changes the spread of each head's attention
  logits. Per head, ``alpha = std(logits_FP) / std(logits_Q)`` from calibration, folded into that head's rows
  of the query projection (weight and bias), which scales the head's logits by ``alpha`` exactly.
- **Output head balancing (OHB)**: per attention layer, ``beta = RMS(out_FP) / RMS(out_Q)`` measured after the
  output projection (with ATM already folded), folded into that projection's weight and bias.

Both ratios pass through the paper's neutral band (``|log r| < 0.03 -> r = 1``) and clip (``|log r| <= 0.4``).
Folding changes no module type and adds no parameter, so inference costs nothing extra; a folded layer that is
itself fake-quantized is re-rounded after the fold (fold before rounding).

Attention modules are found by shape, not by class: any module with ``n_head``, a fused ``qkv`` Linear
(``[q; k; v]`` rows) and an output ``proj`` Linear, called as ``attn(x)`` or ``attn(x, mask)`` with ``mask``
(B, T) True for keys that may be attended to (daptq.models.transformer.SelfAttention). Logits are recomputed
from the ``qkv`` output by forward hooks that are always removed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from daptq.methods import register_method
from daptq.methods.base import Method, MethodConfig, forward_batch, require_plan
from daptq.methods.rtn import RTN, RTNConfig
from daptq.methods.scope import ScopePlan
from daptq.methods.smoothquant import SmoothQuant, SmoothQuantConfig
from daptq.quant import QuantLinear

NEUTRAL_BAND = 0.03
LOG_CLIP = 0.4


def is_attention(module: nn.Module) -> bool:
    """True for a fused-qkv attention module as described in the module docstring."""
    return (
        isinstance(getattr(module, "n_head", None), int)
        and isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
    )


def band_and_clip(ratio: torch.Tensor, band: float = NEUTRAL_BAND, clip: float = LOG_CLIP) -> torch.Tensor:
    """The paper's stabilizer on a ratio: 1 inside the neutral band, clipped to ``exp(+-clip)`` outside."""
    if not 0 <= band < clip:
        raise ValueError(f"band_and_clip: need 0 <= band < clip, got band={band}, clip={clip}")
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    if not torch.isfinite(ratio).all() or bool((ratio <= 0).any()):
        raise ValueError(f"band_and_clip: ratios must be finite and > 0, got {ratio.tolist()}")
    log = ratio.log()
    log = torch.where(log.abs() < band, torch.zeros_like(log), log.clamp(-clip, clip))
    return log.exp()


# ---- the layout -------------------------------------------------------------------------------------------
def layout_kind(model: nn.Module, name: str) -> str:
    """``"attention"`` for a projection of an attention module, ``"mlp"`` for a linear inside an MLP
    (a parent module whose class name ends in ``MLP``), else ``"other"``."""
    parent_name, _, _ = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if is_attention(parent):
        return "attention"
    if type(parent).__name__.upper().endswith("MLP"):
        return "mlp"
    return "other"


def attention_names(model: nn.Module, roles: dict[str, str], role: str = "action_head") -> list[str]:
    """Attention modules whose ``qkv`` has ``role`` (ATM/OHB targets)."""
    names = [n for n, m in model.named_modules() if n and is_attention(m) and roles.get(f"{n}.qkv") == role]
    if not names:
        raise ValueError(f"QuantVLA: no attention module (n_head, qkv, proj) with role {role!r}")
    return names


# ---- statistics -------------------------------------------------------------------------------------------
@dataclass
class AttentionStats:
    """Running sums for one attention module: logits per head, and the output projection's energy."""

    n_head: int
    logit_sum: torch.Tensor = field(init=False)
    logit_sq: torch.Tensor = field(init=False)
    logit_n: torch.Tensor = field(init=False)
    out_sq: float = 0.0
    out_n: int = 0

    def __post_init__(self) -> None:
        self.logit_sum = torch.zeros(self.n_head, dtype=torch.float64)
        self.logit_sq = torch.zeros(self.n_head, dtype=torch.float64)
        self.logit_n = torch.zeros(self.n_head, dtype=torch.float64)

    def logit_std(self) -> torch.Tensor:
        if bool((self.logit_n < 2).any()):
            raise ValueError("AttentionStats: no logits were captured; did the calibration run the head?")
        mean = self.logit_sum / self.logit_n
        var = (self.logit_sq / self.logit_n - mean**2).clamp(min=0.0)
        return var.sqrt()

    def out_rms(self) -> float:
        if self.out_n == 0:
            raise ValueError("AttentionStats: no output was captured; did the calibration run the head?")
        return math.sqrt(self.out_sq / self.out_n)


def attention_logits(attn: nn.Module, qkv_out: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) scaled logits ``q k^T / sqrt(d_head)`` recomputed from the fused qkv output."""
    B, T, C3 = qkv_out.shape
    C = C3 // 3
    q, k, _ = qkv_out.split(C, dim=2)
    q, k = (t.reshape(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k))
    return (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))


@contextlib.contextmanager
def capture_attention_stats(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, AttentionStats]]:
    """Accumulate per-head logit statistics and output-projection energy of the named attention modules.

    Masked keys (``mask`` False) are left out of the logit statistics. Hooks are removed on exit (also on
    error).
    """
    stats: dict[str, AttentionStats] = {}
    handles = []
    try:
        for name in names:
            attn = model.get_submodule(name)
            if not is_attention(attn):
                raise ValueError(f"{name} is not an attention module (n_head, qkv, proj)")
            st = stats[name] = AttentionStats(attn.n_head)
            current_mask: dict[str, torch.Tensor | None] = {"mask": None}

            def pre(_m, args, kwargs, _cm=current_mask):
                mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
                _cm["mask"] = mask

            def on_qkv(_m, _args, out, _attn=attn, _st=st, _cm=current_mask):
                with torch.no_grad():
                    logits = attention_logits(_attn, out.detach().double())
                    mask = _cm["mask"]
                    if mask is None:
                        keep = torch.ones_like(logits, dtype=torch.bool)
                    else:
                        keep = mask[:, None, None, :].expand_as(logits).bool()
                    w = keep.double()
                    _st.logit_sum += (logits * w).sum(dim=(0, 2, 3))
                    _st.logit_sq += (logits.square() * w).sum(dim=(0, 2, 3))
                    _st.logit_n += w.sum(dim=(0, 2, 3))

            def on_proj(_m, _args, out, _st=st):
                with torch.no_grad():
                    _st.out_sq += float(out.detach().double().square().sum())
                    _st.out_n += out.numel()

            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(attn.qkv.register_forward_hook(on_qkv))
            handles.append(attn.proj.register_forward_hook(on_proj))
        yield stats
    finally:
        for h in handles:
            h.remove()


def collect_stats(model: nn.Module, names: list[str], run: Callable[[], Any]) -> dict[str, AttentionStats]:
    """Run ``run()`` (the calibration passes) under capture hooks, without autograd."""
    with capture_attention_stats(model, names) as stats, torch.no_grad():
        run()
    return stats


# ---- folding ----------------------------------------------------------------------------------------------
def _requantize_if_fake(layer: nn.Module, name: str) -> None:
    if isinstance(layer, QuantLinear):
        layer.requantize(name)


@torch.no_grad()
def fold_temperature_(attn: nn.Module, alpha: torch.Tensor, name: str = "attn") -> None:
    """Scale head h's logits by ``alpha[h]`` by scaling its query rows (weight and bias) of ``qkv``."""
    if not is_attention(attn):
        raise ValueError(f"{name} is not an attention module (n_head, qkv, proj)")
    alpha = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
    if alpha.numel() != attn.n_head:
        raise ValueError(f"{name}: alpha has {alpha.numel()} values for {attn.n_head} heads")
    qkv = attn.qkv
    C = qkv.weight.shape[0] // 3
    gain = torch.ones(qkv.weight.shape[0], dtype=torch.float32)
    gain[:C] = alpha.repeat_interleave(C // attn.n_head)
    qkv.weight.mul_(gain[:, None].to(qkv.weight))
    if qkv.bias is not None:
        qkv.bias.mul_(gain.to(qkv.bias))
    _requantize_if_fake(qkv, f"{name}.qkv")


@torch.no_grad()
def fold_output_gain_(attn: nn.Module, beta: float, name: str = "attn") -> None:
    """Scale the attention output by ``beta`` through the output projection's weight and bias."""
    if not is_attention(attn):
        raise ValueError(f"{name} is not an attention module (n_head, qkv, proj)")
    proj = attn.proj
    proj.weight.mul_(float(beta))
    if proj.bias is not None:
        proj.bias.mul_(float(beta))
    _requantize_if_fake(proj, f"{name}.proj")


def temperature_ratios(
    fp: dict[str, AttentionStats], q: dict[str, AttentionStats], band: float, clip: float
) -> dict[str, torch.Tensor]:
    """Per attention module, per head alpha (after band and clip)."""
    return {n: band_and_clip(fp[n].logit_std() / q[n].logit_std().clamp(min=1e-12), band, clip) for n in fp}


def output_ratios(
    fp: dict[str, AttentionStats], q: dict[str, AttentionStats], band: float, clip: float
) -> dict[str, float]:
    """Per attention module beta (after band and clip)."""
    return {
        n: float(band_and_clip(torch.tensor(fp[n].out_rms() / max(q[n].out_rms(), 1e-12)), band, clip))
        for n in fp
    }


def match_attention_(
    fp_model: nn.Module | dict[str, AttentionStats],
    q_model: nn.Module,
    names: list[str],
    run: Callable[[nn.Module], Any],
    *,
    atm: bool = True,
    ohb: bool = True,
    band: float = NEUTRAL_BAND,
    clip: float = LOG_CLIP,
) -> dict[str, Any]:
    """ATM then OHB on ``q_model`` against FP statistics (a model to measure, or statistics measured before).

    ``run(model)`` runs the calibration passes (same inputs and noise every call). Returns the decisions:
    ``{"alpha": {name: [per head]}, "beta": {name: value}, "fp_logit_std", "q_logit_std", ...}``.
    """
    fp = fp_model if isinstance(fp_model, dict) else collect_stats(fp_model, names, lambda: run(fp_model))
    decisions: dict[str, Any] = {"alpha": {}, "beta": {}}
    q = collect_stats(q_model, names, lambda: run(q_model))
    decisions["fp_logit_std"] = {n: fp[n].logit_std().tolist() for n in names}
    decisions["q_logit_std"] = {n: q[n].logit_std().tolist() for n in names}
    if atm:
        alphas = temperature_ratios(fp, q, band, clip)
        for n in names:
            fold_temperature_(q_model.get_submodule(n), alphas[n], n)
            decisions["alpha"][n] = alphas[n].tolist()
        q = collect_stats(q_model, names, lambda: run(q_model))
    decisions["fp_out_rms"] = {n: fp[n].out_rms() for n in names}
    decisions["q_out_rms"] = {n: q[n].out_rms() for n in names}
    if ohb:
        betas = output_ratios(fp, q, band, clip)
        for n in names:
            fold_output_gain_(q_model.get_submodule(n), betas[n], n)
            decisions["beta"][n] = betas[n]
    return decisions


# ---- the method -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantVLAConfig(MethodConfig):
    """QuantVLA on daptq's scope: ``spec`` (default W4A8) on the backbone and the action head's MLPs.

    ``base`` is the quantizer under the layout: ``"rtn"`` (round-to-nearest with the spec's observer) or
    ``"smoothquant"`` (SmoothQuant's migration with strength ``smooth_alpha``, then RTN). The paper builds on
    DuQuant's block rotation + smoothing; the rotation is not implemented here.
    """

    VERSION = 1
    atm: bool = True
    ohb: bool = True
    neutral_band: float = NEUTRAL_BAND
    clip: float = LOG_CLIP
    base: Literal["rtn", "smoothquant"] = "rtn"
    smooth_alpha: float = 0.5
    head_role: str = "action_head"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.neutral_band < self.clip:
            raise ValueError(
                f"QuantVLAConfig: need 0 <= neutral_band < clip, got {self.neutral_band} and {self.clip}"
            )


def _layout_plan(adapter: Any, plan: ScopePlan, head_role: str) -> ScopePlan:
    """Drop the head's attention projections and its non-MLP linears from ``plan`` (kept float, with why)."""
    modules, kept = {}, dict(plan.kept_float)
    for name, m in plan.modules.items():
        if m.role != head_role:
            modules[name] = m
            continue
        kind = layout_kind(adapter.model, name)
        if kind == "mlp":
            modules[name] = m
        elif kind == "attention":
            kept[name] = "QuantVLA layout: action-head attention projections stay float"
        else:
            kept[name] = "QuantVLA layout: only the action head's MLPs are quantized"
    if not modules:
        raise ValueError("QuantVLA layout leaves no module to quantize in this scope")
    return ScopePlan(modules, kept)


@register_method(QuantVLAConfig, name="quantvla")
class QuantVLA(Method):
    """Selective layout on an RTN or SmoothQuant base, then ATM and OHB folded into the head's attention."""

    def __init__(self, config: QuantVLAConfig) -> None:
        super().__init__(config)
        if config.base == "smoothquant":
            base_config = SmoothQuantConfig(spec=config.spec, scope=config.scope, alpha=config.smooth_alpha)
            self._base: Method = SmoothQuant(base_config)
        else:
            self._base = RTN(RTNConfig(spec=config.spec, scope=config.scope))
        self._batches: list[Any] = []
        self._fp_stats: dict[str, AttentionStats] = {}
        self._targets: list[str] = []

    def prepare(self, adapter: Any) -> None:
        super().prepare(adapter)
        self.plan = _layout_plan(adapter, require_plan(self), self.config.head_role)
        self._base.plan = self.plan
        roles = {m.name: m.role for m in adapter.quantizable_modules()}
        self._targets = attention_names(adapter.model, roles, self.config.head_role)

    def _run(self, adapter: Any) -> Callable[[nn.Module], None]:
        def run(_model: nn.Module) -> None:
            for i, batch in enumerate(self._batches):
                forward_batch(adapter, batch, seed=i)

        return run

    def calibrate(self, adapter: Any, batches: Sequence[Any]) -> None:
        require_plan(self)
        if not batches:
            raise ValueError("QuantVLA: ATM/OHB need calibration batches")
        self._batches = list(batches)
        try:
            self._base.calibrate(adapter, self._batches)  # smoothing statistics, static activation scales
        finally:
            self._base.remove_hooks()
        self._fp_stats = collect_stats(
            adapter.model, self._targets, lambda: self._run(adapter)(adapter.model)
        )

    def apply(self, adapter: Any) -> None:
        require_plan(self)
        if not self._fp_stats:
            raise RuntimeError("QuantVLA.apply: calibrate() has not run")
        self._base.apply(adapter)
        c = self.config
        decisions = match_attention_(
            self._fp_stats,
            adapter.model,
            self._targets,
            self._run(adapter),
            atm=c.atm,
            ohb=c.ohb,
            band=c.neutral_band,
            clip=c.clip,
        )
        self.decisions.update({"base": c.base, "attention_modules": self._targets, **decisions})
        self.decisions.update({f"base_{k}": v for k, v in self._base.decisions.items()})
