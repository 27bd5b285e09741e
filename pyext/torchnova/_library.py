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



class _RaiseOnDifferentiation(torch.autograd.Function):
    """Identity on ``outputs`` whose backward raises: connects them to what they depend on (``depends``), so
    any later derivative of them, by ``backward()`` or by ``autograd.grad`` with respect to an upstream
    gradient or an input, reaches this node and gets the error instead of a silently wrong answer."""

    @staticmethod
    def forward(ctx, message, count, *outputs_then_depends):
        ctx.message = message
        return outputs_then_depends[:count]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def once_differentiable(backward: Callable, op: str) -> Callable:
    """``backward`` (of ``torch.library.register_autograd``) made first-order only, with a clear error.

    The kernels' backward ops have no derivative of their own, so a second derivative through them (a gradient
    penalty, a Hessian-vector product, ``gradgradcheck``, ``torch.func.hessian``) would be silently wrong. The
    backward runs without building a graph; when a graph was asked for (``create_graph=True``) and anything it
    depends on requires grad (an upstream gradient or a saved tensor), its outputs are routed through a node that
    raises ``RuntimeError`` if differentiated: the contract of ``torch.autograd.function.once_differentiable``,
    which looks at the upstream gradients only and so misses the saved inputs. ``backend="reference"`` (plain
    PyTorch) supports double backward.
    """
    message = (
        f"torchnova: {op} does not support double backward (a derivative of its gradient, e.g. "
        "autograd.grad(..., create_graph=True) then backward, gradgradcheck, torch.func.hessian): its backward "
        "kernel is not differentiable. Use backend='reference' for second derivatives."
    )

    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        candidates = list(grads) + list(ctx.saved_tensors)
        depends = [t for t in candidates if isinstance(t, torch.Tensor) and t.requires_grad]
        if not depends:
            return outputs
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        positions = [i for i, out in enumerate(outputs) if isinstance(out, torch.Tensor)]
        routed = _RaiseOnDifferentiation.apply(message, len(positions), *[outputs[i] for i in positions], *depends)
        result = list(outputs)
        for i, out in zip(positions, routed):
            result[i] = out
        return result[0] if single else tuple(result)

    return wrapper
