"""Activation capture: stream the inputs and/or outputs of named modules into reductions.

Calibration-based methods all need the same thing: run some forward passes and keep a summary of what a few
layers saw. A *reduction* is that summary, updated with a 2-D ``[rows, channels]`` view of each activation:

- ``Hessian``: the running ``X^T X`` with its row count (GPTQ's layer Hessian, ``hessian = X^T X / n``);
- ``ChannelStats``: per-channel max|x|, min, max, mean and std (SmoothQuant, AWQ);
- ``Covariance``: per-channel mean and the full covariance (DA-PTQ's CSRC at an interface layer's output);
- ``Samples``: a uniform random subset of rows, at most ``cap`` (AWQ's output-error search).

Sums are accumulated in float64 (means and variances merged with Chan's parallel update), because calibration
streams many batches of float32 activations and the second moments lose digits fast. Example::

    stats = {"head.z_proj": Covariance()}
    capture(model, lambda m: [m(b) for b in batches], outputs=stats)
    mu, cov = stats["head.z_proj"].mean, stats["head.z_proj"].cov

Hooks are removed in a ``finally`` block, so a forward that raises leaves no hook behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ._util import get_module
from .observers import check_finite

RowsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Reduction(Protocol):
    """Anything with ``update(rows)``, called with a ``[N, C]`` tensor for every activation seen."""

    def update(self, rows: torch.Tensor) -> None: ...


def channel_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` with one row per token (Linear: last dim is the feature) or per pixel (Conv2d: dim 1)."""
    if isinstance(module, nn.Conv2d) and x.dim() == 4:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


