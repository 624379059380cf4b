"""Choosing quantization ranges: min-max, percentile clipping and MSE-optimal clipping.

Weights are seen whole, so their observers work directly on the grouped tensor. Activations stream in during
calibration, so ``ActivationObserver`` keeps the exact running min/max plus a bounded uniform sample of values
(reservoir-style, seeded) that percentile and MSE clipping work on.
"""

from __future__ import annotations

import math

import torch

from .spec import ActivationSpec, WeightSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MSE_GRID = torch.linspace(1.0, 0.25, 61).tolist()  # candidate clip ratios of the min-max range, finest near 1


def scale_torch_dtype(spec: WeightSpec) -> torch.dtype:
    return _DTYPES[spec.scale_dtype]


def check_finite(x: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf early: a single NaN poisons a whole scale and every output after it."""
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains {n_bad} NaN/Inf value(s); refusing to quantize")


def _range_to_qparams(
    lo: torch.Tensor,
    hi: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    symmetric_range: str = "restricted",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rounded to its storage dtype, so fake-quant and kernels see the same number), zero point.
    ``symmetric_range``: see ``WeightSpec``."""
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        if symmetric_range == "restricted":
            scale = amax / qmax
        elif symmetric_range == "full":
            scale = amax / (qmax + 0.5)
        elif symmetric_range == "full_exact":
            scale = torch.maximum((-lo).clamp(min=0.0) / -qmin, hi.clamp(min=0.0) / qmax)
        else:
            raise ValueError(f"unknown symmetric_range {symmetric_range!r}")
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # keep 0 exactly representable
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    scale = scale.to(scale_dtype)
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))
    if symmetric:
        return scale, None
    zero_point = torch.clamp(torch.round(qmin - lo / scale.float()), qmin, qmax)
    return scale, zero_point.to(torch.uint8)


def quantize_grouped(
    groups: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    """Round ``groups [R, G, S]`` to integer codes (returned as float) with ``scale/zero_point [R, G]``."""
    s = scale.float().unsqueeze(-1)
    zp = 0.0 if zero_point is None else zero_point.float().unsqueeze(-1)
    return torch.clamp(torch.round(groups / s) + zp, qmin, qmax)


def dequantize_grouped(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    s = scale.float().unsqueeze(-1)
    zp = 0.0 if zero_point is None else zero_point.float().unsqueeze(-1)
    return (codes.float() - zp) * s


def _kth_abs_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile along the last dim via kthvalue (torch.quantile refuses tensors above 16M elements)."""
    n = x.shape[-1]
    k = max(1, min(n, math.ceil(q * n)))
    return x.kthvalue(k, dim=-1).values


def _percentile_range(x: torch.Tensor, percentile: float, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Clipping range (lo, hi) along the last dim: symmetric uses |x|, affine clips each tail separately."""
    p = percentile / 100.0
    if symmetric:
        hi = _kth_abs_quantile(x.abs(), p)
        return -hi, hi
    return -_kth_abs_quantile(-x, p), _kth_abs_quantile(x, p)


def weight_qparams(groups: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per group for ``groups [R, G, S]`` according to ``spec.observer``."""
    groups = groups.float()
    sdt = scale_torch_dtype(spec)
    qmin, qmax = spec.qmin, spec.qmax
    grid = spec.symmetric_range
    if spec.observer == "percentile":
        lo, hi = _percentile_range(groups, spec.percentile, spec.symmetric)
        if grid == "full_exact":  # the signed range, not |x|, decides which extreme gets code -n
            lo = torch.maximum(lo, groups.amin(dim=-1))
            hi = torch.minimum(hi, groups.amax(dim=-1))
        return _range_to_qparams(lo, hi, qmin, qmax, spec.symmetric, sdt, grid)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    if spec.observer == "minmax":
        return _range_to_qparams(lo, hi, qmin, qmax, spec.symmetric, sdt, grid)
    # mse: per group, the clip ratio of the min-max range that minimizes the squared rounding error
    best_err = torch.full(lo.shape, float("inf"))
    best_scale, best_zp = _range_to_qparams(lo, hi, qmin, qmax, spec.symmetric, sdt, grid)
    for ratio in MSE_GRID:
        scale, zp = _range_to_qparams(lo * ratio, hi * ratio, qmin, qmax, spec.symmetric, sdt, grid)
        deq = dequantize_grouped(quantize_grouped(groups, scale, zp, qmin, qmax), scale, zp)
        err = (deq - groups).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class ActivationObserver:
    """Streams calibration activations of one layer and turns them into a per-tensor scale/zero point."""

    def __init__(
        self, spec: ActivationSpec, name: str = "", sample_size: int = 1 << 16, seed: int = 0
    ) -> None:
        self.spec = spec
        self.name = name
        self.sample_size = sample_size
        self._gen = torch.Generator().manual_seed(seed)
        self.min: float | None = None
        self.max: float | None = None
        self._samples: list[torch.Tensor] = []
        self.num_batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        check_finite(x, f"calibration activation of {self.name or 'layer'}")
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.num_batches += 1
        if self.spec.observer != "minmax":
            take = min(self.sample_size, x.numel())
            idx = torch.randperm(x.numel(), generator=self._gen)[:take]
            self._samples.append(x[idx])
            pool = torch.cat(self._samples)
            if pool.numel() > 4 * self.sample_size:  # keep memory bounded: subsample the pool uniformly
                keep = torch.randperm(pool.numel(), generator=self._gen)[: self.sample_size]
                pool = pool[keep]
            self._samples = [pool]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (scale float32 scalar, zero_point uint8 scalar or None)."""
        if self.min is None or self.max is None:
            raise RuntimeError(
                f"activation observer of {self.name or 'layer'} saw no data during calibration"
            )
        spec = self.spec
        lo, hi = torch.tensor(self.min), torch.tensor(self.max)
        if spec.observer == "minmax":
            return _range_to_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric, torch.float32)
        pool = torch.cat(self._samples)
        if spec.observer == "percentile":
            lo, hi = _percentile_range(pool, spec.percentile, spec.symmetric)
            return _range_to_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric, torch.float32)
        groups = pool.reshape(1, 1, -1)
        best = None
        for ratio in MSE_GRID:
            scale, zp = _range_to_qparams(
                lo * ratio, hi * ratio, spec.qmin, spec.qmax, spec.symmetric, torch.float32
            )
            deq = dequantize_grouped(
                quantize_grouped(
                    groups,
                    scale.reshape(1, 1),
                    None if zp is None else zp.reshape(1, 1),
                    spec.qmin,
                    spec.qmax,
                ),
                scale.reshape(1, 1),
                None if zp is None else zp.reshape(1, 1),
            )
            err = float((deq - groups).pow(2).sum())
            if best is None or err < best[0]:
                best = (err, scale, zp)
        return best[1], best[2]
