"""torch.library plumbing shared by the ops: how Triton launchers become registered ops.

On a GPU, Triton launchers are registered with ``torch.library.triton_op`` so ``torch.compile`` traces into the
kernels (``wrap_triton``). Under ``TRITON_INTERPRET=1`` (Triton on CPU tensors, for CI) ``triton_op`` runs but
cannot be traced, so the same launcher is registered as an opaque ``torch.library.custom_op`` instead; the
opaque path is what ``opcheck``/``torch.compile`` tests exercise on CPU.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import _ext


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16 inputs, fp64 for fp64 (the reference and gradcheck path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def uses_triton_op() -> bool:
    return hasattr(torch.library, "triton_op") and not _ext.TRITON_INTERPRET


def define_triton_op(qualname: str, launcher: Callable) -> None:
    """Register ``launcher`` (which launches its kernels through ``wrap_triton``) as the op ``qualname``."""
    if uses_triton_op():
        torch.library.triton_op(qualname, launcher, mutates_args=())
    else:
        torch.library.custom_op(qualname, launcher, mutates_args=())


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class LaunchConfig(NamedTuple):
    """One launch configuration of a tiled attention kernel, with the shared memory it needs."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block, the most any target / mode needs (compile-checked)


def pick_config(candidates: Sequence[LaunchConfig], shared_limit: int) -> Optional[LaunchConfig]:
    """The first of ``candidates`` (ordered by preference) whose shared memory fits ``shared_limit`` bytes, or None.

    ``shared`` is what Triton allocates for that configuration, measured by scripts/compile_check_triton.py
    --measure (the larger of sm_86 and sm_90); the check (a CI step) fails if a configuration that a launcher can
    pick for a target needs more than that target's limit, so a stale figure cannot go unnoticed."""
    for config in candidates:
        if config.shared <= shared_limit:
            return config
    return None


def launch_triton(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](...) through torch.library.wrap_triton when available, so the launch is traceable inside a
    torch.library.triton_op (torch.compile / export); in eager mode it is a plain launch. Not cached: whether
    wrap_triton wraps depends on the tracing state at call time."""
    runner = kernel
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is not None:
        try:
            runner = wrap(kernel)
        except RuntimeError:
            # Some torch versions refuse TRITON_INTERPRET's InterpretedFunction; a plain launch is equivalent.
            runner = kernel
    runner[grid](*args, **kwargs)
