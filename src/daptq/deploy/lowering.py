"""Lower daptq's fake-quant layers to ONNX Runtime kernels with daptq's own integer codes and scales.

Each lowered module computes, in PyTorch, exactly what its ONNX graph computes (so tracing and tests agree),
and its ONNX form is emitted by ``torch.autograd.Function.symbolic`` during ``torch.onnx.export``
(TorchScript exporter). Kernels, chosen per layer from its spec:

- ``matmul_nbits``: W4 or W8 weights (per group / channel / tensor, symmetric or affine) as
  ``com.microsoft::MatMulNBits``. Codes are stored unsigned (symmetric code c -> c + 2^(b-1), which is the
  kernel's default zero point), low nibble first; per-channel and per-tensor scales are repeated over
  blocks of 32, which dequantizes to the same weight. ``accuracy_level`` 1 computes in fp32 (exact against
  fake-quant); 4 quantizes the activation to int8 inside the kernel (blockwise along K, symmetric): the W4A8
  kernel, whose activation rounding differs from daptq's per-token rounding (bounded, see the tests).
- ``matmul_integer``: W8A8 with int8 symmetric per-channel/per-tensor weights and int8 symmetric activations
  (per token at run time, or the calibrated static scale): ``MatMulInteger`` with int32 accumulation, then
  one float rescale. Same numbers as ``daptq.quant.Int8DynamicLinear``.
- ``matmul_integer_u8s8``: symmetric per-channel/per-tensor weights whose codes all satisfy |c| <= 64 (every
  2/3/4-bit grid; an 8-bit layer only if its codes happen to fit) with int8 symmetric activations:
  ``MatMulInteger`` with uint8 activations (daptq's int8 codes + 128, zero point 128) x int8 weight codes,
  MLAS' fastest integer kernel on AVX2 (the W4A8 path at the int8 rate; MatMulNBits' int8 path runs at about
  the fp32 rate without VNNI). Without VNNI the kernel sums pairs of uint8 x int8 products in int16, which
  saturates for |c| > 64 (2 * 255 * 64 = 32640 fits, 2 * 255 * 127 does not): such codes are refused, never
  run. Exact: the same integers and rescale as ``matmul_integer``.
- ``matmul_nbits_mixed``: a mixed-width layer (QVLA's per-row widths): one MatMulNBits per integer width
  group (8, 4, 2 bits, accuracy_level 1), an fp32 MatMul on the float16 rows, Concat, Gather to row order.
- ``dequantized_fp32``: everything else (Conv2d, 2/3-bit, group sizes the kernels do not take): the
  dequantized weight in fp32 and, if the spec has one, the activation fake-quant emulated with graph ops.
  Exact weights, no integer kernel; listed as such in the export report, never silent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from daptq.quant import QuantConv2d, QuantLinear, ideal_weight_bytes
from daptq.quant.fake import dynamic_token_qparams, fake_quantize_activation

NBITS_BLOCK = 32  # block length used when a per-channel/per-tensor scale is repeated over blocks
NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)  # power-of-two blocks MatMulNBits accepts
ACCURACY_FP32 = 1
ACCURACY_INT8 = 4
W4A8Kernel = Literal["int8", "emulate"]


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is deployed: the kernel, its accuracy level and its weight bytes."""

    name: str
    kind: str  # "linear" | "conv2d"
    spec: str
    kernel: str  # "matmul_nbits" | "matmul_integer" | "matmul_integer_u8s8" | "dequantized_fp32"
    accuracy_level: int | None
    activation: str  # how the input is rounded at run time
    ideal_bytes: int
    stored_bytes: int
    out_features: int
    fan_in: int
    decision: str = ""  # the measured cost model's reason, where one chose the kernel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the custom ops ---------------------------------------------------------------------------------------
