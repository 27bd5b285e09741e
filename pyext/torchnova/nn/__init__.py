"""torchnova.nn: drop-in modules built on torchnova's ops.

Each op family defines its modules in ``torchnova/<family>/modules.py``; this namespace re-exports them.
"""

from ..dual_channel.modules import DualChannelAttention

__all__: list[str] = ["DualChannelAttention"]
