"""GR00T N1 / N1.5 (NVIDIA): Eagle VLM backbone + flow-matching DiT action head with embodiment-specific
``CategorySpecificLinear`` encoders, loaded from its checkpoint directory. ``gr00t:DIR`` gives a
``Gr00tPolicy`` whose ``.adapter`` is a ``Gr00tAdapter``. See docs/models.md (GR00T N1.x)."""

from daptq.models.gr00t.adapter import Gr00tAdapter
from daptq.models.gr00t.checkpoint import build_gr00t, resolve_files, save_gr00t_checkpoint
from daptq.models.gr00t.config import EMBODIMENT_TAGS, Gr00tConfig
from daptq.models.gr00t.model import Gr00tN1
from daptq.models.gr00t.policy import Gr00tPolicy, load_gr00t, load_gr00t_spec
from daptq.models.gr00t.processing import Embodiment, embodiment_from_metadata

__all__ = [
    "EMBODIMENT_TAGS",
    "Embodiment",
    "Gr00tAdapter",
    "Gr00tConfig",
    "Gr00tN1",
    "Gr00tPolicy",
    "build_gr00t",
    "embodiment_from_metadata",
    "load_gr00t",
    "load_gr00t_spec",
    "resolve_files",
    "save_gr00t_checkpoint",
]
