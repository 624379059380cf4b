"""``load_policy(spec)`` for code inside the packages: it delegates to the policy-source resolver
``daptq.sources`` (see there for the specs and ``register_source``), which imports each source's package only
when a spec names it, so ``models/`` imports neither ``deploy/`` nor ``methods/``."""

from __future__ import annotations

from daptq.models.adapter import Policy


def load_policy(spec: str, onnx_threads: int = 1) -> Policy:
    """Build the policy a spec names (ValueError for a spec of unknown form, FileNotFoundError if missing).

    ``onnx_threads``: intra-op threads of an ``onnx:`` policy's ONNX Runtime sessions, fixed when they are
    built (torch policies use the caller's ``torch.set_num_threads`` at each call instead)."""
    from daptq.sources import load_policy as resolve

    return resolve(spec, onnx_threads=onnx_threads)
