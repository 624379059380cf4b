"""The QuantRecord of a quantization run; it lives in ``daptq.models.record`` (the quantized-policy directory
format reads it, and ``models/`` must not import ``methods/``) and is re-exported here for methods."""

from daptq.models.record import ModuleRecord, QuantRecord, jsonable

__all__ = ["ModuleRecord", "QuantRecord", "jsonable"]
