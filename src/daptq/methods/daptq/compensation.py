"""Cross-Space Representation Compensation (CSRC, paper section 2): make the quantized interface output look
like the float one, then fold the correction into the interface layer so deployment pays nothing.

From the interface layer's output statistics on the float model (``mu_FP``, ``S_FP``) and on the quantized
model (``mu_Q``, ``S_Q``):

- Eqs. 4-6, :func:`diagonal_gain_bias`: ``g_c = clip(sigma_FP,c / (sigma_Q,c + eps), g_min, g_max)``,
  ``d_c = mu_FP,c - g_c mu_Q,c``.
- Eq. 7, :func:`dense_cross_channel_map`: ``M = argmin lambda_f ||Omega o (S_FP - M S_Q M^T)||^2 / ||Omega o
  S_FP||^2 + lambda_i ||M - I||^2 / C``. The two terms are normalized (by the fidelity target and by the
  channel count C) so ``lambda_f`` and ``lambda_i`` do not depend on the activations' scale. ``Omega_ij =
  sqrt(w_i w_j)`` from per-channel weights ``w`` (``weighting="uniform"``: all ones; ``"variance_ratio"``:
  ``w_c = max(r_c, 1/r_c)``, ``r_c = sigma_FP,c^2 / sigma_Q,c^2``, normalized to mean 1, so channels whose
  variance quantization changed most weigh most). With ``lambda_i = 0`` and uniform weights the minimum is
  the closed form ``S_FP^(1/2) S_Q^(-1/2)`` (whitening-colouring), which is returned directly; otherwise
  L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search; scipy's L-BFGS-B took 30x longer on 192
  channels) with the analytic gradient starts from M = I, so it finds the minimum nearest the identity
  (the closed form amplifies directions S_Q barely spans when calibration has few samples per channel).
- :func:`low_rank`: ``M ~ I + U V^T`` from the rank-r truncated SVD of ``M - I``.
- :func:`compensate` composes them (``mode="both"``: the gain first, then M fitted on the gain-corrected
  statistics), giving one affine map ``z~ = A z^ + d`` with ``d = mu_FP - A mu_Q`` re-derived so the mean
  matches, and :func:`fold_compensation` folds it into the layer (``W' = A W``, ``b' = A b + d``) with
  :func:`daptq.quant.fold_affine_`, which re-rounds a fake-quant layer: the fold happens before rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from daptq.quant import fold_affine_
from daptq.quant.capture import Covariance, capture

Mode = Literal["diagonal", "cross_channel", "both"]
Weighting = Literal["uniform", "variance_ratio"]


@dataclass(frozen=True)
class CSRCOptions:
    """CSRC's open constants (the paper leaves them open; defaults documented in docs/daptq.md)."""

    mode: Mode = "both"
    g_min: float = 0.5
    g_max: float = 2.0
    eps: float = 1e-6
    rank: int = 16
    lambda_f: float = 1.0
    lambda_i: float = 1e-3
    weighting: Weighting = "variance_ratio"
    max_iter: int = 200

    def __post_init__(self) -> None:
        if self.mode not in ("diagonal", "cross_channel", "both"):
            raise ValueError(f"CSRC: mode must be diagonal, cross_channel or both, got {self.mode!r}")
        if not 0 < self.g_min <= 1 <= self.g_max:
            raise ValueError(f"CSRC: need 0 < g_min <= 1 <= g_max, got {self.g_min}, {self.g_max}")
        if not self.eps > 0:
            raise ValueError(f"CSRC: eps must be > 0, got {self.eps}")
        if self.rank < 0:
            raise ValueError(f"CSRC: rank must be >= 0, got {self.rank}")
        if not self.lambda_f > 0 or self.lambda_i < 0:
            raise ValueError(
                f"CSRC: need lambda_f > 0 and lambda_i >= 0, got {self.lambda_f}, {self.lambda_i}"
            )
        if self.weighting not in ("uniform", "variance_ratio"):
            raise ValueError(f"CSRC: weighting must be uniform or variance_ratio, got {self.weighting!r}")


