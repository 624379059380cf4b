"""daptq: drift-aware post-training quantization for Vision-Language-Action policies."""

__version__ = "0.1.0"
