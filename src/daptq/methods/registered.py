"""Modules of registered quantized types (``daptq.quant.category``) inside any method.

A method's algorithm is written for ``[out, in]`` Linear / Conv2d weights (GPTQ's Hessians, AWQ's search,
SmoothQuant's folds, QVLA's per-row widths, DA-PTQ's allocation). The driver holds registered-type modules
out of the method's plan while it calibrates and applies, then rounds each with its type's RTN at the spec
the scope gave it, puts it back into the plan (so the record lists it with its role and spec) and records
what it did under ``decisions["registered_types"]``: never skipped, never silently. A method whose
``sees_registered_types`` is true (DA-PTQ's budget preset) keeps them in its plan and serves them itself.
"""

from __future__ import annotations

from daptq.methods.base import Method
from daptq.methods.scope import PlannedModule
from daptq.models.adapter import VLAAdapter
from daptq.quant._util import set_module
from daptq.quant.category import quantize_registered, registered_type


def hold_registered(method: Method, adapter: VLAAdapter) -> dict[str, PlannedModule]:
    """Take the registered-type modules out of ``method.plan`` (in place); returns them."""
    plan = method.plan
    if plan is None or getattr(method, "sees_registered_types", False):  # e.g. DA-PTQ budget allocates them
        return {}
    held = {n: m for n, m in plan.modules.items() if registered_type(adapter.module(n)) is not None}
    for n in held:
        del plan.modules[n]
    return held


def release_registered(method: Method, adapter: VLAAdapter, held: dict[str, PlannedModule]) -> None:
    """Round the held modules with their registered type's RTN, and put them back into the plan."""
    if not held:
        return
    notes = {}
    for name, planned in held.items():
        module = adapter.module(name)
        set_module(adapter.model, name, quantize_registered(module, planned.spec, name))
        notes[name] = (
            f"{type(module).__name__}: rounded by its registered quantized type (RTN, "
            f"{planned.spec.short()}); method {method.name!r} has no algorithm for this module type"
        )
    assert method.plan is not None
    method.plan.modules.update(held)
    method.decisions["registered_types"] = notes
