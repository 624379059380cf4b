"""daptq: drift-aware post-training quantization for Vision-Language-Action policies."""

__version__ = "0.1.0"

__all__ = ["adapt"]


def __getattr__(name: str):
    # Lazy: `import daptq` stays free of torch and of every side effect; `daptq.adapt` loads on first use.
    if name == "adapt":
        from daptq.models.generic import adapt

        return adapt
    raise AttributeError(f"module 'daptq' has no attribute {name!r}")
