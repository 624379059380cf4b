"""daptq.quant: specs, recipes, fake-quant modules, packed CPU kernels, byte accounting and checkpoints.

Self-contained: imports nothing from the rest of daptq. Typical use::

    from daptq.quant import QuantSpec, WeightSpec, quantize_, to_deployable_, model_bytes
    quantize_(model, QuantSpec(WeightSpec(4, granularity="per_group", group_size=128)))
    print(model_bytes(model).to_markdown())
    report = to_deployable_(model)  # packed int4 kernels where possible, reasons for the rest
"""

from .api import (
    calibrate,
    calibration_hooks,
    default_forward,
    dequantize_,
    fold_affine_,
    quantize_,
    quantized_modules,
    restored_on_failure,
    temporarily_quantized,
)
from .bytes import ByteReport, ByteRow, ideal_weight_bytes, model_bytes
from .fake import (
    QuantConv2d,
    QuantLinear,
    dequantize_weight,
    fake_quantize_weight,
    quantize_weight,
    quantize_weight_with_qparams,
    sqnr_db,
)
from .io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_quantized,
    load_quantized_state,
    quantized_state,
    read_config,
    save_quantized,
)
from .kernels import (
    DeployReport,
    DeployRow,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    deployable_kind,
    to_deployable_,
)
from .observers import ActivationObserver
from .recipe import Recipe, Rule, as_recipe, quantizable_names, recipe_table
from .spec import ActivationSpec, QuantSpec, WeightSpec, spec_from_bits, w4a8, weight_only

__all__ = [
    "ActivationObserver",
    "ActivationSpec",
    "ByteReport",
    "ByteRow",
    "CONFIG_FILE",
    "DeployReport",
    "DeployRow",
    "Int4WeightOnlyLinear",
    "Int8DynamicLinear",
    "Int8WeightOnlyLinear",
    "QuantConv2d",
    "QuantLinear",
    "QuantSpec",
    "Recipe",
    "Rule",
    "WEIGHTS_FILE",
    "WeightSpec",
    "as_recipe",
    "calibrate",
    "calibration_hooks",
    "default_forward",
    "deployable_kind",
    "dequantize_",
    "dequantize_weight",
    "fake_quantize_weight",
    "fold_affine_",
    "ideal_weight_bytes",
    "load_quantized",
    "load_quantized_state",
    "model_bytes",
    "quantizable_names",
    "quantize_",
    "quantize_weight",
    "quantize_weight_with_qparams",
    "quantized_modules",
    "quantized_state",
    "restored_on_failure",
    "read_config",
    "recipe_table",
    "save_quantized",
    "spec_from_bits",
    "sqnr_db",
    "temporarily_quantized",
    "to_deployable_",
    "w4a8",
    "weight_only",
]
