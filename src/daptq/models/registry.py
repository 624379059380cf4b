"""Resolve a model spec string to a policy, so the CLI, evaluation workers and tests name models the same way.

Specs:
- ``ref:<name>``: a reference VLA bundled with daptq (``ref:metaworld-mt10``).
- ``toy:<key>=<value>,...``: a tiny state-only policy for tests and smoke runs (see ``daptq.models.toy``).
- a directory written by ``daptq quantize``.
- ``onnx:<dir>``: a policy exported by ``daptq export`` running on ONNX Runtime (``daptq.deploy.OnnxPolicy``).

Specs are plain strings so worker processes can rebuild the same policy without pickling a model.
"""

from __future__ import annotations

from pathlib import Path

from daptq.models.adapter import Policy


def load_policy(spec: str, onnx_threads: int = 1) -> Policy:
    """Build the policy a spec names (ValueError for a spec of unknown form, FileNotFoundError if missing).

    ``onnx_threads``: intra-op threads of an ``onnx:`` policy's ONNX Runtime sessions, fixed when they are
    built (torch policies use the caller's ``torch.set_num_threads`` at each call instead)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if spec.startswith("ref:"):
        from daptq.models.reference import load_reference_policy

        return load_reference_policy(spec[len("ref:") :])
    if spec.startswith("toy:") or spec == "toy":
        from daptq.models.toy import toy_policy_from_spec

        return toy_policy_from_spec(spec)
    if spec.startswith("onnx:"):
        from daptq.deploy.runtime import OnnxPolicy

        return OnnxPolicy(spec[len("onnx:") :], threads=onnx_threads)
    path = Path(spec)
    if not path.exists():
        from daptq.atomic import recover_directory

        recover_directory(path)  # a save killed while swapping directories: its previous version is put back
    if path.is_dir():
        from daptq.models.quantized import load_quantized_policy

        return load_quantized_policy(path)
    raise FileNotFoundError(
        f"model spec {spec!r} is neither 'ref:<name>', 'toy:...', nor an existing directory written by "
        "`daptq quantize`"
    )
