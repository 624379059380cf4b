"""Small helpers shared inside daptq.quant: atomic writes and module lookup by qualified name."""

from __future__ import annotations

from torch import nn

from daptq.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "get_module", "set_module"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model has no module named {name!r}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``name`` and return the old one."""
    if not name:
        raise ValueError("cannot replace the root module; quantize a submodule")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
