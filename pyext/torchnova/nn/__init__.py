"""torchnova.nn: drop-in modules built on torchnova's ops.

Each op family defines its modules in ``torchnova/<family>/modules.py``; this namespace re-exports them.
"""

__all__: list[str] = []
