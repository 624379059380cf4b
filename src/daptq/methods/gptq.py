"""GPTQ (Frantar et al., 2023): round a layer's weight column by column, pushing each column's rounding error
onto the columns not yet rounded, weighted by the inverse Hessian of the layer's output error.

For a Linear ``y = W x`` and calibration inputs ``X``, the output error ``||(W - W_q) X||^2`` is the quadratic
form ``tr((W - W_q) H (W - W_q)^T)`` with ``H = X^T X / n``. GPTQ minimizes it greedily: rounding column ``j``
costs ``err_j = (w_j - q_j) / [H^-1]_jj`` and the optimal update of the remaining columns is
``W[:, j+1:] -= err_j [H^-1]_{j, j+1:}`` (Optimal Brain Surgeon with a fixed order). Using the upper Cholesky
factor of ``H^-1`` gives every row's updates at once, and applying them lazily per block of columns keeps the
work in matrix products.

Choices, as in the GPTQ reference code and llm-compressor:
- dampening: ``H += damp * mean(diag H) * I`` (``damp=0.01``) keeps the factorization stable;
- act-order: columns are processed by descending ``diag H`` (the most-used inputs first, while many columns
  are left to absorb their error); the codes are returned in the original column order;
- the quantization grid (scales, zero points) is fixed from the original weight *before* the column loop
  ("static groups"), so act-order never reorders which columns share a group scale; it uses the spec's
  observer (min-max, percentile or MSE) exactly as RTN would.
- columns whose inputs are always zero (``diag H == 0``) have no output effect; they are rounded to nearest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from daptq.methods import register_method
from daptq.methods.base import Method, MethodConfig, require_plan
from daptq.methods.rotation import check_rotation
from daptq.methods.smoothquant import calibration_run, static_activation_layers
from daptq.methods.step_scales import DECISION_KEY as STEP_SCALES
from daptq.methods.step_scales import StepObservers, install_observed_step_scales
from daptq.models.adapter import VLAAdapter
from daptq.quant._util import set_module
from daptq.quant.capture import Hessian, capturing, fan_in_rows
from daptq.quant.fake import (
    QuantConv2d,
    QuantLinear,
    code_dtype,
    fake_quantize_weight,
    group_layout,
    quantized_module_for,
    weight_as_matrix,
)
from daptq.quant.observers import ActivationObserver, check_finite, weight_qparams
from daptq.quant.spec import WeightSpec


def _column_grid(
    scale: torch.Tensor, zero_point: torch.Tensor | None, rows: int, cols: int, spec: WeightSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element scale and zero point ``[rows, cols]`` (float64) from the ``[R, G]`` grid."""
    _, groups, size = group_layout(rows, cols, spec)
    s = scale.double()
    z = torch.zeros_like(s) if zero_point is None else zero_point.double()
    if spec.granularity == "per_tensor":
        return s.expand(rows, cols), z.expand(rows, cols)
    return s.repeat_interleave(size, dim=1), z.repeat_interleave(size, dim=1)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ-round one layer's weight: ``(codes [out, fan_in], scale [R, G], zero_point [R, G] | None)``.

    ``weight``: a Linear ``[out, in]`` or Conv2d weight (flattened to ``[out, fan_in]``); ``hessian``:
    ``[fan_in, fan_in]``, e.g. ``daptq.quant.capture.Hessian().hessian`` of the layer's input rows (any
    positive multiple of ``X^T X`` gives the same result); for a grouped conv, ``[g, fan_in, fan_in]``: one
    Hessian per group of ``out / g`` consecutive output rows (``Hessian(blocks=g)``). The outputs have the
    shapes and dtypes of ``daptq.quant.quantize_weight``, so ``QuantLinear.set_quantized_weight(*gptq_quantize
    (...))`` installs them. The solve runs in float64. Example::

        h = Hessian(); capture(model, run, inputs={"fc": h}, rows=fan_in_rows)
        codes, scale, zp = gptq_quantize(model.fc.weight, h.hessian, WeightSpec(4, granularity="per_group",
                                                                                group_size=32))
    """
    if spec.is_float:
        raise ValueError("gptq_quantize: bits=16 keeps the weight float; there is nothing to quantize")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size must be a positive integer, got {block_size!r}")
    if not 0 <= damp < 1:
        raise ValueError(f"gptq_quantize: damp must be in [0, 1), got {damp!r}")
    check_finite(weight, "gptq_quantize weight")
    w2d = weight_as_matrix(weight.detach()).float()
    rows, cols = w2d.shape
    hessians = hessian.detach().double()
    if hessians.dim() == 2:
        hessians = hessians[None]
    n_blocks = hessians.shape[0]
    if hessians.dim() != 3 or tuple(hessians.shape[1:]) != (cols, cols) or rows % n_blocks:
        raise ValueError(
            f"gptq_quantize: hessian shape {tuple(hessian.shape)} != {(cols, cols)} (fan-in), or "
            f"[g, {cols}, {cols}] with g dividing the {rows} output rows (grouped conv)"
        )
    check_finite(hessians, "gptq_quantize hessian")
    _, n_groups, size = group_layout(rows, cols, spec)
    grid_rows = 1 if spec.granularity == "per_tensor" else rows
    scale, zero_point = weight_qparams(w2d.reshape(grid_rows, n_groups, size), spec)
    S, Z = _column_grid(scale, zero_point, rows, cols, spec)
    W = w2d.double()
    per_block = rows // n_blocks
    codes = torch.cat(
        [
            _solve(W[r], hessians[j], S[r], Z[r], spec, block_size, damp, act_order)
            for j in range(n_blocks)
            for r in [slice(j * per_block, (j + 1) * per_block)]
        ]
    )
    return codes.to(code_dtype(spec)), scale, zero_point


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of element-wise ops on one column: on CPU, intra-op threads only add
    a barrier per op, which on a busy 2-core machine made the solve 8x slower (92 s vs 12 s for a
    1024x2816 layer; ``benchmarks/scale.py``). Element-wise results do not depend on the thread count."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _solve(
    W: torch.Tensor,
    H: torch.Tensor,
    S: torch.Tensor,
    Z: torch.Tensor,
    spec: WeightSpec,
    block_size: int,
    damp: float,
    act_order: bool,
) -> torch.Tensor:
    """The column loop for rows ``W`` sharing the Hessian ``H``, on the fixed grid ``S, Z``: float codes."""
    cols = W.shape[1]
    # At most two [cols, cols] float64 matrices besides the caller's H live at once (at fan-in 11008 each
    # is 970 MB): the permuted copy is the working one, each factor frees its input.
    diag = H.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1.0
    perm = (
        torch.argsort(diag, descending=True, stable=True)
        if act_order
        else torch.arange(cols, device=H.device)
    )
    W, H, S, Z = W[:, perm], H[perm][:, perm], S[:, perm], Z[:, perm]
    dead = dead[perm]
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
        del H
        H_inv = torch.cholesky_inverse(L)
        del L
        U = torch.linalg.cholesky(H_inv, upper=True)
        del H_inv
    except torch.linalg.LinAlgError:
        raise ValueError(
            f"gptq_quantize: the Hessian is not positive definite after damp={damp}; "
            "use more calibration data or a larger damp"
        ) from None
    qmin, qmax = spec.qmin, spec.qmax
    codes = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # The block transposed ([block, rows]), so each column of W is one contiguous row: the same
        # element-wise arithmetic as on W's strided columns (bitwise equal codes), 2-3x faster.
        W1 = W[:, i1:i2].T.contiguous()
        S1, Z1 = S[:, i1:i2].T.contiguous(), Z[:, i1:i2].T.contiguous()
        U1 = U[i1:i2, i1:i2]
        q1, err1 = torch.empty_like(W1), torch.empty_like(W1)
        with _one_cpu_thread(W.device):
            for i in range(i2 - i1):
                w, s, z = W1[i], S1[i], Z1[i]
                q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
                q1[i] = q
                err = (w - (q - z) * s) / U1[i, i]
                W1[i:] -= U1[i, i:, None] * err[None, :]
                err1[i] = err
        codes[:, i1:i2] = q1.T
        W[:, i2:] -= err1.T.contiguous() @ U[i1:i2, i2:]  # the lazy update of every later block
    return codes[:, torch.argsort(perm)]


def gptq_quantize_layer_(
    layer: QuantLinear | QuantConv2d,
    hessian: torch.Tensor,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> None:
    """Run ``gptq_quantize`` on a fake-quant layer with its own spec and install the result (the float
    ``weight`` is kept unchanged for inspection and undo)."""
    if not isinstance(layer, QuantLinear | QuantConv2d):
        raise ValueError(f"gptq_quantize_layer_: expected a fake-quant layer, got {type(layer).__name__}")
    layer.set_quantized_weight(
        *gptq_quantize(layer.weight, hessian, layer.spec.weight, block_size, damp, act_order)
    )


# ---- the method -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    """GPTQ: rounding with inverse-Hessian error feedback, layer by layer.

    ``sequential``: block by block in one calibration pass (``daptq.methods.sequential``, as
    llm-compressor's sequential pipeline): each repeated block's Hessians are measured on the quantized
    outputs of the block before it; modules outside blocks and each stack's first block on float inputs.
    False (default) measures every Hessian on the float model in one pass. On the reference VLA at W4A8
    (8 calibration trajectories, held-out chunk error, ``python benchmarks/gptq_sequential.py``, loaded
    2-core machine): one pass 0.0173 in 47 s, sequential 0.0161 in 66 s; the per-layer form it replaced
    (one whole-model pass per layer, each layer after every earlier one rounded) 0.0193 in 807 s, with
    77.8% of the codes equal to the new one's.
    ``block_size``, ``damp``, ``act_order``: see ``gptq_quantize``. ``rotation``: "hadamard" folds
    randomized Hadamard rotations into the weights before the Hessians are measured
    (``daptq.methods.rotation``). ``step_scales``: static activation scales per denoising step for the
    action head (``daptq.methods.step_scales``; not with ``sequential``)."""

    VERSION = 1
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    sequential: bool = False
    rotation: str | None = None
    step_scales: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rotation(self.rotation, "GPTQConfig.rotation")
        if self.step_scales and self.sequential:
            raise ValueError("GPTQConfig: step_scales is not available with sequential=True")
        if self.block_size < 1:
            raise ValueError(f"GPTQConfig.block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"GPTQConfig.damp must be in [0, 1), got {self.damp}")


class _Tee:
    """One capture site feeding several reductions."""

    def __init__(self, *reductions: Any) -> None:
        self.reductions = reductions

    def update(self, rows: torch.Tensor) -> None:
        for r in self.reductions:
            r.update(rows)


class _CallOrder:
    def __init__(self) -> None:
        self.order: list[str] = []

    def hook(self, name: str):
        def record(_module, _args):
            if name not in self.order:
                self.order.append(name)

        return record


def _blocks(module: nn.Module) -> int:
    """How many Hessians a layer needs: one per group of a grouped conv, else one."""
    return module.groups if isinstance(module, nn.Conv2d) else 1


def _relative_output_errors(w: torch.Tensor, wqs: Sequence[torch.Tensor], h: torch.Tensor) -> list[float]:
    """``tr(dW H dW^T) / tr(W H W^T)`` for each ``wq`` in ``wqs`` (``dW = W - wq``): the layer's relative
    squared output error on calibration inputs (``h`` ``[fan_in, fan_in]`` or one per row group, ``[g,
    fan_in, fan_in]``). A diagnostic: each form costs a matmul as large as GPTQ's own updates (at fan-in
    11008, three of them cost more than the solve in float64), so it runs in float32 (sums of
    non-negative quadratic forms: relative error ~1e-6) with the denominator computed once."""
    h = (h if h.dim() == 3 else h[None]).float()

    def form(t: torch.Tensor) -> float:
        t = t.float().reshape(h.shape[0], -1, h.shape[-1])
        return float(torch.einsum("gij,gjk,gik->", t, h, t).double())

    den = form(w)
    return [form(w.float() - wq.float()) / den if den > 0 else 0.0 for wq in wqs]


@register_method(GPTQConfig, name="gptq")
class GPTQ(Method):
    """Layer by layer in execution order: capture the input Hessian, solve with ``gptq_quantize``, install."""

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self._order: list[str] = []
        self._hessians: dict[str, Hessian] = {}
        self._observers: dict[str, ActivationObserver] = {}
        self._batches: Sequence[Mapping[str, torch.Tensor]] = ()
        self._steps: StepObservers | None = None

    def calibrate(self, adapter: VLAAdapter, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        plan = require_plan(self)
        if not batches:
            raise ValueError("GPTQ needs calibration batches")
        self._batches = batches
        if self.config.sequential:
            return  # one pass block by block in apply (daptq.methods.sequential.run_sequential)
        model = adapter.model
        weights = [n for n, m in plan.modules.items() if not m.spec.weight.is_float]
        calls = _CallOrder()
        for name in plan.modules:
            self.register_forward_pre_hook(model.get_submodule(name), calls.hook(name))
        self._hessians = {n: Hessian(_blocks(model.get_submodule(n))) for n in weights}
        self._observers = {
            n: ActivationObserver(plan.modules[n].spec.activation, n)
            for n in static_activation_layers(plan.specs)
        }
        sites: dict[str, Any] = {}
        for n in plan.modules:
            parts = [r for r in (self._hessians.get(n), self._observers.get(n)) if r is not None]
            if parts:
                sites[n] = _Tee(*parts)
        if self.config.step_scales:  # per-denoising-step ranges of the static layers (method-owned hooks)
            self._steps = StepObservers(adapter, {n: o.spec for n, o in self._observers.items()}, "GPTQ")
            self._steps.attach(self, adapter)
        with capturing(model, inputs=sites, rows=fan_in_rows) if sites else contextlib.nullcontext():
            calibration_run(adapter, batches)(model)
        never = [n for n in plan.modules if n not in calls.order]
        if never:
            raise ValueError(f"GPTQ: calibration never ran these in-scope modules: {never}")
        self._order = calls.order

    def apply(self, adapter: VLAAdapter) -> None:
        if self.config.sequential:
            from daptq.methods.sequential import run_sequential

            self.decisions["sequential"] = run_sequential(self, adapter, self._batches)
            return
        self.decisions["layers"] = {}
        self.apply_modules(adapter, list(self._order))
        if self._steps is not None:
            self.decisions[STEP_SCALES] = install_observed_step_scales(adapter, self._steps)

    # ---- block by block (daptq.methods.sequential) --------------------------------------------------------
    def sequential_propagation(self) -> str:
        """``sequential=True``: each block's Hessians are measured on the quantized previous block's outputs,
        in one pass per block (not one whole-model pass per layer)."""
        return "quantized" if self.config.sequential else "float"

    def calibrate_modules(self, adapter: VLAAdapter, names: Sequence[str], run: Callable[[], None]) -> None:
        plan = require_plan(self)
        if not names:
            return
        model = adapter.model
        static = set(static_activation_layers(plan.specs))
        calls = _CallOrder()
        sites: dict[str, Any] = {}
        for n in names:
            self.register_forward_pre_hook(model.get_submodule(n), calls.hook(n))
            if not plan.modules[n].spec.weight.is_float:
                self._hessians[n] = Hessian(_blocks(model.get_submodule(n)))
            if n in static:
                self._observers[n] = ActivationObserver(plan.modules[n].spec.activation, n)
            parts = [r for r in (self._hessians.get(n), self._observers.get(n)) if r is not None]
            if parts:
                sites[n] = _Tee(*parts)
        with capturing(model, inputs=sites, rows=fan_in_rows) if sites else contextlib.nullcontext():
            run()
        never = [n for n in names if n not in calls.order]
        if never:
            raise ValueError(f"GPTQ: calibration never ran these in-scope modules: {never}")
        self._order.extend(calls.order)

    def apply_modules(self, adapter: VLAAdapter, names: Sequence[str]) -> None:
        plan = require_plan(self)
        model, cfg = adapter.model, self.config
        wanted = set(names)
        layers = self.decisions.setdefault("layers", {})
        for name in [n for n in self._order if n in wanted]:
            spec = plan.modules[name].spec
            hessian, observer = self._hessians.pop(name, None), self._observers.pop(name, None)
            layer = quantized_module_for(model.get_submodule(name), spec, name, round_now=False)
            info: dict[str, Any] = {"order": self._order.index(name)}
            if hessian is None:
                layer.requantize(name)  # float weight (bits=16) with quantized activations
            else:
                h = hessian.hessian
                gptq_quantize_layer_(layer, h, cfg.block_size, cfg.damp, cfg.act_order)
                w2d = weight_as_matrix(layer.weight.detach())
                info["rows_seen"] = hessian.count
                info["rel_output_error"], info["rtn_rel_output_error"] = _relative_output_errors(
                    w2d,
                    [weight_as_matrix(layer.dequantized_weight()), fake_quantize_weight(w2d, spec.weight)],
                    h,
                )
                del h
            if observer is not None:
                layer.set_activation_qparams(*observer.compute())
                info["activation_scale"] = float(layer.act_scale)
            set_module(model, name, layer)
            layers[name] = info
        self.decisions["order"] = list(self._order)
