"""Fake-quant modules: keep the float weight, the integer codes and the scales side by side.

``QuantLinear`` and ``QuantConv2d`` compute with the dequantized weight (and fake-quantized inputs when an
activation spec is set), so a model behaves exactly as its integer version would while every number stays
inspectable and undoable. Methods that compute their own rounding (GPTQ) write codes with
``set_quantized_weight``; methods that transform weights first (SmoothQuant, CSRC folding) edit ``weight`` and
call ``requantize``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .observers import check_finite, dequantize_grouped, quantize_grouped, scale_torch_dtype, weight_qparams
from .spec import ActivationSpec, QuantSpec, WeightSpec


def weight_as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear ``[out, in]`` or Conv2d ``[out, in/g, kh, kw]`` weight as ``[out, fan_in]``."""
    return weight.reshape(weight.shape[0], -1)


def group_layout(out_features: int, fan_in: int, spec: WeightSpec) -> tuple[int, int, int]:
    """(rows, groups per row, group length) of the scale grid for a ``[out, fan_in]`` weight."""
    if spec.granularity == "per_tensor":
        return 1, 1, out_features * fan_in
    if spec.granularity == "per_channel":
        return out_features, 1, fan_in
    g = spec.group_size
    assert g is not None
    if fan_in % g != 0:
        raise ValueError(f"group_size={g} does not divide the input dimension {fan_in}")
    return out_features, fan_in // g, g


def _grouped(w2d: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    rows, groups, size = group_layout(w2d.shape[0], w2d.shape[1], spec)
    return w2d.reshape(rows, groups, size)


def quantize_weight(
    weight: torch.Tensor, spec: WeightSpec, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round a weight with RTN: (codes [out, fan_in] int8/uint8, scale [R, G], zero_point [R, G] | None)."""
    if spec.is_float:
        raise ValueError(f"{name}: bits=16 keeps the float weight; there is nothing to quantize")
    check_finite(weight, name)
    w2d = weight_as_matrix(weight.detach()).float()
    try:
        groups = _grouped(w2d, spec)
    except ValueError as e:
        raise ValueError(f"{name} with shape {tuple(weight.shape)}: {e}") from None
    if spec.codebook != "uniform":
        scale, codes = codebook_round(groups, spec)
        return codes.reshape(w2d.shape).to(code_dtype(spec)), scale, None
    scale, zero_point = weight_qparams(groups, spec)
    codes = quantize_grouped(groups, scale, zero_point, spec.qmin, spec.qmax)
    return codes.reshape(w2d.shape).to(code_dtype(spec)), scale, zero_point


TERNARY_THRESHOLD = 0.7  # Ternary Weight Networks (Li et al. 2016): Delta = 0.7 * mean|w| per group


def codebook_round(groups: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Below two bits, ``groups [R, G, S]`` -> (scale [R, G] in the spec's dtype, float codes [R, G, S]).

    ternary: codes ``sign(w) * (|w| > 0.7 mean|w|)``, scale the mean |w| over the kept weights (TWN's
    closed form); binary: codes ``sign(w)`` (0 -> +1), scale ``mean |w|`` (minimizes ||w - s sign(w)||^2).
    An all-zero group gets scale 1 (its codes are 0 for ternary; binary's dequantize to +-1, so the scale is
    the dtype's smallest normal there instead)."""
    a = groups.float().abs()
    if spec.codebook == "ternary":
        keep = a > TERNARY_THRESHOLD * a.mean(dim=-1, keepdim=True)
        n = keep.sum(dim=-1)
        scale = torch.where(n > 0, (a * keep).sum(dim=-1) / n.clamp(min=1), torch.ones_like(n, dtype=a.dtype))
        codes = torch.sign(groups.float()) * keep
    elif spec.codebook == "binary":
        scale = a.mean(dim=-1)
        codes = torch.where(groups.float() >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"codebook_round: not a codebook spec ({spec.codebook!r})")
    sdt = scale_torch_dtype(spec)
    scale = scale.to(sdt)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(sdt).tiny))
    return scale, codes