class _MatMulNBits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scales, zero_points, weight, k, n, bits, block_size, accuracy_level):
        return x.float() @ weight.t()

    @staticmethod
    def symbolic(g, x, packed, scales, zero_points, weight, k, n, bits, block_size, accuracy_level):
        inputs = [x, packed, scales] + ([] if _is_none(zero_points) else [zero_points])
        y = g.op(
            "com.microsoft::MatMulNBits",
            *inputs,
            K_i=k,
            N_i=n,
            bits_i=bits,
            block_size_i=block_size,
            accuracy_level_i=accuracy_level,
        )
        sizes = x.type().varyingSizes()  # tell the exporter's shape inference: [..., K] -> [..., N]
        if sizes is not None:
            y.setType(x.type().with_dtype(torch.float32).with_sizes([*sizes[:-1], n]))
        return y


class _MatMulInteger(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, weight_t):
        return (q.to(torch.int32) @ weight_t.to(torch.int32)).to(torch.int32)

    @staticmethod
    def symbolic(g, q, weight_t):
        return g.op("MatMulInteger", q, weight_t)


U8S8_ZERO_POINT = 128  # uint8 activation = int8 code + 128
U8S8_MAX_CODE = 64  # |weight code| above this can saturate MLAS' int16 pair sums without VNNI


class _MatMulIntegerU8S8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight_t):
        return ((u.to(torch.int32) - U8S8_ZERO_POINT) @ weight_t.to(torch.int32)).to(torch.int32)

    @staticmethod
    def symbolic(g, u, weight_t):
        zero_point = g.op("Constant", value_t=torch.tensor(U8S8_ZERO_POINT, dtype=torch.uint8))
        return g.op("MatMulInteger", u, weight_t, zero_point)


def _is_none(value: Any) -> bool:
    if value is None:
        return True
    node = getattr(value, "node", None)
    return node is not None and node().mustBeNone()


# ---- lowered modules --------------------------------------------------------------------------------------
def _pack_codes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, blocks, bs] codes in [0, 2^bits) -> MatMulNBits' B: uint8 [N, blocks, bs*bits/8], low first."""
    u = unsigned.to(torch.uint8)
    if bits == 8:
        return u.contiguous()
    per = 8 // bits
    out = u[..., 0::per].clone()
    for j in range(1, per):
        out |= u[..., j::per] << (bits * j)
    return out.contiguous()


def _nbits_block(layer: QuantLinear) -> int | None:
    ws = layer.spec.weight
    if ws.granularity == "per_group":
        return ws.group_size if ws.group_size in NBITS_BLOCK_SIZES else None
    return NBITS_BLOCK