def fan_in_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a layer's weight matrix ``[out, fan_in]`` multiplies: tokens for Linear, patches for Conv2d.

    ``X^T X`` of these rows is the Hessian of the layer's output error in its (flattened) weight. A conv
    with a ``static_padding`` module (EfficientNet's ``Conv2dStaticSamePadding``) has its input padded first.
    A grouped conv (``groups=g``) gives ``[N, g * fan_in]``: group ``j``'s patches are columns
    ``[j * fan_in, (j + 1) * fan_in)``, the inputs of its ``out / g`` output rows (``Hessian(blocks=g)``).
    """
    if not isinstance(module, nn.Conv2d):
        return x.reshape(-1, x.shape[-1])
    padding = getattr(module, "static_padding", None)  # TF-style "same" convs pad their input first
    if isinstance(padding, nn.Module):
        x = padding(x)
    if isinstance(module.padding, str):
        raise ValueError(f"fan_in_rows: Conv2d padding={module.padding!r} (a string) is not supported")
    patches = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
    )  # [B, C*kh*kw, L], channel-major, so each group's columns are contiguous
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _rows64(rows: torch.Tensor, what: str) -> torch.Tensor:
    if rows.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [rows, channels] tensor, got shape {tuple(rows.shape)}")
    rows = rows.detach()
    check_finite(rows, what)
    return rows.to(torch.float64)


class _ChannelReduction:
    channels: int | None = None

    def _check_width(self, rows: torch.Tensor) -> None:
        if self.channels is None:
            self.channels = rows.shape[1]
        elif rows.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__}: got {rows.shape[1]} channels after {self.channels} before"
            )

    def _require_data(self) -> None:
        if not getattr(self, "count", 0):
            raise RuntimeError(f"{type(self).__name__}: no activation was captured")


class Hessian(_ChannelReduction):
    """Running ``sum X^T X`` (float64) and row count; ``hessian`` is their ratio, ``[C, C]``.

    ``blocks=g`` splits the channels into ``g`` equal consecutive blocks and keeps one ``[C/g, C/g]``
    Hessian per block (``[g, C/g, C/g]``): the per-group Hessians of a grouped conv (see ``fan_in_rows``).
    """

    def __init__(self, blocks: int = 1) -> None:
        if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
            raise ValueError(f"Hessian: blocks must be a positive integer, got {blocks!r}")
        self.blocks = blocks
        self.count = 0
        self.sum: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        x = _rows64(rows, "Hessian input")
        self._check_width(x)
        if self.blocks == 1:
            xtx = x.T @ x
        else:
            if x.shape[1] % self.blocks:
                raise ValueError(f"Hessian: {x.shape[1]} channels do not split into {self.blocks} blocks")
            xb = x.reshape(x.shape[0], self.blocks, -1)
            xtx = torch.einsum("ngi,ngj->gij", xb, xb)
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        self._require_data()
        return self.sum / self.count


class ChannelStats(_ChannelReduction):
    """Per-channel running min, max, max|x|, mean and (population) std, all float64."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        x = _rows64(rows, "ChannelStats input")
        if x.shape[0] == 0:
            return
        self._check_width(x)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        lo, hi = x.amin(0), x.amax(0)
        if self._mean is None:
            self._mean, self._m2, self.min, self.max = mean_b, m2_b, lo, hi
        else:
            n = self.count + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._m2 = self._m2 + m2_b + delta**2 * (self.count * n_b / n)
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        self.count += n_b

    @property
    def absmax(self) -> torch.Tensor:
        self._require_data()
        return torch.maximum(self.min.abs(), self.max.abs())

    @property
    def mean(self) -> torch.Tensor:
        self._require_data()
        return self._mean

    @property
    def std(self) -> torch.Tensor:
        self._require_data()
        return (self._m2 / self.count).sqrt()


class Covariance(_ChannelReduction):
    """Per-channel mean and the ``[C, C]`` (population) covariance, merged batch by batch in float64."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._comoment: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        x = _rows64(rows, "Covariance input")
        if x.shape[0] == 0:
            return
        self._check_width(x)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        centred = x - mean_b
        c_b = centred.T @ centred
        if self._mean is None:
            self._mean, self._comoment = mean_b, c_b
        else:
            n = self.count + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._comoment = self._comoment + c_b + torch.outer(delta, delta) * (self.count * n_b / n)
        self.count += n_b

    @property
    def mean(self) -> torch.Tensor:
        self._require_data()
        return self._mean

    @property
    def cov(self) -> torch.Tensor:
        self._require_data()
        return self._comoment / self.count


class Samples(_ChannelReduction):
    """A uniform random subset of at most ``cap`` rows of everything seen (float32, seeded).

    Each row gets a random key and the ``cap`` rows with the largest keys are kept, which is exactly a uniform
    sample without replacement over the whole stream, however the rows arrive in batches.
    """

    def __init__(self, cap: int = 4096, seed: int = 0) -> None:
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise ValueError(f"Samples: cap must be a positive integer, got {cap!r}")
        self.cap = cap
        self.count = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._rows: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        if rows.dim() != 2:
            raise ValueError(f"Samples: expected a 2-D [rows, channels] tensor, got {tuple(rows.shape)}")
        x = rows.detach().float().cpu()
        check_finite(x, "Samples input")
        self._check_width(x)
        keys = torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64)
        if self._rows is not None:
            x, keys = torch.cat([self._rows, x]), torch.cat([self._keys, keys])
        if x.shape[0] > self.cap:
            top = keys.topk(self.cap).indices
            x, keys = x[top], keys[top]
        self._rows, self._keys = x, keys
        self.count += rows.shape[0]

    @property
    def value(self) -> torch.Tensor:
        """``[min(cap, count), C]`` rows."""
        self._require_data()
        return self._rows


def _first_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"capture: the {where} of {name!r} is a {type(value).__name__}, not a tensor")
    return value


@contextlib.contextmanager
def capturing(
    model: nn.Module,
    inputs: Mapping[str, Reduction] | None = None,
    outputs: Mapping[str, Reduction] | None = None,
    rows: RowsFn = channel_rows,
    output_rows: RowsFn | None = None,
) -> Iterator[None]:
    """Within the block, every call of a named module feeds its input (first positional argument) and/or
    output into the given reductions, as ``rows(module, tensor)`` (outputs as ``output_rows``, default
    ``rows``). Hooks are always removed on exit."""
    inputs, outputs = dict(inputs or {}), dict(outputs or {})
    out_rows = rows if output_rows is None else output_rows
    if not inputs and not outputs:
        raise ValueError("capture: name at least one module in inputs or outputs")
    modules = {name: get_module(model, name) for name in {*inputs, *outputs}}  # fail before any hook
    handles = []
    try:
        for name, reduction in inputs.items():

            def pre_hook(module, args, _n=name, _r=reduction):
                _r.update(rows(module, _first_tensor(args, _n, "input")))

            handles.append(modules[name].register_forward_pre_hook(pre_hook))
        for name, reduction in outputs.items():

            def hook(module, _args, output, _n=name, _r=reduction):
                _r.update(out_rows(module, _first_tensor(output, _n, "output")))

            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(
    model: nn.Module,
    run: Callable[[nn.Module], Any],
    inputs: Mapping[str, Reduction] | None = None,
    outputs: Mapping[str, Reduction] | None = None,
    rows: RowsFn = channel_rows,
    output_rows: RowsFn | None = None,
) -> None:
    """Run ``run(model)`` (the calibration forward passes) without gradients while capturing; the
    reductions are updated in place."""
    with capturing(model, inputs, outputs, rows, output_rows), torch.no_grad():
        run(model)


__all__ = [
    "ChannelStats",
    "Covariance",
    "Hessian",
    "Reduction",
    "Samples",
    "capture",
    "capturing",
    "channel_rows",
    "fan_in_rows",
]
