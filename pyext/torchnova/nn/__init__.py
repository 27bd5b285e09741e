"""torchnova.nn: drop-in modules built on torchnova's ops.

Each op family defines its modules in ``torchnova/<family>/modules.py``; this namespace re-exports them.
"""

from ..dual_channel.modules import DualChannelAttention
from ..spacetime.modules import (
    FactorizedSpaceTimeAttention,
    RelativePositionBias,
    SpatialAttention,
    TemporalAttention,
)

__all__ = [
    "RelativePositionBias", "SpatialAttention", "TemporalAttention", "FactorizedSpaceTimeAttention",
    "DualChannelAttention",
]  # fmt: skip