@dataclass(frozen=True)
class Stats:
    """Mean (C,) and covariance (C, C) of one layer's output, float64."""

    mean: torch.Tensor
    cov: torch.Tensor

    @classmethod
    def of(cls, cov: Covariance) -> Stats:
        return cls(cov.mean.double(), cov.cov.double())


@dataclass(frozen=True)
class Compensation:
    """``z~ = A z^ + d`` with ``A = (I + U V^T) diag(g)``."""

    gain: torch.Tensor  # (C,)
    U: torch.Tensor  # (C, r)
    V: torch.Tensor  # (C, r)
    bias: torch.Tensor  # d, (C,)

    @property
    def matrix(self) -> torch.Tensor:
        eye = torch.eye(self.gain.shape[0], dtype=torch.float64)
        return (eye + self.U @ self.V.T) * self.gain[None, :]

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return (z.double() @ self.matrix.T + self.bias).to(z.dtype)

    def summary(self) -> dict[str, Any]:
        """What the QuantRecord keeps: sizes and magnitudes (the tensors themselves are folded)."""
        return {
            "channels": int(self.gain.shape[0]),
            "rank": int(self.U.shape[1]),
            "gain_min": float(self.gain.min()),
            "gain_max": float(self.gain.max()),
            "gain_mean": float(self.gain.mean()),
            "bias_abs_mean": float(self.bias.abs().mean()),
            "lowrank_fro": float(torch.linalg.matrix_norm(self.U @ self.V.T)),
        }


