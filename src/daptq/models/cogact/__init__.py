"""CogACT (Li et al. 2024), the VLA DA-PTQ was measured on, loaded from its own checkpoints.

``load_cogact(RUN)`` / the ``cogact:RUN`` spec give a ``CogACTPolicy`` (closed loop, robot units) whose
``.adapter`` is a ``CogACTAdapter``. See docs/models.md (CogACT).
"""

from daptq.models.cogact.adapter import CogACTAdapter
from daptq.models.cogact.checkpoint import (
    RunFiles,
    build_cogact,
    read_checkpoint,
    resolve_run,
    save_cogact_run,
)
from daptq.models.cogact.config import CogACTConfig, ViTConfig
from daptq.models.cogact.model import CogACT
from daptq.models.cogact.policy import CogACTPolicy, load_cogact, load_cogact_spec
from daptq.models.cogact.processing import COGACT_ACTION_SPACE, ActionStatistics, action_statistics

__all__ = [
    "COGACT_ACTION_SPACE",
    "ActionStatistics",
    "CogACT",
    "CogACTAdapter",
    "CogACTConfig",
    "CogACTPolicy",
    "RunFiles",
    "ViTConfig",
    "action_statistics",
    "build_cogact",
    "load_cogact",
    "load_cogact_spec",
    "read_checkpoint",
    "resolve_run",
    "save_cogact_run",
]