def quantize_weight_with_qparams(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: WeightSpec
) -> torch.Tensor:
    """Round a weight onto a given grid (e.g. scales chosen elsewhere, as GPTQ does): integer codes."""
    check_finite(weight, "weight")
    w2d = weight_as_matrix(weight.detach()).float()
    codes = quantize_grouped(_grouped(w2d, spec), scale, zero_point, spec.qmin, spec.qmax)
    return codes.reshape(w2d.shape).to(code_dtype(spec))


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: WeightSpec
) -> torch.Tensor:
    """Float32 ``[out, fan_in]`` matrix from integer codes."""
    groups = _grouped(codes, spec)
    return dequantize_grouped(groups, scale, zero_point).reshape(codes.shape)


def fake_quantize_weight(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Quantize-dequantize a weight (same shape and dtype)."""
    if spec.is_float:
        return weight.clone()
    codes, scale, zp = quantize_weight(weight, spec)
    return dequantize_weight(codes, scale, zp, spec).reshape(weight.shape).to(weight.dtype)


def code_dtype(spec: WeightSpec) -> torch.dtype:
    return torch.int8 if spec.symmetric else torch.uint8


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10*log10(||x||^2 / ||x - q||^2), in dB (inf when exact)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def fake_quantize_activation(
    x: torch.Tensor,
    spec: ActivationSpec,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    dim: int,
) -> torch.Tensor:
    """Static per-tensor with calibrated (scale, zero_point), or dynamic per token along feature ``dim``."""
    xf = x.float()
    if spec.mode == "dynamic_per_token":
        scale, zero_point = dynamic_token_qparams(xf, spec, dim)
    else:
        assert scale is not None
    zp = 0.0 if zero_point is None else zero_point.float()
    q = torch.clamp(torch.round(xf / scale) + zp, spec.qmin, spec.qmax)
    return ((q - zp) * scale).to(x.dtype)


def dynamic_token_qparams(
    xf: torch.Tensor, spec: ActivationSpec, dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token min-max scale; shared bit for bit with the packed int8 kernel."""
    if spec.symmetric:
        amax = xf.abs().amax(dim=dim, keepdim=True)
        scale = torch.where(amax > 0, amax / spec.qmax, torch.ones_like(amax))
        return scale, None
    lo = xf.amin(dim=dim, keepdim=True).clamp(max=0.0)
    hi = xf.amax(dim=dim, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / (spec.qmax - spec.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)


class _QuantWeightMixin:
    """State and operations shared by QuantLinear and QuantConv2d."""

    spec: QuantSpec
    weight: nn.Parameter
    _feature_dim: int

    def _init_quant_state(
        self, spec: QuantSpec, original: nn.Module | None = None, name: str | None = None
    ) -> None:
        self.__dict__["_float_original"] = original  # not a submodule: given back by to_float
        self.__dict__["_layer_name"] = name  # names the layer in errors (the module does not know its path)
        self.spec = spec
        self.register_buffer("qweight", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("act_scale", None)
        self.register_buffer("act_zero_point", None)
        self.register_buffer("_dequant_cache", None, persistent=False)
        self.calibrating = False

    @property
    def _label(self) -> str:
        """The layer's name for error messages (its type if it was built without one)."""
        return self.__dict__.get("_layer_name") or type(self).__name__

    @property
    def is_calibrated(self) -> bool:
        a = self.spec.activation
        return a is None or a.mode == "dynamic_per_token" or self.act_scale is not None

    def requantize(self, name: str | None = None) -> None:
        """(Re)compute scales from the current float weight with the spec's observer and round (RTN)."""
        if self.spec.weight.is_float:
            self.qweight = self.weight_scale = self.weight_zero_point = None
            self._dequant_cache = None
            return
        codes, scale, zp = quantize_weight(self.weight, self.spec.weight, name or self._label + ".weight")
        self.set_quantized_weight(codes, scale, zp)

    def set_quantized_weight(
        self, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
    ) -> None:
        """Install externally computed codes and scales (GPTQ and friends); validated against the spec."""
        ws = self.spec.weight
        if ws.is_float:
            raise ValueError(f"{self._label}: this layer's spec keeps the weight in float (bits=16)")
        out_f = self.weight.shape[0]
        fan_in = self.weight[0].numel()
        rows, groups, _ = group_layout(out_f, fan_in, ws)
        if tuple(qweight.shape) != (out_f, fan_in):
            raise ValueError(f"{self._label}: qweight shape {tuple(qweight.shape)} != {(out_f, fan_in)}")
        if tuple(scale.shape) != (rows, groups):
            raise ValueError(f"{self._label}: scale shape {tuple(scale.shape)} != {(rows, groups)}")
        if qweight.is_floating_point() or torch.is_complex(qweight):
            raise ValueError(f"{self._label}: qweight must be an integer tensor, got {qweight.dtype}")
        if int(qweight.min()) < ws.qmin or int(qweight.max()) > ws.qmax:
            raise ValueError(f"{self._label}: codes outside [{ws.qmin}, {ws.qmax}] for {ws.bits}-bit")
        if ws.codebook == "binary" and bool((qweight == 0).any()):
            raise ValueError(f"{self._label}: binary codes are -1 or +1, got 0 (a rounding that is not sign)")
        if scale.dtype != scale_torch_dtype(ws):
            raise ValueError(
                f"{self._label}: scale dtype {scale.dtype} != spec scale_dtype {ws.scale_dtype}; "
                "round the scales to the storage dtype before computing codes"
            )
        check_finite(scale, f"{self._label} weight scale")
        if bool((scale <= 0).any()):
            raise ValueError(f"{self._label}: scales must be > 0")
        if ws.symmetric != (zero_point is None):
            raise ValueError(f"{self._label}: zero_point must be given iff the spec is asymmetric")
        if zero_point is not None:
            if tuple(zero_point.shape) != (rows, groups):
                raise ValueError(
                    f"{self._label}: zero_point shape {tuple(zero_point.shape)} != {(rows, groups)}"
                )
            if int(zero_point.min()) < ws.qmin or int(zero_point.max()) > ws.qmax:
                raise ValueError(f"{self._label}: zero points outside [{ws.qmin}, {ws.qmax}]")
            zero_point = zero_point.to(torch.uint8)
        device = self.weight.device
        self.qweight = qweight.to(device=device, dtype=code_dtype(ws))
        self.weight_scale = scale.to(device)
        self.weight_zero_point = None if zero_point is None else zero_point.to(device)
        self._dequant_cache = None

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, in the float weight's shape and dtype."""
        if self.spec.weight.is_float:
            return self.weight
        if self.qweight is None:
            raise RuntimeError(f"{self._label}: weight not quantized yet; call requantize()")
        if self._dequant_cache is None:
            w = dequantize_weight(self.qweight, self.weight_scale, self.weight_zero_point, self.spec.weight)
            self._dequant_cache = w.reshape(self.weight.shape).to(self.weight.dtype)
        return self._dequant_cache

    def set_activation_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        a = self.spec.activation
        if a is None or a.mode != "static_per_tensor":
            raise ValueError(f"{self._label}: set_activation_qparams needs a static activation spec")
        if a.symmetric != (zero_point is None):
            raise ValueError(
                f"{self._label}: activation zero_point must be given iff the activation spec is asymmetric"
            )
        self.act_scale = scale.detach().float().reshape(()).to(self.weight.device)
        self.act_zero_point = None if zero_point is None else zero_point.reshape(()).to(self.weight.device)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.spec.activation
        if a is None or self.calibrating:
            return x
        if a.mode == "static_per_tensor" and self.act_scale is None:
            raise RuntimeError(
                f"{self._label}: static activation quantization is not calibrated; run quantize_ "
                "with "
                "calibration data (or daptq.quant.calibrate) first"
            )
        return fake_quantize_activation(x, a, self.act_scale, self.act_zero_point, self._feature_dim)

    def _original_float(self) -> nn.Module | None:
        """The module this layer replaced, if it still holds the same parameters (keeps subclass types)."""
        orig = self.__dict__.get("_float_original")
        if orig is not None and orig.weight is self.weight and orig.bias is self.bias:
            return orig
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spec={self.spec.short()}"  # type: ignore[misc]


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """nn.Linear with a fake-quantized weight (and optionally fake-quantized input)."""

    _feature_dim = -1

    def __init__(
        self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, device=None, dtype=None
    ):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quant_state(spec)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, spec: QuantSpec, name: str = "linear", round_now: bool = True
    ) -> QuantLinear:
        """Wrap (sharing the float parameters) and, unless ``round_now=False``, quantize with RTN."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q._init_quant_state(spec, linear, name)
        if round_now:
            q.requantize(f"{name}.weight")
        return q

    def to_float(self) -> nn.Linear:
        """Undo: the module it replaced (or a plain nn.Linear) holding the original float weight."""
        if (orig := self._original_float()) is not None:
            return orig
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.dequantized_weight(), self.bias)


# The plain attributes nn.Conv2d's forward reads; copied when swapping to and from QuantConv2d.
_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """nn.Conv2d with a fake-quantized weight (flattened to [out, in/groups*kh*kw] for the scale grid)."""

    _feature_dim = 1

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, spec: QuantSpec, name: str = "conv", round_now: bool = True
    ) -> QuantConv2d:
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{name}: QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}"
            )
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for attr in _CONV_ATTRS:
            setattr(q, attr, getattr(conv, attr))
        q.weight, q.bias = conv.weight, conv.bias
        q.static_padding = static_same_padding(conv)  # TF-style "same" convs pad their input first
        q._init_quant_state(spec, conv, name)
        if round_now:
            q.requantize(f"{name}.weight")
        return q

    def to_float(self) -> nn.Conv2d:
        if (orig := self._original_float()) is not None:
            return orig
        if self.static_padding is not None:
            raise ValueError("to_float: a same-padding conv can only be restored to the module it replaced")
        conv = nn.Conv2d.__new__(nn.Conv2d)
        nn.Module.__init__(conv)
        for attr in _CONV_ATTRS:
            setattr(conv, attr, getattr(self, attr))
        conv.weight, conv.bias = self.weight, self.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_padding is not None:
            x = self.static_padding(x)
        return self._conv_forward(self._quantize_input(x), self.dequantized_weight(), self.bias)


QUANT_MODULE_TYPES = (QuantLinear, QuantConv2d)
FLOAT_MODULE_TYPES = (nn.Linear, nn.Conv2d)


def static_same_padding(conv: nn.Conv2d) -> nn.Module | None:
    """The input-padding module of an EfficientNet-style ``Conv2dStaticSamePadding`` (whose forward is
    ``conv2d(static_padding(x))``), else None."""
    if type(conv).__name__ == "Conv2dStaticSamePadding" and isinstance(
        getattr(conv, "static_padding", None), nn.Module
    ):
        return conv.static_padding
    return None


def swap_problem(name: str, module: nn.Module) -> str | None:
    """Why swapping ``module`` for a fake-quant layer would change its behaviour, or None if it is safe.

    Plain nn.Linear / nn.Conv2d and same-padding convs (their padding is kept) are safe; a subclass that
    overrides ``forward`` (a scaled Linear, a dynamic-padding conv) would silently lose that behaviour.
    """
    if isinstance(module, QUANT_MODULE_TYPES):
        return f"{name} is already quantized ({type(module).__name__}); undo it first"
    if not isinstance(module, FLOAT_MODULE_TYPES):
        return f"{name} is a {type(module).__name__}; only nn.Linear and nn.Conv2d can be quantized"
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    cls = type(module)
    if cls.forward is not base.forward and not (
        base is nn.Conv2d and static_same_padding(module) is not None
    ):
        return (
            f"{name}: {cls.__module__}.{cls.__qualname__} subclasses {base.__name__} and overrides forward; "
            "swapping it for a fake-quant layer would drop that behaviour (exclude it from the scope)"
        )
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"{name}: Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    return None


def quantized_module_for(
    module: nn.Module, spec: QuantSpec, name: str, round_now: bool = True
) -> QuantLinear | QuantConv2d:
    """The fake-quant replacement of a float Linear/Conv2d (the type registry lives here, in one place)."""
    if (problem := swap_problem(name, module)) is not None:
        raise ValueError(problem)
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, spec, name, round_now)
    if isinstance(module, nn.Conv2d):
        return QuantConv2d.from_float(module, spec, name, round_now)
    raise ValueError(f"{name} is a {type(module).__name__}; only nn.Linear and nn.Conv2d can be quantized")
