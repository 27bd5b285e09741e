"""Test helpers. ``cuda_emulation()``: run the CUDA kernels on CPU tensors.

    with torchnova.testing.cuda_emulation():
        out = torchnova.spatial_attention(q, k, v, backend="cuda")   # q, k, v CPU tensors

Inside the context, ``backend="cuda"`` (named explicitly, or ``TORCHNOVA_BACKEND=cuda``) accepts CPU tensors and
runs the real CUDA kernel source (csrc/cuda/*.cu), compiled as host C++ against the emulation layer
(csrc/emulation, docs/cuda_emulation.md), forward and backward. ``backend="auto"`` never picks it, and outside
the context nothing changes. The layer is test-only: build it with ``TORCHNOVA_CUDA_EMULATION=1`` (scripts/setup.sh
and CI do).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from . import _backend, _ext

BUILD_HINT = (
    "the CUDA emulation layer (torchnova._C_cuda_emu) is not built: rebuild with "
    "`TORCHNOVA_CUDA_EMULATION=1 python setup.py build_ext --inplace` (or `bash scripts/setup.sh`, which turns it on)"
)


_DEPTH = 0  # nesting depth of cuda_emulation()


def cuda_emulation_available() -> bool:
    """Whether the emulation layer is built (torchnova._C_cuda_emu imports)."""
    return _ext.HAS_CUDA_EMULATION


@contextlib.contextmanager
def cuda_emulation() -> Iterator[None]:
    """Inside: ``backend="cuda"`` runs the CUDA kernels on CPU tensors through the emulation layer.

    CPU tensors allocated inside the context (kernel outputs included) end at a guard page, so an out-of-bounds
    read or write of a kernel is reported as an error naming the kernel, block and thread. Raises RuntimeError
    when the layer is not built, saying how to build it.
    """
    if not _ext.HAS_CUDA_EMULATION:
        detail = f" ({_ext.CUDA_EMULATION_IMPORT_ERROR})" if _ext.CUDA_EMULATION_IMPORT_ERROR else ""
        raise RuntimeError(BUILD_HINT + detail)
    global _DEPTH
    token = _backend.CUDA_EMULATION_ACTIVE.set(True)
    if _DEPTH == 0:  # tensors allocated inside end at a guard page: out-of-bounds kernel accesses are reported
        _ext._C_cuda_emu.set_guarded_allocation(True)
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        if _DEPTH == 0:
            _ext._C_cuda_emu.set_guarded_allocation(False)
        _backend.CUDA_EMULATION_ACTIVE.reset(token)