def _std(cov: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(cov).clamp(min=0).sqrt()


def diagonal_gain_bias(fp: Stats, q: Stats, g_min: float, g_max: float, eps: float):
    """Eqs. 4-6: per-channel gain and bias matching each channel's std and mean."""
    g = (_std(fp.cov) / (_std(q.cov) + eps)).clamp(g_min, g_max)
    return g, fp.mean - g * q.mean


def channel_weights(fp: Stats, q: Stats, weighting: Weighting, eps: float) -> torch.Tensor:
    if weighting == "uniform":
        return torch.ones_like(fp.mean)
    r = (torch.diagonal(fp.cov) + eps) / (torch.diagonal(q.cov) + eps)
    w = torch.maximum(r, 1 / r)
    return w / w.mean()


def _sym_power(s: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s)
    vals = vals.clamp(min=eps * max(float(vals.max()), eps))
    return (vecs * vals**power) @ vecs.T


def closed_form_map(s_fp: torch.Tensor, s_q: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``S_FP^(1/2) S_Q^(-1/2)``: the exact solution of Eq. 7 with lambda_i = 0 and uniform weights."""
    return _sym_power(s_fp, 0.5, eps) @ _sym_power(s_q, -0.5, eps)


def cross_channel_objective(
    m: torch.Tensor,
    s_fp: torch.Tensor,
    s_q: torch.Tensor,
    omega: torch.Tensor,
    lambda_f: float,
    lambda_i: float,
) -> tuple[float, torch.Tensor]:
    """Eq. 7 (normalized, see the module docstring) and its gradient in M."""
    c = m.shape[0]
    norm = float(((omega * s_fp) ** 2).sum())
    r = s_fp - m @ s_q @ m.T
    e = omega**2 * r
    dev = m - torch.eye(c, dtype=m.dtype)
    value = lambda_f * float((e * r).sum()) / norm + lambda_i * float((dev**2).sum()) / c
    grad = -4 * lambda_f / norm * (e @ m @ s_q) + 2 * lambda_i / c * dev
    return value, grad


def dense_cross_channel_map(fp: Stats, q: Stats, options: CSRCOptions) -> torch.Tensor:
    """Eq. 7's dense M (before the low-rank truncation)."""
    if options.lambda_i == 0 and options.weighting == "uniform":
        return closed_form_map(fp.cov, q.cov)
    w = channel_weights(fp, q, options.weighting, options.eps)
    omega = (w[:, None] * w[None, :]).sqrt()
    c = fp.mean.shape[0]
    start = torch.eye(c, dtype=torch.float64)

    m = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [m],
        max_iter=options.max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )

    def closure() -> torch.Tensor:
        value, grad = cross_channel_objective(
            m.detach(), fp.cov, q.cov, omega, options.lambda_f, options.lambda_i
        )
        m.grad = grad
        return torch.tensor(value, dtype=torch.float64)

    opt.step(closure)
    result = m.detach()
    if not torch.isfinite(result).all():
        raise RuntimeError("CSRC: the cross-channel fit diverged (non-finite M)")
    return result


def low_rank(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``U, V`` with ``I + U V^T`` the best rank-``rank`` approximation of ``M`` around I (truncated SVD)."""
    u, s, vh = torch.linalg.svd(m - torch.eye(m.shape[0], dtype=m.dtype))
    r = min(rank, s.shape[0])
    return u[:, :r] * s[:r], vh[:r].T


def tied_pair_gain(fp: Stats, q: Stats, pairs: torch.Tensor, g_min: float, g_max: float, eps: float):
    """Eq. 4's gain with one value per channel pair (the pair's pooled std ratio), so the diagonal map
    commutes with a rotary embedding that rotates each pair."""
    var_fp, var_q = torch.diagonal(fp.cov).clamp(min=0), torch.diagonal(q.cov).clamp(min=0)
    pooled = (var_fp[pairs].sum(dim=1).sqrt() / (var_q[pairs].sum(dim=1).sqrt() + eps)).clamp(g_min, g_max)
    gain = torch.ones_like(var_fp)
    gain[pairs[:, 0]] = pooled
    gain[pairs[:, 1]] = pooled
    return gain


def compensate(
    fp: Stats, q: Stats, options: CSRCOptions = CSRCOptions(), pairs: torch.Tensor | None = None
) -> Compensation:
    """The affine correction of one interface layer's quantized output (see the module docstring).

    ``pairs`` (P, 2): channels a rotary embedding rotates together after this layer. CSRC then restricts
    itself to what commutes with the rotation: a diagonal gain tied across each pair (no cross-channel map).
    """
    if fp.mean.shape != q.mean.shape or fp.cov.shape != q.cov.shape:
        raise ValueError(f"CSRC: float and quantized stats differ in shape {fp.mean.shape} vs {q.mean.shape}")
    c = fp.mean.shape[0]
    gain = torch.ones(c, dtype=torch.float64)
    if pairs is not None:
        gain = tied_pair_gain(fp, q, pairs, options.g_min, options.g_max, options.eps)
        u = v = torch.zeros(c, 0, dtype=torch.float64)
        comp = Compensation(gain, u, v, torch.zeros(c, dtype=torch.float64))
        return Compensation(gain, u, v, fp.mean - comp.matrix @ q.mean)
    if options.mode in ("diagonal", "both"):
        gain, _ = diagonal_gain_bias(fp, q, options.g_min, options.g_max, options.eps)
    u = v = torch.zeros(c, 0, dtype=torch.float64)
    if options.mode in ("cross_channel", "both") and options.rank > 0:
        corrected = Stats(fp.mean, q.cov * gain[:, None] * gain[None, :])
        u, v = low_rank(dense_cross_channel_map(fp, corrected, options), options.rank)
    comp = Compensation(gain, u, v, torch.zeros(c, dtype=torch.float64))
    return Compensation(gain, u, v, fp.mean - comp.matrix @ q.mean)


def fold_compensation(module: nn.Module, comp: Compensation) -> None:
    """``W' = A W``, ``b' = A b + d`` into the layer itself (re-rounded if it is fake-quant)."""
    fold_affine_(module, comp.matrix.float(), comp.bias.float())


def output_stats(model: nn.Module, run: Callable[[nn.Module], Any], names: Sequence[str]) -> dict[str, Stats]:
    """Mean and covariance of each named layer's output over ``run(model)`` (no gradients)."""
    reductions = {n: Covariance() for n in names}
    capture(model, run, outputs=reductions)
    return {n: Stats.of(r) for n, r in reductions.items()}
