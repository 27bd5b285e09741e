"""``torchnova.mesa_kl``: the MESA / SAF KL regularizer as a torch.library op on four backends.

    loss_rows[r] = tau^2 * sum_c p_rc (log p_rc - log q_rc),  p = softmax(teacher/tau), q = softmax(student/tau)
    d loss_rows[r] / d student[r, c] = tau * (q_rc - p_rc);   the teacher gets no gradient.

Op chain (per backend): ``torchnova::mesa_kl_fwd`` / ``mesa_kl_bwd`` (C++ schema in csrc/torchnova.cpp, CPU
kernels in csrc/cpu, CUDA kernels in csrc/cuda) and ``torchnova::mesa_kl_fwd_triton`` / ``mesa_kl_bwd_triton``
(Triton, mesa/triton_kernels.py) share one fake and one autograd formula. The forward returns the per-row loss,
the two row log-sum-exps kept split as (row max, log-sum) pairs, and optionally the gradient itself:

* ``cpp`` stashes the gradient in the forward (the row is in cache when its statistics are known, so the
  gradient costs no second read); the backward only scales it by the upstream per-row gradient.
* ``cuda`` and ``triton`` read the logits once in the forward and recompute q - p in the backward from the
  saved log-sum-exps: 2 reads forward + 2 reads and 1 write backward, and no (rows, C) tensor kept alive
  between forward and backward.

The reduction and the row mask are applied outside the op with ordinary torch ops on the (rows,) vector.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, _ext
from .._library import accumulation_dtype, define_triton_op, once_differentiable
from . import triton_kernels
from .reference import mesa_kl_rows_ref

OP = "mesa_kl"
REDUCTIONS = ("batchmean", "sum", "mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Which backends stash the gradient in the forward (see the module docstring). A stashing backend must write
# zero gradient rows where the row loss is NaN, so masked garbage rows cannot leak through grad_rows * stash.
_STASH_GRAD_IN_FORWARD = {"cpp": True, "cuda": False, "triton": False}


# ---------------------------------------------------------------------------------------------------------
# Backend capabilities, in priority order. Devices never overlap except under TRITON_INTERPRET=1, where the
# interpreted Triton backend must not win over the C++ CPU kernel.
# ---------------------------------------------------------------------------------------------------------


def _cpp_reasons(student_logits, teacher_logits=None, **_):
    return (
        _backend.extension_reasons()
        + _backend.device_reasons(student_logits.device, ("cpu",))
        + _backend.dtype_reasons(student_logits.dtype, _FLOAT_DTYPES)
    )


def _cuda_reasons(student_logits, teacher_logits=None, **_):
    # sm_80+ like the other ops: the extension is built for sm_80 and up (setup.py), so an older GPU (V100, T4)
    # has no kernel image and must fall back to triton/reference instead of failing at launch.
    return (
        _backend.cuda_device_reasons(student_logits.device)
        + _backend.dtype_reasons(student_logits.dtype, _FLOAT_DTYPES)
        + _backend.compute_capability_reasons(student_logits.device, (8, 0))
    )


def _triton_reasons(student_logits, teacher_logits=None, **_):
    return _backend.triton_reasons(student_logits.device) + _backend.dtype_reasons(
        student_logits.dtype, _TRITON_DTYPES
    )


def _reference_reasons(student_logits, teacher_logits=None, **_):
    return []


_backend.register(OP, "cpp", _cpp_reasons)
_backend.register(OP, "cuda", _cuda_reasons)
_backend.register(OP, "triton", _triton_reasons)
_backend.register(OP, "reference", _reference_reasons)


# ---------------------------------------------------------------------------------------------------------
# Op registration: one fake and one autograd formula for both op pairs.
# ---------------------------------------------------------------------------------------------------------


def _fwd_fake(student, teacher, temperature, with_grad):
    torch._check(student.dim() == 2, lambda: f"student must be 2-D, got {student.dim()}-D")
    torch._check(teacher.shape == student.shape, lambda: "teacher must have the student's shape")
    rows, classes = student.shape
    acc = accumulation_dtype(student.dtype)
    loss_rows = student.new_empty((rows,), dtype=acc)
    lse = student.new_empty((4, rows), dtype=acc)  # [max z', log-sum z', max t', log-sum t'] (torchnova.cpp)
    grad = student.new_empty((rows, classes)) if with_grad else student.new_empty((0,))
    return loss_rows, lse, grad


def _bwd_fake(grad_rows, student, teacher, lse, temperature):
    return student.new_empty(student.shape)


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        student, teacher, temperature, with_grad = inputs
        _, lse, grad = output
        ctx.temperature = temperature
        ctx.with_grad = with_grad
        if with_grad:  # the gradient is already computed: keep only it
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(student, teacher, lse)

    def backward(ctx, d_loss_rows, d_lse, d_grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.with_grad:
            (grad,) = ctx.saved_tensors
            # One fused pass. Masked rows (d = 0) give exact zeros: the forward stashes zeros for NaN rows.
            scaled = grad * d_loss_rows.to(accumulation_dtype(grad.dtype)).unsqueeze(-1)
            return scaled.to(grad.dtype), None, None, None
        student, teacher, lse = ctx.saved_tensors
        d = d_loss_rows.to(lse.dtype).contiguous()
        return bwd_op(d, student, teacher, lse, ctx.temperature), None, None, None

    return setup_context, backward


def _register(fwd_name: str, bwd_name: str) -> None:
    torch.library.register_fake(fwd_name)(_fwd_fake)
    torch.library.register_fake(bwd_name)(_bwd_fake)
    bwd_op = getattr(torch.ops.torchnova, bwd_name.split("::")[1]).default
    setup_context, backward = _make_autograd(bwd_op)
    torch.library.register_autograd(fwd_name, once_differentiable(backward, fwd_name), setup_context=setup_context)


if _ext.HAS_CPP:
    _register("torchnova::mesa_kl_fwd", "torchnova::mesa_kl_bwd")

if _ext.HAS_CUDA_EMULATION:  # the CUDA kernels run on the CPU (torchnova.testing.cuda_emulation)
    _register("torchnova::mesa_kl_fwd_cuda_emu", "torchnova::mesa_kl_bwd_cuda_emu")

if triton_kernels.HAS_TRITON:
    define_triton_op("torchnova::mesa_kl_fwd_triton", triton_kernels.mesa_kl_fwd_triton)
    define_triton_op("torchnova::mesa_kl_bwd_triton", triton_kernels.mesa_kl_bwd_triton)
    _register("torchnova::mesa_kl_fwd_triton", "torchnova::mesa_kl_bwd_triton")


def _fwd_op(backend: str, device: torch.device):
    if backend == "triton":
        return torch.ops.torchnova.mesa_kl_fwd_triton.default
    if backend == "cuda":
        return getattr(torch.ops.torchnova, "mesa_kl_fwd" + _backend.cuda_op_suffix(device)).default
    return torch.ops.torchnova.mesa_kl_fwd.default


# ---------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------


def _validate(student_logits, teacher_logits, temperature, reduction, mask):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"mesa_kl: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"mesa_kl: {name} must be a floating-point tensor (logits), got dtype={x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"mesa_kl: {name} must have at least 1 dim (..., classes), got a 0-d tensor")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"mesa_kl: teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            f"mesa_kl: teacher_logits must have the dtype of student_logits ({student_logits.dtype}), "
            f"got {teacher_logits.dtype}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"mesa_kl: teacher_logits must be on the device of student_logits ({student_logits.device}), "
            f"got {teacher_logits.device}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError(f"mesa_kl: student_logits must have at least 1 class, got shape {tuple(student_logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"mesa_kl: temperature must be a real number, got {type(temperature).__name__}")
    if not (float(temperature) > 0 and float(temperature) < float("inf")):
        raise ValueError(f"mesa_kl: temperature must be a finite number > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"mesa_kl: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mesa_kl: mask must be a bool tensor, got {got}")
        lead = tuple(student_logits.shape[:-1])
        rows = student_logits[..., 0].numel()
        if tuple(mask.shape) not in (lead, (rows,)):
            raise ValueError(
                f"mesa_kl: mask must have shape {lead} (the leading dims of the logits) or ({rows},), "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != student_logits.device:
            raise ValueError(
                f"mesa_kl: mask must be on the device of the logits ({student_logits.device}), got {mask.device}"
            )


def mesa_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 5.0,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), the MESA / SAF regularizer.

    Args:
        student_logits: (..., C) float logits of the model being trained; receives the gradient
            ``tau * (q - p) / rows`` (batchmean).
        teacher_logits: (..., C) logits of the teacher (EMA model, or the logits recorded some epochs ago);
            same shape, dtype and device; treated as a constant (no gradient).
        temperature: tau > 0, applied to both before the softmax (the official code's default is 5).
        reduction: over rows (all leading dims): ``"batchmean"`` (sum / rows, the official code's
            ``.sum(classes).mean(batch)``), ``"sum"``, ``"mean"`` (sum / (rows * C), as ``F.kl_div``), or
            ``"none"`` (per row, shape ``student_logits.shape[:-1]``).
        mask: optional bool, shape = leading dims (or flattened rows); False rows are dropped (their loss and
            gradient are 0) and batchmean/mean divide by the kept rows. No kept row gives 0, not NaN.
        backend: ``"auto"`` (or ``TORCHNOVA_BACKEND``), ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Returns:
        The loss, computed and returned in float32 for float32/float16/bfloat16 logits and in float64 for
        float64 logits.
    """
    _validate(student_logits, teacher_logits, temperature, reduction, mask)
    temperature = float(temperature)
    chosen = _backend.select(OP, backend, student_logits=student_logits, teacher_logits=teacher_logits)
    classes = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    student_2d = student_logits.reshape(-1, classes)
    teacher_2d = teacher_logits.reshape(-1, classes)

    if chosen == "reference":
        loss_rows = mesa_kl_rows_ref(student_2d, teacher_2d, temperature)
    else:
        with_grad = (
            _STASH_GRAD_IN_FORWARD[chosen] and student_logits.requires_grad and torch.is_grad_enabled()
        )
        loss_rows, _, _ = _fwd_op(chosen, student_2d.device)(student_2d, teacher_2d.detach(), temperature, with_grad)
    return _reduce(loss_rows, mask, reduction, lead, classes)


def _reduce(loss_rows, mask, reduction, lead, classes):
    if mask is not None:
        keep = mask.reshape(-1)
        loss_rows = torch.where(keep, loss_rows, torch.zeros((), dtype=loss_rows.dtype, device=loss_rows.device))
    if reduction == "none":
        return loss_rows.reshape(lead)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    per_row = 1 if reduction == "batchmean" else classes
    if mask is None:
        return total / max(loss_rows.shape[0] * per_row, 1)
    kept = keep.sum().to(loss_rows.dtype) * per_row
    return total / kept.clamp_min(1)
