"""DA-PTQ: Cross-Space Representation Compensation and Drift-Aware Mixed-Precision Allocation.

Importing the package registers the ``daptq`` method (``daptq.methods.quantize_policy`` imports it lazily)::

    from daptq.methods import quantize_policy
    from daptq.methods.daptq import DAPTQConfig

    record = quantize_policy(policy, DAPTQConfig.paper(), calibration)
    record = quantize_policy(policy, DAPTQConfig.budget(average_bits=3.0), calibration)
"""

from .config import DAPTQConfig
from .method import DAPTQ

__all__ = ["DAPTQ", "DAPTQConfig"]