class NBitsLinear(nn.Module):
    """A W4/W8 layer as MatMulNBits (see the module docstring for the layout and accuracy levels)."""

    def __init__(self, layer: QuantLinear, accuracy_level: int, emulate_activation: bool) -> None:
        super().__init__()
        ws = layer.spec.weight
        block = _nbits_block(layer)
        if ws.bits not in (4, 8) or block is None:
            raise ValueError(
                f"MatMulNBits takes 4/8-bit weights with blocks {NBITS_BLOCK_SIZES}: {ws.short()}"
            )
        n, k = layer.out_features, layer.in_features
        blocks = -(-k // block)
        codes = layer.qweight.to(torch.int32)
        scale = layer.weight_scale.float()
        zp = None if ws.symmetric else layer.weight_zero_point.to(torch.int32)
        if ws.granularity != "per_group":  # repeat one scale (and zero point) per row over every block
            scale = scale.expand(n, 1).expand(n, blocks).contiguous()
            zp = None if zp is None else zp.expand(n, 1).expand(n, blocks).contiguous()
        unsigned = codes + (1 << (ws.bits - 1)) if ws.symmetric else codes
        if blocks * block != k:  # pad K with the zero code; the activation is only k wide
            pad_value = (1 << (ws.bits - 1)) if zp is None else 0
            pad = torch.full((n, blocks * block - k), pad_value, dtype=torch.int32)
            if zp is not None:  # padded codes must dequantize to 0: use each row's last-block zero point
                pad = zp[:, -1:].expand_as(pad).clone()
            unsigned = torch.cat([unsigned, pad], dim=1)
        self.k, self.n, self.bits, self.block_size = k, n, ws.bits, block
        self.accuracy_level = accuracy_level
        self.spec = layer.spec
        self.emulate_activation = emulate_activation and layer.spec.activation is not None
        self.register_buffer("packed", _pack_codes(unsigned.reshape(n, blocks, block), ws.bits))
        self.register_buffer("scales", scale.reshape(-1).contiguous())
        if zp is None:
            self.zero_points = None
        elif ws.bits == 8:
            self.register_buffer("zero_points", zp.to(torch.uint8).reshape(-1).contiguous())
        else:  # 4-bit zero points: packed two per byte along the blocks of a row
            zp4 = zp if blocks % 2 == 0 else torch.cat([zp, torch.zeros(n, 1, dtype=zp.dtype)], dim=1)
            self.register_buffer("zero_points", _pack_codes(zp4, 4).reshape(-1).contiguous())
        # The fp32 weight the kernel dequantizes to: only for the PyTorch-side trace, not exported.
        self._weight = layer.dequantized_weight().detach().float()
        self._act_scale, self._act_zero_point = layer.act_scale, layer.act_zero_point
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)

    def stored_bytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emulate_activation:
            x = fake_quantize_activation(x, self.spec.activation, self._act_scale, self._act_zero_point, -1)
        y = _MatMulNBits.apply(
            x,
            self.packed,
            self.scales,
            self.zero_points,
            self._weight,
            self.k,
            self.n,
            self.bits,
            self.block_size,
            self.accuracy_level,
        )
        return y if self.bias is None else y + self.bias


class Int8MatMulIntegerLinear(nn.Module):
    """W8A8: int8 activation (per token or static) x int8 weight via MatMulInteger, int32 accumulation."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        if not matmul_integer_fits(layer):
            raise ValueError(
                f"MatMulInteger needs symmetric int8 weights and activations: {layer.spec.short()}"
            )
        self.spec = layer.spec
        self.out_features = layer.out_features
        self.register_buffer("weight_t", layer.qweight.to(torch.int8).t().contiguous())  # [K, N]
        self.register_buffer("weight_scale", layer.weight_scale.float().reshape(1, -1).contiguous())
        a = layer.spec.activation
        self.static = a.mode == "static_per_tensor"
        if self.static:
            self.register_buffer("act_scale", layer.act_scale.float().reshape(1).clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)

    def stored_bytes(self) -> int:
        return self.weight_t.nbytes + self.weight_scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.static:
            scale_x = self.act_scale
        else:
            scale_x, _ = dynamic_token_qparams(xf, self.spec.activation, dim=-1)
        q = torch.clamp(torch.round(xf / scale_x), -128, 127).to(torch.int8)
        # Weight scale first, token scale second: ONNX Runtime's MatMulIntegerToFloat fusion of
        # Cast(MatMulInteger) * (a_scale * b_scale) reads a per-token a_scale wrongly (measured, ORT 1.31).
        y = (_MatMulInteger.apply(q, self.weight_t).float() * self.weight_scale) * scale_x
        return y if self.bias is None else y + self.bias


class U8S8MatMulIntegerLinear(nn.Module):
    """Int4-range weights (|code| <= 64, symmetric per channel/tensor) x int8 activations (per token or
    static) via MatMulInteger on uint8 activations (code + 128, zero point 128): daptq's exact numbers at
    MLAS' u8s8 rate. Codes beyond +-64 are refused (they can saturate without VNNI)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        if not matmul_integer_u8s8_fits(layer):
            raise ValueError(
                f"u8s8 MatMulInteger needs symmetric per-channel/per-tensor weights with codes in "
                f"[-{U8S8_MAX_CODE}, {U8S8_MAX_CODE}] and symmetric int8 activations: {layer.spec.short()}"
                + ("" if layer.qweight is None else f", max |code| {_max_abs_code(layer)}")
            )
        self.spec = layer.spec
        self.out_features = layer.out_features
        self.qmin, self.qmax = layer.spec.activation.qmin, layer.spec.activation.qmax
        self.register_buffer("weight_t", layer.qweight.to(torch.int8).t().contiguous())  # [K, N]
        self.register_buffer("weight_scale", layer.weight_scale.float().reshape(1, -1).contiguous())
        self.static = layer.spec.activation.mode == "static_per_tensor"
        if self.static:
            self.register_buffer("act_scale", layer.act_scale.float().reshape(1).clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)

    def stored_bytes(self) -> int:
        return self.weight_t.nbytes + self.weight_scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.static:
            scale_x = self.act_scale
        else:
            scale_x, _ = dynamic_token_qparams(xf, self.spec.activation, dim=-1)
        q = torch.clamp(torch.round(xf / scale_x), self.qmin, self.qmax)  # daptq's int8 code, in float
        u = (q + U8S8_ZERO_POINT).to(torch.uint8)  # exact: an integer in [0, 255]
        # Weight scale first, token scale second (ORT's MatMulIntegerToFloat fusion, see Int8MatMulInteger).
        y = (_MatMulIntegerU8S8.apply(u, self.weight_t).float() * self.weight_scale) * scale_x
        return y if self.bias is None else y + self.bias


