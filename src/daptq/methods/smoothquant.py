"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before quantizing both.

Activation outliers sit in a few fixed input channels, so per-token activation scales are set by them and the
other channels lose their resolution. Per input channel ``c`` of layers sharing an input, SmoothQuant divides
the activation by ``s_c = max|x_c|^alpha / max|W_{:,c}|^(1 - alpha)`` and multiplies the weight column by it
(``alpha``, the migration strength, 0.5 by default: both sides end with range ``sqrt(max|x_c| max|W_c|)``).
The division is folded into the module that produces the input (``daptq.quant.smoothing``), so the smoothed
model equals the original before rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def smoothquant_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5, min_scale: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel scales ``max|x|^alpha / max|W|^(1-alpha)`` (float64); channels whose activation or
    weight is all zero get 1 (nothing to migrate)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant_scales: alpha must be in [0, 1], got {alpha!r}")
    a, w = act_absmax.detach().double(), weight_absmax.detach().double()
    if a.shape != w.shape or a.dim() != 1:
        raise ValueError(
            f"smoothquant_scales: activation {tuple(a.shape)} and weight {tuple(w.shape)} maxima must be "
            "equal-length vectors"
        )
    live = (a > 0) & (w > 0)
    s = a.clamp(min=min_scale).pow(alpha) / w.clamp(min=min_scale).pow(1.0 - alpha)
    return torch.where(live, s.clamp(min=min_scale), torch.ones_like(s))


def weight_absmax_per_input(layers: Sequence[nn.Linear]) -> torch.Tensor:
    """``max |W[:, c]|`` over the output rows of every layer sharing the input (float64, ``[C]``)."""
    if not layers:
        raise ValueError("weight_absmax_per_input: no layers")
    return torch.stack([layer.weight.detach().abs().amax(dim=0).double() for layer in layers]).amax(dim=0)
