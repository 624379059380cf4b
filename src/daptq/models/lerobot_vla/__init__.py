"""lerobot's flow-matching VLAs: pi0, pi0.5 and SmolVLA, loaded from lerobot's checkpoint directories.

``load_lerobot(PATH)`` / the ``lerobot:PATH`` spec give a ``LeRobotVLAPolicy`` (closed loop, robot units)
whose ``.adapter`` is a ``LeRobotVLAAdapter``; the family comes from ``config.json``'s ``type``. See
docs/models.md (pi0 / pi0.5 / SmolVLA).
"""

from daptq.models.lerobot_vla.adapter import LIBERO_ACTION_SPACE, LeRobotVLAAdapter, action_space_for
from daptq.models.lerobot_vla.checkpoint import (
    LoadedCheckpoint,
    Statistics,
    load_lerobot_checkpoint,
    save_lerobot_checkpoint,
)
from daptq.models.lerobot_vla.config import LeRobotVLAConfig
from daptq.models.lerobot_vla.modeling import PI0, FlowMatchingVLA, SmolVLA, build_model
from daptq.models.lerobot_vla.policy import LeRobotVLAPolicy, load_lerobot, load_lerobot_spec

__all__ = [
    "LIBERO_ACTION_SPACE",
    "PI0",
    "FlowMatchingVLA",
    "LeRobotVLAAdapter",
    "LeRobotVLAConfig",
    "LeRobotVLAPolicy",
    "LoadedCheckpoint",
    "SmolVLA",
    "Statistics",
    "action_space_for",
    "build_model",
    "load_lerobot",
    "load_lerobot_checkpoint",
    "load_lerobot_spec",
    "save_lerobot_checkpoint",
]
