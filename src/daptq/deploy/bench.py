"""`daptq bench`: latency per policy call and per action, peak memory and weight bytes of policy variants."""

from __future__ import annotations

from daptq.quant import QuantSpec, Recipe, Rule, w4a8


def reference_w4a8_recipe(group_size: int = 32, spec: QuantSpec | None = None) -> Recipe:
    """W4A8 RTN over the reference VLA's backbone, language projection and action head.

    The frozen encoders stay float (as the paper's setting), and so do the layers no group fits:
    ``state_proj`` and ``head.action_in`` (K=4) and ``vision_proj`` (K=112).
    """
    spec = spec or w4a8(group_size)
    return Recipe(
        (
            Rule("blocks.*", spec),
            Rule("language_proj", spec, "exact"),
            Rule("head.*", spec),
            Rule("head.action_in", None, "exact"),
        )
    )
