"""OpenVLA-OFT (Kim et al. 2025): Prismatic + Llama-2 with parallel decoding and an L1-regression action
head, loaded from its Hugging Face checkpoint directory. ``openvla-oft:DIR`` gives an ``OFTPolicy`` whose
``.adapter`` is an ``OFTAdapter``. See docs/models.md (OpenVLA-OFT)."""

from daptq.models.openvla_oft.adapter import OFTAdapter
from daptq.models.openvla_oft.checkpoint import build_oft, read_state, resolve_files, save_oft_checkpoint
from daptq.models.openvla_oft.config import OFTConfig
from daptq.models.openvla_oft.model import OpenVLAOFT
from daptq.models.openvla_oft.policy import OFTPolicy, load_oft, load_oft_spec
from daptq.models.openvla_oft.processing import OFT_ACTION_SPACE, OFTStatistics, oft_statistics

__all__ = [
    "OFT_ACTION_SPACE",
    "OFTAdapter",
    "OFTConfig",
    "OFTPolicy",
    "OFTStatistics",
    "OpenVLAOFT",
    "build_oft",
    "load_oft",
    "load_oft_spec",
    "oft_statistics",
    "read_state",
    "resolve_files",
    "save_oft_checkpoint",
]
