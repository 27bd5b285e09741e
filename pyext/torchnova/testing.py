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


SCHEDULES = ("forward", "reverse")


@contextlib.contextmanager
def cuda_emulation(schedule: str = "forward", exact_ends: bool = False) -> Iterator[None]:
    """Inside: ``backend="cuda"`` runs the CUDA kernels on CPU tensors through the emulation layer.

    Every tensor a kernel touches ends at a guard page: those allocated inside the context (kernel outputs
    included) and copies of the op's tensor arguments, so an out-of-bounds read or write of a kernel is reported as
    an error naming the kernel, block and thread. Raises RuntimeError when the layer is not built, saying how to
    build it.

    schedule: the order in which the threads of a block run between synchronisation points, "forward" (thread 0
        first) or "reverse". The race check: a shared-memory race (a word one thread writes and another reads or
        writes with no barrier between) makes a kernel's result depend on this order; run both and compare.
    exact_ends: tensors end exactly at the guard page instead of up to 15 bytes before it (the default keeps the
        data start 16-byte aligned, as a GPU allocation is, so the kernels take their vector paths; exact ends
        catch reads just past the end and send misaligned data down the kernels' unaligned paths).
    """
    if not _ext.HAS_CUDA_EMULATION:
        detail = f" ({_ext.CUDA_EMULATION_IMPORT_ERROR})" if _ext.CUDA_EMULATION_IMPORT_ERROR else ""
        raise RuntimeError(BUILD_HINT + detail)
    if schedule not in SCHEDULES:
        raise ValueError(f"cuda_emulation: schedule must be one of {SCHEDULES}, got {schedule!r}")
    global _DEPTH
    emu = _ext._C_cuda_emu
    token = _backend.CUDA_EMULATION_ACTIVE.set(True)
    previous_reverse = emu.reverse_schedule()
    emu.set_reverse_schedule(schedule == "reverse")
    # Nested contexts may change exact_ends; the outermost one turns the guarded allocator off at the end.
    emu.set_guarded_allocation(True, exact_ends)
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        emu.set_reverse_schedule(previous_reverse)
        if _DEPTH == 0:
            emu.set_guarded_allocation(False)
        _backend.CUDA_EMULATION_ACTIVE.reset(token)
