"""Category-specific linear layers (GR00T's embodiment-conditioned projections) and their quantized type.

``CategorySpecificLinear`` keeps one weight per category as a bare 3-D parameter ``W[num_categories, in,
out]`` plus ``b[num_categories, out]`` and computes ``bmm(x, W[cat_ids]) + b[cat_ids]`` (GR00T's names and
layout, so checkpoints load key for key). No ``nn.Linear`` scan sees it, so it has its own quantized type,
registered the way optimum-quanto registers qmodules (``QUANTIZED_TYPES``: float type -> quantized type):

- ``QuantCategorySpecificLinear`` rounds each category's weight per output channel (or per group of inputs)
  exactly as a Linear's ``[out, in]`` matrix would be rounded: the grid is the ``[num_categories * out, in]``
  view of ``W`` (row ``c * out + j`` is output channel ``j`` of category ``c``), so scales are per category
  and channel. Activations are fake-quantized per token (``dynamic_per_token``); a static per-tensor
  activation spec is refused (no calibrated scale per category is defined), as is anything a handler cannot
  serve: a module a scope names is quantized or the scope is refused, never skipped.
- Bytes: ``model_bytes`` counts it like a packed layer (``weight_storage_bytes``, ``out_features`` =
  ``num_categories * out``, ``in_features``); saving and loading go through ``daptq.quant.io``'s custom-module
  protocol (``checkpoint_tensors`` / ``checkpoint_config`` and the registered loader
  ``daptq.quant.category:load_category_linear``); ``daptq inspect`` lists it with its spec.

Methods whose algorithm is written for ``[out, in]`` Linear weights (GPTQ's Hessian, AWQ's search,
SmoothQuant's folding, QVLA's per-row widths, DA-PTQ's allocation) do not see registered types: the method
driver rounds them with this type's RTN after the method ran and records that it did
(``daptq.methods.registered``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .fake import dequantize_weight, fake_quantize_activation, quantize_weight
from .spec import QuantSpec


class CategorySpecificLinear(nn.Module):
    """One linear map per category: ``y = x @ W[c] + b[c]`` for each sample's category ``c``."""

    def __init__(self, num_categories: int, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.num_categories = num_categories
        self.W = nn.Parameter(0.02 * torch.randn(num_categories, input_dim, hidden_dim))
        self.b = nn.Parameter(torch.zeros(num_categories, hidden_dim))

    @property
    def in_features(self) -> int:
        return self.W.shape[1]

    @property
    def out_features(self) -> int:
        """Rows of the ``[num_categories * out, in]`` grid the quantizer rounds on."""
        return self.W.shape[0] * self.W.shape[2]

    def forward(self, x: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.W[cat_ids]) + self.b[cat_ids].unsqueeze(1)


def weight_matrix(W: torch.Tensor) -> torch.Tensor:
    """``W[C, in, out]`` as the ``[C * out, in]`` matrix quantization rounds (rows: category-major)."""
    C, n_in, n_out = W.shape
    return W.permute(0, 2, 1).reshape(C * n_out, n_in)


def from_weight_matrix(m: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    C, n_in, n_out = shape
    return m.reshape(C, n_out, n_in).permute(0, 2, 1)


class QuantCategorySpecificLinear(nn.Module):
    """``CategorySpecificLinear`` with a fake-quantized weight (and per-token fake-quantized input)."""

    def __init__(self, original: CategorySpecificLinear, spec: QuantSpec, name: str) -> None:
        super().__init__()
        a = spec.activation
        if a is not None and a.mode != "dynamic_per_token":
            raise ValueError(
                f"{name}: a CategorySpecificLinear takes weight-only or dynamic_per_token activation specs, "
                f"got {a.mode!r} (exclude it from the scope or use dynamic_per_token)"
            )
        if spec.weight.is_float:
            raise ValueError(
                f"{name}: bits=16 keeps the weight float; keep the module out of the plan instead"
            )
        self.num_categories = original.num_categories
        self.W, self.b = original.W, original.b  # shared: the float weights stay inspectable
        self.spec = spec
        self.__dict__["_layer_name"] = name
        self.register_buffer("qweight", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("_dequant_cache", None, persistent=False)

    # the attributes daptq.quant.bytes / io read -----------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.W

    @property
    def bias(self) -> torch.Tensor:
        return self.b

    @property
    def in_features(self) -> int:
        return self.W.shape[1]

    @property
    def out_features(self) -> int:
        return self.W.shape[0] * self.W.shape[2]

    def weight_storage_bytes(self) -> int:
        from .bytes import checkpoint_weight_bytes

        return checkpoint_weight_bytes(self.out_features, self.in_features, self.spec.weight)

    # rounding ---------------------------------------------------------------------------------------------
    def requantize(self) -> None:
        name = self.__dict__["_layer_name"]
        codes, scale, zp = quantize_weight(weight_matrix(self.W.detach()), self.spec.weight, f"{name}.W")
        self.set_quantized_weight(codes, scale, zp)

    def set_quantized_weight(self, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> None:
        name = self.__dict__["_layer_name"]
        rows, fan_in = self.out_features, self.in_features
        if tuple(codes.shape) != (rows, fan_in):
            raise ValueError(f"{name}: codes shape {tuple(codes.shape)} != {(rows, fan_in)}")
        ws = self.spec.weight
        if codes.is_floating_point() or int(codes.min()) < ws.qmin or int(codes.max()) > ws.qmax:
            raise ValueError(f"{name}: codes must be integers in [{ws.qmin}, {ws.qmax}]")
        if ws.symmetric != (zp is None):
            raise ValueError(f"{name}: zero_point must be given iff the spec is asymmetric")
        if bool((scale <= 0).any()) or not bool(torch.isfinite(scale.float()).all()):
            raise ValueError(f"{name}: scales must be finite and > 0")
        self.qweight, self.weight_scale, self.weight_zero_point = codes, scale, zp
        self._dequant_cache = None

    def dequantized_weight(self) -> torch.Tensor:
        """``W``'s shape and dtype, from the codes."""
        if self.qweight is None:
            raise RuntimeError(f"{self.__dict__['_layer_name']}: not quantized yet; call requantize()")
        if self._dequant_cache is None:
            m = dequantize_weight(self.qweight, self.weight_scale, self.weight_zero_point, self.spec.weight)
            self._dequant_cache = from_weight_matrix(m, self.W.shape).to(self.W.dtype).contiguous()
        return self._dequant_cache

    def forward(self, x: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        a = self.spec.activation
        if a is not None:
            x = fake_quantize_activation(x, a, None, None, -1)
        return torch.bmm(x, self.dequantized_weight()[cat_ids]) + self.b[cat_ids].unsqueeze(1)

    def to_float(self) -> CategorySpecificLinear:
        f = CategorySpecificLinear.__new__(CategorySpecificLinear)
        nn.Module.__init__(f)
        f.num_categories, f.W, f.b = self.num_categories, self.W, self.b
        return f

    def extra_repr(self) -> str:
        return f"num_categories={self.num_categories}, in={self.in_features}, spec={self.spec.short()}"

    # storage (daptq.quant.io custom-module protocol) ------------------------------------------------------
    def checkpoint_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        from .io import pack_codes

        out = {
            f"{prefix}.qweight_packed": pack_codes(self.qweight, self.spec.weight),
            f"{prefix}.weight_scale": self.weight_scale,
            f"{prefix}.b": self.b.detach(),
        }
        if self.weight_zero_point is not None:
            out[f"{prefix}.weight_zero_point"] = self.weight_zero_point
        return out

    def checkpoint_config(self) -> dict[str, Any]:
        return {"loader": "daptq.quant.category:load_category_linear", "spec": self.spec.to_dict()}


@torch.no_grad()
def load_category_linear(
    original: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, cfg: dict[str, Any]
) -> QuantCategorySpecificLinear:
    """Rebuild a stored layer over the float module it replaces (the keys it uses are popped); the float
    ``W`` becomes the dequantized weight (the checkpoint stores codes only)."""
    from .io import unpack_codes

    if type(original) is not CategorySpecificLinear:
        raise ValueError(
            f"{prefix}: a quantized category-specific layer replaces a CategorySpecificLinear, "
            f"the model has a {type(original).__name__}"
        )
    layer = QuantCategorySpecificLinear(original, QuantSpec.from_dict(cfg.get("spec")), prefix)
    ws = layer.spec.weight
    key = f"{prefix}.qweight_packed"
    if key not in tensors or f"{prefix}.weight_scale" not in tensors or f"{prefix}.b" not in tensors:
        raise ValueError(f"{prefix}: checkpoint lacks the layer's codes, scales or bias")
    codes = unpack_codes(tensors.pop(key), ws, (layer.out_features, layer.in_features))
    layer.set_quantized_weight(
        codes, tensors.pop(f"{prefix}.weight_scale"), tensors.pop(f"{prefix}.weight_zero_point", None)
    )
    b = tensors.pop(f"{prefix}.b")
    if tuple(b.shape) != tuple(layer.b.shape):
        raise ValueError(f"{prefix}.b: checkpoint {tuple(b.shape)}, model {tuple(layer.b.shape)}")
    layer.b.copy_(b)
    layer.W.copy_(layer.dequantized_weight())
    return layer


# float type -> quantized type (optimum-quanto's qmodule registry, for the module types daptq knows)
QUANTIZED_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    CategorySpecificLinear: QuantCategorySpecificLinear
}


def registered_type(module: nn.Module) -> type[nn.Module] | None:
    """The quantized type registered for ``module``'s exact type, or None."""
    return QUANTIZED_TYPES.get(type(module))


def register_quantized_type(float_type: type[nn.Module], quant_type: type[nn.Module]) -> None:
    """Register a quantized type: ``quant_type(original, spec, name)`` with ``requantize()``,
    ``in_features`` / ``out_features`` (its rounding grid) and the io custom-module protocol."""
    if float_type in QUANTIZED_TYPES and QUANTIZED_TYPES[float_type] is not quant_type:
        raise ValueError(f"a quantized type is already registered for {float_type.__name__}")
    QUANTIZED_TYPES[float_type] = quant_type


def quantize_registered(module: nn.Module, spec: QuantSpec, name: str) -> nn.Module:
    """RTN-quantize a module of a registered type; an error names a module no handler serves."""
    quant_type = registered_type(module)
    if quant_type is None:
        raise ValueError(f"{name}: no quantized type is registered for {type(module).__name__}")
    layer = quant_type(module, spec, name)
    layer.requantize()
    return layer