class DequantizedLinear(nn.Module):
    """fp32 MatMul on the dequantized weight, activation fake-quant emulated (no integer kernel)."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.spec = layer.spec
        self.weight = nn.Parameter(layer.dequantized_weight().detach().float().clone(), False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)
        self._act = (layer.act_scale, layer.act_zero_point)

    def stored_bytes(self) -> int:
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.activation is not None:
            x = fake_quantize_activation(x, self.spec.activation, *self._act, -1)
        return F.linear(x.float(), self.weight, self.bias)


class DequantizedConv2d(nn.Module):
    """fp32 Conv on the dequantized weight, activation fake-quant (per pixel) emulated; keeps a TF-style
    "same" conv's input padding (EfficientNet)."""

    def __init__(self, layer: QuantConv2d) -> None:
        super().__init__()
        self.spec = layer.spec
        self.static_padding = getattr(layer, "static_padding", None)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.weight = nn.Parameter(layer.dequantized_weight().detach().float().clone(), False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)
        self._act = (layer.act_scale, layer.act_zero_point)

    def stored_bytes(self) -> int:
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_padding is not None:
            x = self.static_padding(x)
        if self.spec.activation is not None:
            x = fake_quantize_activation(x, self.spec.activation, *self._act, 1)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MixedNBitsLinear(nn.Module):
    """A mixed-width layer (QVLA's per-row widths) as one MatMulNBits per integer width group (8, 4 and 2
    bits; symmetric codes, each row's scale repeated over blocks of 32; accuracy_level 1, fp32), an fp32
    MatMul on the float16 rows (stored float16, cast at run time), a Concat and a Gather back to row order;
    pruned rows read a zero column. The activation, if any, is rounded as daptq does (graph ops). Up to four
    GEMMs on row slices instead of one: a real kernel path, not a fast one."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        bits = torch.as_tensor(layer.row_widths(), dtype=torch.int64)
        k, n = layer.in_features, layer.out_features
        blocks = -(-k // NBITS_BLOCK)
        self.k, self.n, self.activation = k, n, layer.activation
        weight = layer.dequantized_weight().detach().float()
        self.groups: list[tuple[int, int]] = []  # (bits, rows), in output order of the concat
        order = []
        for b in (8, 4, 2):
            rows = (bits == b).nonzero().flatten()
            if rows.numel() == 0:
                continue
            codes = layer.qweight[rows].to(torch.int32) + (1 << (b - 1))  # the kernel's default zero point
            pad = torch.full((rows.numel(), blocks * NBITS_BLOCK - k), 1 << (b - 1), dtype=torch.int32)
            packed = _pack_codes(torch.cat([codes, pad], 1).reshape(-1, blocks, NBITS_BLOCK), b)
            scales = layer.weight_scale[rows].float()[:, None].expand(-1, blocks).reshape(-1).contiguous()
            self.register_buffer(f"packed_{b}", packed)
            self.register_buffer(f"scales_{b}", scales)
            setattr(self, f"_weight_{b}", weight[rows])  # the PyTorch-side trace only, not exported
            self.groups.append((b, rows.numel()))
            order.append(rows)
        rows16 = (bits == 16).nonzero().flatten()
        self.register_buffer("rows_16", layer.row_float[rows16].detach().half().contiguous())
        order.append(rows16)
        position = torch.full((n,), -1, dtype=torch.int64)
        concat = torch.cat(order)
        position[concat] = torch.arange(concat.numel())
        position[position < 0] = concat.numel()  # pruned rows: the appended zero column
        self.register_buffer("gather", position)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), False)
        self.row_bits = bits

    def stored_bytes(self) -> int:
        """Bytes of the exported weight initializers (codes, scales, float16 rows; the gather index is not a
        weight and is left out, as the checkpoint's width map is counted by ``mixed_weight_bytes``)."""
        groups = sum(
            getattr(self, f"packed_{b}").nbytes + getattr(self, f"scales_{b}").nbytes for b, _ in self.groups
        )
        return groups + self.rows_16.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            x = fake_quantize_activation(x, self.activation, None, None, -1)
        x = x.float()
        outs = [
            _MatMulNBits.apply(
                x,
                getattr(self, f"packed_{b}"),
                getattr(self, f"scales_{b}"),
                None,
                getattr(self, f"_weight_{b}"),
                self.k,
                rows,
                b,
                NBITS_BLOCK,
                ACCURACY_FP32,
            )
            for b, rows in self.groups
        ]
        if self.rows_16.shape[0]:
            outs.append(F.linear(x, self.rows_16.float()))
        y = torch.cat(outs, dim=-1) if outs else x[..., :0]  # every row pruned: only the zero column
        y = F.pad(y, (0, 1)).index_select(-1, self.gather)
        return y if self.bias is None else y + self.bias


def lower_mixed_layer(layer: nn.Module, name: str = "layer") -> tuple[nn.Module, LayerPlan]:
    """The deployable module and plan of a mixed-width layer (see ``MixedNBitsLinear``)."""
    from daptq.quant.bytes import mixed_spec_text, mixed_weight_bytes

    bits = [int(b) for b in layer.row_widths()]
    module = MixedNBitsLinear(layer)
    a = layer.activation
    act = "none" if a is None else f"{a.short()} (emulated)"
    ideal, _ = mixed_weight_bytes(bits, layer.in_features)
    plan = LayerPlan(
        name,
        "linear",
        mixed_spec_text(bits),
        "matmul_nbits_mixed",
        ACCURACY_FP32,
        act,
        ideal,
        module.stored_bytes(),
        layer.out_features,
        layer.in_features,
    )
    return module, plan


def matmul_integer_fits(layer: QuantLinear) -> bool:
    ws, a = layer.spec.weight, layer.spec.activation
    return (
        ws.bits == 8
        and ws.symmetric
        and ws.granularity in ("per_channel", "per_tensor")
        and a is not None
        and a.bits == 8
        and a.symmetric
    )


def _max_abs_code(layer: QuantLinear) -> int:
    return int(layer.qweight.to(torch.int32).abs().max())  # int8 abs(-128) would wrap to -128


def matmul_integer_u8s8_fits(layer: QuantLinear) -> bool:
    """Symmetric per-channel/per-tensor weights whose codes are all within +-64 (checked on the codes, so
    an 8-bit layer qualifies only if its codes fit) and symmetric int8 activations."""
    ws, a = layer.spec.weight, layer.spec.activation
    return (
        not ws.is_float
        and ws.bits <= 8
        and ws.symmetric
        and ws.codebook == "uniform"
        and ws.granularity in ("per_channel", "per_tensor")
        and a is not None
        and a.bits == 8
        and a.symmetric
        and -128 <= a.qmin
        and a.qmax <= 127
        and layer.qweight is not None
        and _max_abs_code(layer) <= U8S8_MAX_CODE
    )


def integer_kernel(layer: QuantLinear) -> str | None:
    """The integer kernel ``lower_layer`` gives a linear layer (None: fp32 on the dequantized weight)."""
    a = layer.spec.activation
    if matmul_integer_u8s8_fits(layer):
        return "matmul_integer_u8s8"
    if a is not None and matmul_integer_fits(layer):
        return "matmul_integer"
    if layer.spec.weight.bits in (4, 8) and _nbits_block(layer) is not None:
        return "matmul_nbits"
    return None


def lower_layer(
    layer: QuantLinear | QuantConv2d, name: str = "layer", w4a8_kernel: W4A8Kernel = "int8"
) -> tuple[nn.Module, LayerPlan]:
    """The deployable module for one fake-quant layer and its plan.

    ``w4a8_kernel="int8"`` runs 4-bit layers with an activation spec on MatMulNBits' int8 path
    (accuracy_level 4, the kernel's own blockwise activation rounding); ``"emulate"`` rounds the activation
    exactly as daptq does (graph ops) and computes the matmul in fp32 (accuracy_level 1): slower, exact.
    """
    if w4a8_kernel not in ("int8", "emulate"):
        raise ValueError(f"w4a8_kernel must be 'int8' or 'emulate', got {w4a8_kernel!r}")
    if layer.spec.weight.is_float:
        raise ValueError(f"{name}: float-weight layers are exported as they are, not lowered")
    if layer.qweight is None:
        raise ValueError(f"{name}: not quantized yet (no codes); call requantize()")
    if not layer.is_calibrated:
        raise ValueError(f"{name}: static activation scale not calibrated")
    spec, a = layer.spec, layer.spec.activation
    act = "none" if a is None else a.short()
    ideal = ideal_weight_bytes(layer.weight.shape[0], layer.weight[0].numel(), spec.weight)  # daptq's count
    level: int | None
    if isinstance(layer, QuantConv2d):
        module: nn.Module = DequantizedConv2d(layer)
        kernel, level = "dequantized_fp32", None
        act = "none" if a is None else f"{act} (emulated)"
        kind = "conv2d"
    else:
        kind = "linear"
        chosen = integer_kernel(layer)
        if chosen == "matmul_integer_u8s8":
            module, kernel, level = U8S8MatMulIntegerLinear(layer), chosen, None
        elif chosen == "matmul_integer":
            module, kernel, level = Int8MatMulIntegerLinear(layer), "matmul_integer", None
        elif chosen == "matmul_nbits":
            int8_path = a is not None and a.bits == 8 and w4a8_kernel == "int8"
            level = ACCURACY_INT8 if int8_path else ACCURACY_FP32
            module, kernel = NBitsLinear(layer, level, emulate_activation=not int8_path), "matmul_nbits"
            if a is not None:
                act = "int8 blockwise (kernel)" if int8_path else f"{act} (emulated)"
        else:
            module, kernel, level = DequantizedLinear(layer), "dequantized_fp32", None
            act = "none" if a is None else f"{act} (emulated)"
    out_f, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    plan = LayerPlan(
        name, kind, spec.short(), kernel, level, act, ideal, module.stored_bytes(), out_f, fan_in
    )
    return module, plan


# what a cost model may replace by fp32
INTEGER_KERNELS = ("matmul_nbits", "matmul_integer", "matmul_integer_u8s8")


def measure_lowered_costs(
    model: nn.Module,
    rows: dict[str, int],
    w4a8_kernel: W4A8Kernel = "int8",
    threads: int = 1,
    repeats: int = 5,
) -> dict[str, Any]:
    """Per fake-quant linear with an integer kernel: ``LayerCost`` of that kernel and of the fp32 MatMul on
    its dequantized weight (activation rounding emulated: the exact twin), each exported alone and run on
    ONNX Runtime at the rows the layer sees per call (``record_layer_rows``; 1 where unseen), best of
    ``repeats``. Layers of one shape and spec are measured once."""
    import time

    import numpy as np

    from daptq.deploy.export import export_onnx
    from daptq.deploy.runtime import make_session
    from daptq.quant.kernels import LayerCost

    def seconds(module: nn.Module, x: torch.Tensor) -> float:
        graph = export_onnx(module, (x,), ["x"], ["y"], {"x": {0: "rows"}})
        session = make_session(graph.SerializeToString(), threads)
        feed = {"x": x.numpy()}
        session.run(None, feed)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            best = min(best, time.perf_counter() - start)
        return best

    out: dict[str, Any] = {}
    by_shape: dict[tuple, Any] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear) or layer.spec.weight.is_float or layer.qweight is None:
            continue
        if integer_kernel(layer) is None:  # lower_layer's own test: no integer kernel, nothing to decide
            continue
        key = (rows.get(name, 1), layer.in_features, layer.out_features, layer.spec.short())
        if key not in by_shape:  # one measurement per shape and spec; modules freed before the next
            module, plan = lower_layer(layer, name, w4a8_kernel)
            x = torch.from_numpy(np.random.default_rng(0).standard_normal((key[0], key[1]), np.float32))
            by_shape[key] = LayerCost(seconds(module, x), seconds(DequantizedLinear(layer), x))
            del module
        out[name] = by_shape[key]
    return out


