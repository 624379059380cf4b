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

Attention modules are what the adapter declares (``VLAAdapter.attention_layouts()``): a fused ``qkv`` Linear
(``[q; k; v]`` rows) or separate ``q``/``k``/``v`` Linears (grouped-query k/v included), the output projection
and the head count; MLP linears are the modules it declares with ``meta["part"] == "mlp"``. Logits are
recomputed from the q and k projections' outputs by forward hooks that are always removed; a bool (B, T)
key mask passed as ``attn(x, mask)`` (daptq.models.transformer.SelfAttention) is honoured.
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
from daptq.models.adapter import AttentionLayout, VLAAdapter
from daptq.quant import QuantLinear

NEUTRAL_BAND = 0.03
LOG_CLIP = 0.4


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
def layout_kinds(adapter: VLAAdapter) -> dict[str, str]:
    """Per quantizable module: ``"attention"`` for a projection of a declared attention module
    (``adapter.attention_layouts()``), ``"mlp"`` for a module declared part of an MLP (``meta["part"] ==
    "mlp"``), else ``"other"``. Read from the adapter's declarations, never from names or classes."""
    attention = {n for a in adapter.attention_layouts() for n in a.linears()}
    return {
        m.name: "attention" if m.name in attention else "mlp" if m.meta.get("part") == "mlp" else "other"
        for m in adapter.quantizable_modules()
    }


def layout_kind(adapter: VLAAdapter, name: str) -> str:
    """``layout_kinds(adapter)`` of one module (``"other"`` for a module the adapter does not declare)."""
    return layout_kinds(adapter).get(name, "other")


