"""The MESA / SAF KL regularizer: the fused ``mesa_kl`` op and the ``MESA`` / ``SAF`` training helpers."""

from .ops import mesa_kl
from .training import MESA, SAF, memory_estimate

__all__ = ["mesa_kl", "MESA", "SAF", "memory_estimate"]