def lower_model_(
    model: nn.Module, w4a8_kernel: W4A8Kernel = "int8", cost_model: dict[str, Any] | None = None
) -> list[LayerPlan]:
    """Replace every fake-quant layer of ``model`` (in place; pass a copy) by its deployable module; a
    mixed-width layer (QVLA, ``row_widths()``) becomes a ``MixedNBitsLinear``. ``cost_model``
    (``measure_lowered_costs``, by layer name): a layer whose integer kernel is not faster than the fp32
    MatMul on its dequantized weight is exported as that (its activation rounding emulated: the evaluated
    numbers), and every measured layer's plan says why (``decision``)."""
    plans = []
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear | QuantConv2d) or callable(getattr(m, "row_widths", None))
    ]
    for name, layer in targets:
        if callable(getattr(layer, "row_widths", None)):
            module, plan = lower_mixed_layer(layer, name)
        else:
            module, plan = lower_layer(layer, name, w4a8_kernel)
            cost = (cost_model or {}).get(name)
            if cost is not None and plan.kernel in INTEGER_KERNELS:
                times = f"{plan.kernel} {cost.packed_s * 1e3:.3f} ms vs fp32 {cost.float_s * 1e3:.3f} ms"
                if cost.packed_s < cost.float_s:
                    plan = replace(plan, decision=f"cost model: {times}")
                else:
                    module = DequantizedLinear(layer)
                    a = layer.spec.activation
                    plan = replace(
                        plan,
                        kernel="dequantized_fp32",
                        accuracy_level=None,
                        activation="none" if a is None else f"{a.short()} (emulated)",
                        stored_bytes=module.stored_bytes(),
                        decision=f"cost model: {times}; the integer kernel does not pay, fp32",
                    )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        plans.append(plan)
    return plans