def attention_targets(adapter: VLAAdapter, role: str = "action_head") -> list[AttentionLayout]:
    """The declared attention modules with ``role`` (ATM/OHB targets)."""
    layouts = [a for a in adapter.attention_layouts() if a.role == role]
    if not layouts:
        declared = sorted({a.role for a in adapter.attention_layouts()})
        raise ValueError(
            f"QuantVLA: {type(adapter).__name__} declares no attention module with role {role!r} "
            f"(attention_layouts() roles: {declared or 'none'})"
        )
    return layouts


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

    def add_logits(self, logits: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Accumulate (B, H, Tq, Tk) logits; keys where ``mask`` (B, Tk) is False are left out."""
        if mask is None:
            keep = torch.ones_like(logits, dtype=torch.bool)
        else:
            keep = mask[:, None, None, :].expand_as(logits).bool()
        w = keep.double()
        self.logit_sum += (logits * w).sum(dim=(0, 2, 3))
        self.logit_sq += (logits.square() * w).sum(dim=(0, 2, 3))
        self.logit_n += w.sum(dim=(0, 2, 3))


def head_logits(q: torch.Tensor, k: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """(B, H, Tq, Tk) scaled logits ``q k^T / sqrt(d_head)`` from projected q (B, Tq, H d) and k
    (B, Tk, H_kv d); grouped-query k heads are shared by ``heads // kv_heads`` query heads."""
    B, Tq, Cq = q.shape
    d = Cq // heads
    qh = q.reshape(B, Tq, heads, d).transpose(1, 2)
    kh = k.reshape(B, k.shape[1], kv_heads, d).transpose(1, 2)
    if kv_heads != heads:
        kh = kh.repeat_interleave(heads // kv_heads, dim=1)
    return (qh @ kh.transpose(-2, -1)) * (1.0 / math.sqrt(d))


def attention_logits(layout: AttentionLayout, qkv_out: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) scaled logits recomputed from a fused qkv output (rows ``[q; k; v]``)."""
    C = qkv_out.shape[-1] // 3
    q, k, _ = qkv_out.split(C, dim=2)
    return head_logits(q, k, layout.heads, layout.heads)


def _key_mask(args: tuple, kwargs: dict, batch: int) -> torch.Tensor | None:
    """The attention call's key mask when it is daptq's convention: ``attn(x, mask)`` / ``mask=``, a bool
    (B, T) tensor, True for keys that may be attended to; anything else is not read (logits unmasked)."""
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.ndim == 2 and len(mask) == batch:
        return mask
    return None


@contextlib.contextmanager
def capture_attention_stats(
    model: nn.Module, layouts: Iterable[AttentionLayout]
) -> Iterator[dict[str, AttentionStats]]:
    """Accumulate per-head logit statistics and output-projection energy of the given attention modules.

    Logits come from the q and k projections' outputs (before any rotary embedding, which a per-head
    temperature commutes with), from the fused ``qkv`` or from separate ``q``/``k``. Masked keys (daptq's
    ``attn(x, mask)`` convention) are left out. Hooks are removed on exit (also on error).
    """
    stats: dict[str, AttentionStats] = {}
    handles = []
    try:
        for layout in layouts:
            attn = _submodule(model, layout.name)
            linears = {n: _linear(model, n, layout) for n in layout.linears()}
            st = stats[layout.name] = AttentionStats(layout.heads)
            call: dict[str, Any] = {"args": (), "kwargs": {}, "q": None, "k": None}

            def pre(_m, args, kwargs, _call=call):
                _call.update(args=args, kwargs=kwargs, q=None, k=None)

            def mask_for(_call, batch):
                return _key_mask(_call["args"], _call["kwargs"], batch)

            if layout.fused:

                def on_qkv(_m, _args, out, _layout=layout, _st=st, _call=call):
                    with torch.no_grad():
                        logits = attention_logits(_layout, out.detach().double())
                        _st.add_logits(logits, mask_for(_call, logits.shape[0]))

                handles.append(linears[layout.qkv].register_forward_hook(on_qkv))
            else:

                def on_qk(which, _layout=layout, _st=st, _call=call):
                    def hook(_m, _args, out):
                        _call[which] = out.detach().double()
                        if _call["q"] is not None and _call["k"] is not None:
                            with torch.no_grad():
                                logits = head_logits(
                                    _call["q"], _call["k"], _layout.heads, _layout.n_kv_heads
                                )
                                _st.add_logits(logits, mask_for(_call, logits.shape[0]))
                            _call.update(q=None, k=None)

                    return hook

                handles.append(linears[layout.q].register_forward_hook(on_qk("q")))
                handles.append(linears[layout.k].register_forward_hook(on_qk("k")))

            def on_out(_m, _args, out, _st=st):
                with torch.no_grad():
                    _st.out_sq += float(out.detach().double().square().sum())
                    _st.out_n += out.numel()

            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(linears[layout.out].register_forward_hook(on_out))
        yield stats
    finally:
        for h in handles:
            h.remove()


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"QuantVLA: {name!r} is not a module of the model") from None


def _linear(model: nn.Module, name: str, layout: AttentionLayout) -> nn.Module:
    module = _submodule(model, name)
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"QuantVLA: attention {layout.name!r}: projection {name!r} is not a Linear "
            f"({type(module).__name__})"
        )
    return module


def collect_stats(
    model: nn.Module, layouts: Sequence[AttentionLayout], run: Callable[[], Any]
) -> dict[str, AttentionStats]:
    """Run ``run()`` (the calibration passes) under capture hooks, without autograd."""
    with capture_attention_stats(model, layouts) as stats, torch.no_grad():
        run()
    return stats


# ---- folding ----------------------------------------------------------------------------------------------
def _requantize_if_fake(layer: nn.Module, name: str) -> None:
    if isinstance(layer, QuantLinear):
        layer.requantize(name)


@torch.no_grad()
def fold_temperature_(model: nn.Module, layout: AttentionLayout, alpha: torch.Tensor) -> None:
    """Scale head h's logits by ``alpha[h]``: scale that head's query rows (weight and bias), in the fused
    ``qkv``'s first third or in the separate ``q`` projection (exact, also under grouped-query attention,
    where k is shared, and rotary embeddings, which rotate within a head)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
    if alpha.numel() != layout.heads:
        raise ValueError(f"{layout.name}: alpha has {alpha.numel()} values for {layout.heads} heads")
    name = layout.qkv if layout.fused else layout.q
    proj = _linear(model, name, layout)  # type: ignore[arg-type]
    rows = proj.weight.shape[0]
    C = rows // 3 if layout.fused else rows
    gain = torch.ones(rows, dtype=torch.float32)
    gain[:C] = alpha.repeat_interleave(C // layout.heads)
    proj.weight.mul_(gain[:, None].to(proj.weight))
    if proj.bias is not None:
        proj.bias.mul_(gain.to(proj.bias))
    _requantize_if_fake(proj, name)  # type: ignore[arg-type]


@torch.no_grad()
def fold_output_gain_(model: nn.Module, layout: AttentionLayout, beta: float) -> None:
    """Scale the attention output by ``beta`` through the output projection's weight and bias."""
    proj = _linear(model, layout.out, layout)
    proj.weight.mul_(float(beta))
    if proj.bias is not None:
        proj.bias.mul_(float(beta))
    _requantize_if_fake(proj, layout.out)


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
    layouts: Sequence[AttentionLayout],
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
    names = [a.name for a in layouts]
    fp = fp_model if isinstance(fp_model, dict) else collect_stats(fp_model, layouts, lambda: run(fp_model))
    decisions: dict[str, Any] = {"alpha": {}, "beta": {}}
    q = collect_stats(q_model, layouts, lambda: run(q_model))
    decisions["fp_logit_std"] = {n: fp[n].logit_std().tolist() for n in names}
    decisions["q_logit_std"] = {n: q[n].logit_std().tolist() for n in names}
    if atm:
        alphas = temperature_ratios(fp, q, band, clip)
        for a in layouts:
            fold_temperature_(q_model, a, alphas[a.name])
            decisions["alpha"][a.name] = alphas[a.name].tolist()
        q = collect_stats(q_model, layouts, lambda: run(q_model))
    decisions["fp_out_rms"] = {n: fp[n].out_rms() for n in names}
    decisions["q_out_rms"] = {n: q[n].out_rms() for n in names}
    if ohb:
        betas = output_ratios(fp, q, band, clip)
        for a in layouts:
            fold_output_gain_(q_model, a, betas[a.name])
            decisions["beta"][a.name] = betas[a.name]
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


def _layout_plan(adapter: VLAAdapter, plan: ScopePlan, head_role: str) -> ScopePlan:
    """Drop the head's attention projections and its non-MLP linears from ``plan`` (kept float, with why)."""
    modules, kept = {}, dict(plan.kept_float)
    kinds = layout_kinds(adapter)
    for name, m in plan.modules.items():
        if m.role != head_role:
            modules[name] = m
            continue
        kind = kinds.get(name, "other")
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
        self._targets: list[AttentionLayout] = []
        self._calibrated = False

    def prepare(self, adapter: VLAAdapter) -> None:
        super().prepare(adapter)
        self.plan = _layout_plan(adapter, require_plan(self), self.config.head_role)
        self._base.plan = self.plan
        role = self.config.head_role
        if any(a.role == role for a in adapter.attention_layouts()):
            self._targets = attention_targets(adapter, role)
        else:  # e.g. OpenVLA-OFT's MLP head: the published ATM/OHB have nothing to act on (recorded)
            self._targets = []
            self.decisions["attention_note"] = (
                f"{type(adapter).__name__} declares no {role!r} attention: ATM/OHB do nothing; the layout "
                "and the base quantization apply as published"
            )

    def _run(self, adapter: VLAAdapter) -> Callable[[nn.Module], None]:
        def run(_model: nn.Module) -> None:
            for i, batch in enumerate(self._batches):
                forward_batch(adapter, batch, seed=i)

        return run

    def calibrate(self, adapter: VLAAdapter, batches: Sequence[Any]) -> None:
        require_plan(self)
        if not batches:
            raise ValueError("QuantVLA: ATM/OHB need calibration batches")
        self._batches = list(batches)
        try:
            self._base.calibrate(adapter, self._batches)  # smoothing statistics, static activation scales
        finally:
            self._base.remove_hooks()
        self._calibrated = True
        self._collect_fp_stats(adapter)

    def _collect_fp_stats(self, adapter: VLAAdapter) -> None:
        """The targets' attention statistics on the float model (before any rounding)."""
        if self._targets:
            self._fp_stats = collect_stats(
                adapter.model, self._targets, lambda: self._run(adapter)(adapter.model)
            )

    def apply(self, adapter: VLAAdapter) -> None:
        require_plan(self)
        if not self._calibrated:
            raise RuntimeError("QuantVLA.apply: calibrate() has not run")
        self._base.apply(adapter)
        self._match_and_record(adapter, self._run(adapter))

    # ---- block by block (daptq.methods.sequential) --------------------------------------------------------
    # The base quantizer (RTN or SmoothQuant) runs block by block on each block's recorded float inputs,
    # equal to its whole-model path. ATM/OHB compare the action head's attention on the float policy with
    # the *quantized* policy, whose head inputs depend on every quantized layer upstream (backbone,
    # interface, earlier DiT blocks, earlier denoising steps): no block's recorded float inputs give them.
    # So the float statistics come from one whole-policy pass before the loop (sequential_begin) and the
    # quantized ones from whole-policy passes after it (sequential_end), as in ``apply``: the same model.
    def sequential_needs_whole_model(self) -> bool:
        return bool(self._targets)

    def sequential_begin(self, adapter: VLAAdapter, batches: Sequence[Any]) -> None:
        require_plan(self)
        if not batches:
            raise ValueError("QuantVLA: ATM/OHB need calibration batches")
        self._batches = list(batches)
        self._collect_fp_stats(adapter)
        self._calibrated = True

    def calibrate_modules(self, adapter: VLAAdapter, names: Sequence[str], run: Callable[[], None]) -> None:
        try:
            self._base.calibrate_modules(adapter, names, run)
        finally:
            self._base.remove_hooks()

    def apply_modules(self, adapter: VLAAdapter, names: Sequence[str]) -> None:
        self._base.apply_modules(adapter, names)

    def sequential_end(self, adapter: VLAAdapter, run: Callable[[], None]) -> None:
        if not self._calibrated:
            raise RuntimeError("QuantVLA.sequential_end: sequential_begin() has not run")
        self._match_and_record(adapter, lambda _model: run())

    def _match_and_record(self, adapter: VLAAdapter, run: Callable[[nn.Module], Any]) -> None:
        """ATM/OHB on the quantized model (``run(model)`` runs the calibration batches) against the float
        statistics, and the decisions (the base quantizer's prefixed ``base_``). ``apply`` and
        ``sequential_end`` both finish here."""
        c = self.config
        decisions = (
            {}
            if not self._targets
            else match_attention_(
                self._fp_stats,
                adapter.model,
                self._targets,
                run,
                atm=c.atm,
                ohb=c.ohb,
                band=c.neutral_band,
                clip=c.clip,
            )
        )
        names = [a.name for a in self._targets]
        self.decisions.update({"base": c.base, "attention_modules": names, **decisions})
        self.decisions.update({f"base_{k}": v for k, v in self._base.decisions.items()})
