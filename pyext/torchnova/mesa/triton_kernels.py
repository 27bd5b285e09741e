"""Triton kernels for the MESA / SAF KL regularizer (same contract as the C++ and CUDA kernels).

Math, per row r of student logits z (R, C) and teacher logits t (R, C), temperature tau > 0::

    z' = z / tau,  t' = t / tau                    (scaled before any max subtraction)
    q  = softmax(z'),  p = softmax(t')
    loss_rows[r] = tau^2 * sum_c p_c (log p_c - log q_c)
                 = tau^2 * (a / s_t - lse(t') + lse(z')),   a = sum_c e^{t'_c - m_t} (t'_c - z'_c),
                                                          s_t = sum_c e^{t'_c - m_t},  m_t = max_c t'_c
    d loss_rows[r] / d z[r, c] = tau * (q_c - p_c)

p_c = 0 (teacher logit -inf, or e^{t'_c - m_t} underflowing to 0) contributes exactly 0, as xlogy / F.kl_div do.

Shapes / dtypes:
    student, teacher   (R, C), float32 / float16 / bfloat16 (same dtype, same device), any strides
    loss_rows          (R,)    float32
    lse                (4, R)  float32 contiguous: [m_z, log s_z, m_t, log s_t], the row max (0 for an all -inf
                               row) and log-sum of each row; logsumexp(z') = m_z + log s_z, kept split so the
                               backward forms exp((z' - m_z) - log s_z), never z' - lse rounded to the ulp of a
                               large logit (a relative error of |lse| * 6e-8 in float32)
    grad               (R, C)  contiguous, student dtype (forward with_grad, and backward)
    grad_rows          (R,)    float32 (backward input, d total / d loss_rows)

Algorithm. Rows go to grid axis 0 (no 65,535 limit), BLOCK_R rows per program (BLOCK_R > 1 only for short rows,
so tiny rows do not waste programs); row offsets are int64. All arithmetic is fp32 whatever the storage dtype.
Launch heuristics (_pick_config): BLOCK_C = next_pow2(C) when that is <= 8192 (row in registers), else 4096
(8192 for the forward with gradient); short rows packed into ~2048-element tiles (BLOCK_R <= 128);
num_warps = clamp(tile / 256, 4, 16).
  * Forward, C <= BLOCK_C (SINGLE_CHUNK): the whole row tile lives in registers; max, exps and sums are exact
    two-pass reductions, and with_grad writes tau * (e_z / s_z - e_t / s_t) from the same registers (one read of
    z and t, no extra exps).
  * Forward, long rows: one streaming pass over the class dimension in chunks of BLOCK_C with an online
    log-sum-exp for z' and t' (running max m, running sum s rescaled by e^{m_old - m_new} when the max grows)
    and the running cross term a, rescaled together with s_t. No (R, C) fp32 temporaries, so 256k classes are
    fine. With with_grad a second sweep over the same row (just read, so mostly still in L2) writes
    tau * (exp((z' - m_z) - log s_z) - exp((t' - m_t) - log s_t)).
  * Backward: one sweep per row, g = grad_rows[r] * tau * (exp((z' - m_z) - log s_z) - exp((t' - m_t) - log s_t)).
    Rows with grad_rows[r] == 0 are written as exact zeros and their logits are never loaded (they may be NaN).
-inf handling: masked-off lanes load -inf, the running max uses a shift of 0 while it is still -inf (so
exp(-inf - (-inf)) never happens), and the cross term is taken only where e^{t' - m_t} > 0 (no 0 * inf).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._library import launch_triton, next_pow2

try:  # the package must import on CPU-only torch builds without triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "mesa_kl_fwd_triton", "mesa_kl_bwd_triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch heuristics (module-level so tests can shrink them to exercise the multi-chunk paths).
_MAX_SINGLE_CHUNK = 8192  # rows up to this many classes (after pow2 rounding) are held in registers
_STREAM_BLOCK_C = 4096  # chunk width of the streaming path: 8 elements/thread at 16 warps (16 B bf16 loads)
# Streaming forward with the gradient re-reads each row in a second sweep and wants that re-read to hit L2
# (50 MB on H100). Rows in flight ~ SMs x programs/SM: 4096-wide chunks at 16 warps fit 3 programs/SM
# (~40 regs), 8192-wide ones 2 (~64 regs), i.e. ~264 rows = 34 MB of bf16 z + t at C = 32k instead of ~52 MB.
_STREAM_BLOCK_C_GRAD = 8192
_SMALL_ROW_TILE = 2048  # short rows are packed BLOCK_R to a program until a tile holds this many elements
_MAX_BLOCK_R = 128
_I32_LIMIT = 2**31


if HAS_TRITON:

    @triton.jit
    def _load_scaled(
        ptr,  # (R, C) logits base pointer
        row_off,  # (BLOCK_R,) int64 element offsets of the rows: row * stride_r
        cols,  # (BLOCK_C,) int32 column indices
        stride_c,  # int: column stride of the logits
        mask,  # (BLOCK_R, BLOCK_C) bool
        inv_tau,  # fp32 scalar 1 / tau
        COL_I64: tl.constexpr,  # column offsets need 64 bits ((C - 1) * stride_c >= 2^31)
    ):
        if COL_I64:
            offs = row_off[:, None] + cols.to(tl.int64)[None, :] * stride_c
        else:
            # int32 column offsets keep address math cheap; the launcher proves they cannot overflow.
            offs = row_off[:, None] + (cols * stride_c)[None, :]
        # -inf for masked lanes: they vanish from max (identity) and from every exp (e^-inf = 0).
        x = tl.load(ptr + offs, mask=mask, other=float("-inf"))
        return x.to(tl.float32) * inv_tau

    @triton.jit
    def _mesa_kl_fwd_kernel(
        z_ptr,  # (R, C) student logits, strides (stride_zr, stride_zc)
        t_ptr,  # (R, C) teacher logits, strides (stride_tr, stride_tc)
        loss_ptr,  # (R,) float32 out: loss_rows
        lse_ptr,  # (4, R) float32 out, contiguous: [m_z, log s_z, m_t, log s_t]
        grad_ptr,  # (R, C) student dtype out, contiguous; only touched when WITH_GRAD
        stride_zr,  # int: z.stride(0)
        stride_zc,  # int: z.stride(1)
        stride_tr,  # int: t.stride(0)
        stride_tc,  # int: t.stride(1)
        R,  # int: rows
        C,  # int: classes
        tau,  # fp32: temperature
        inv_tau,  # fp32: 1 / temperature
        BLOCK_R: tl.constexpr,  # rows per program (power of 2)
        BLOCK_C: tl.constexpr,  # classes per chunk (power of 2)
        SINGLE_CHUNK: tl.constexpr,  # BLOCK_C >= C: whole row tile in registers
        WITH_GRAD: tl.constexpr,  # also write tau * (q - p) to grad_ptr
        COL_I64: tl.constexpr,  # 64-bit column offsets
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < R
        rows64 = rows.to(tl.int64)  # R * stride may exceed 2^31
        z_row = rows64 * stride_zr  # (BLOCK_R,)
        t_row = rows64 * stride_tr  # (BLOCK_R,)
        g_row = rows64 * C  # (BLOCK_R,) grad is contiguous
        cols0 = tl.arange(0, BLOCK_C)  # (BLOCK_C,)

        if SINGLE_CHUNK:
            col_mask = cols0 < C
            mask = row_mask[:, None] & col_mask[None, :]
            zs = _load_scaled(z_ptr, z_row, cols0, stride_zc, mask, inv_tau, COL_I64)  # (BLOCK_R, BLOCK_C)
            ts = _load_scaled(t_ptr, t_row, cols0, stride_tc, mask, inv_tau, COL_I64)
            m_z = tl.max(zs, axis=1)
            m_t = tl.max(ts, axis=1)
            # An all -inf row shifts by 0 so its exps are e^-inf = 0 rather than e^(-inf + inf) = NaN.
            sh_z = tl.where(m_z == float("-inf"), 0.0, m_z)
            sh_t = tl.where(m_t == float("-inf"), 0.0, m_t)
            e_z = tl.exp(zs - sh_z[:, None])
            e_t = tl.exp(ts - sh_t[:, None])
            s_z = tl.sum(e_z, axis=1)
            s_t = tl.sum(e_t, axis=1)
            # p_c = 0 contributes exactly 0 (t' = -inf would give 0 * inf = NaN, and masked lanes -inf - -inf).
            a = tl.sum(tl.where(e_t > 0.0, e_t * (ts - zs), 0.0), axis=1)
            log_s_z = tl.log(s_z)
            log_s_t = tl.log(s_t)
            lse_z = sh_z + log_s_z
            lse_t = sh_t + log_s_t
            if WITH_GRAD:
                # q = e_z / s_z and p = e_t / s_t, reusing the exps already in registers.
                g = e_z * (tau / s_z)[:, None] - e_t * (tau / s_t)[:, None]
                g_offs = g_row[:, None] + cols0[None, :]
                tl.store(grad_ptr + g_offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # Online log-sum-exp state per row; m is -inf until the row has produced a finite logit.
            m_z = tl.full([BLOCK_R], float("-inf"), tl.float32)
            m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
            s_z = tl.zeros([BLOCK_R], dtype=tl.float32)
            s_t = tl.zeros([BLOCK_R], dtype=tl.float32)
            a = tl.zeros([BLOCK_R], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                mask = row_mask[:, None] & (cols < C)[None, :]
                zs = _load_scaled(z_ptr, z_row, cols, stride_zc, mask, inv_tau, COL_I64)
                ts = _load_scaled(t_ptr, t_row, cols, stride_tc, mask, inv_tau, COL_I64)

                new_m_z = tl.maximum(m_z, tl.max(zs, axis=1))
                sh_z = tl.where(new_m_z == float("-inf"), 0.0, new_m_z)
                # e^{m_old - shift}: 0 while m_old is -inf (then s is 0 anyway), never e^(-inf + inf).
                s_z = s_z * tl.exp(m_z - sh_z) + tl.sum(tl.exp(zs - sh_z[:, None]), axis=1)
                m_z = new_m_z

                new_m_t = tl.maximum(m_t, tl.max(ts, axis=1))
                sh_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
                e_t = tl.exp(ts - sh_t[:, None])
                rescale_t = tl.exp(m_t - sh_t)
                s_t = s_t * rescale_t + tl.sum(e_t, axis=1)
                # a may be +inf (finite teacher vs -inf student); if its p's all underflow to 0 they
                # contribute 0 (as in a two-pass evaluation), so do not form inf * 0 = NaN.
                a = tl.where(rescale_t == 0.0, 0.0, a * rescale_t)
                a += tl.sum(tl.where(e_t > 0.0, e_t * (ts - zs), 0.0), axis=1)
                m_t = new_m_t
            sh_z = tl.where(m_z == float("-inf"), 0.0, m_z)
            sh_t = tl.where(m_t == float("-inf"), 0.0, m_t)
            log_s_z = tl.log(s_z)
            log_s_t = tl.log(s_t)
            lse_z = sh_z + log_s_z
            lse_t = sh_t + log_s_t
            if WITH_GRAD:
                # Second sweep over the row just read (mostly L2 hits): q and p from the final max and log-sum.
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + cols0
                    mask = row_mask[:, None] & (cols < C)[None, :]
                    zs = _load_scaled(z_ptr, z_row, cols, stride_zc, mask, inv_tau, COL_I64)
                    ts = _load_scaled(t_ptr, t_row, cols, stride_tc, mask, inv_tau, COL_I64)
                    q = tl.exp((zs - sh_z[:, None]) - log_s_z[:, None])
                    p = tl.exp((ts - sh_t[:, None]) - log_s_t[:, None])
                    g = tau * (q - p)
                    g_offs = g_row[:, None] + cols[None, :]
                    tl.store(grad_ptr + g_offs, g.to(grad_ptr.dtype.element_ty), mask=mask)

        loss = tau * tau * (a / s_t - lse_t + lse_z)
        # KL >= 0, but these terms round to about -1e-7 where p == q (e.g. one class): clamp at 0 (NaN stays NaN)
        loss = tl.where(loss < 0.0, 0.0, loss)
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        tl.store(lse_ptr + rows, sh_z, mask=row_mask)
        tl.store(lse_ptr + R + rows, log_s_z, mask=row_mask)
        tl.store(lse_ptr + 2 * R + rows, sh_t, mask=row_mask)
        tl.store(lse_ptr + 3 * R + rows, log_s_t, mask=row_mask)

    @triton.jit
    def _mesa_kl_bwd_kernel(
        grad_rows_ptr,  # (R,) float32 in, stride stride_gr
        z_ptr,  # (R, C) student logits, strides (stride_zr, stride_zc)
        t_ptr,  # (R, C) teacher logits, strides (stride_tr, stride_tc)
        lse_ptr,  # (4, R) float32 in, strides (stride_l0, stride_l1): [m_z, log s_z, m_t, log s_t]
        grad_ptr,  # (R, C) student dtype out, contiguous
        stride_gr,  # int: grad_rows.stride(0)
        stride_zr,  # int: z.stride(0)
        stride_zc,  # int: z.stride(1)
        stride_tr,  # int: t.stride(0)
        stride_tc,  # int: t.stride(1)
        stride_l0,  # int: lse.stride(0)
        stride_l1,  # int: lse.stride(1)
        R,  # int: rows
        C,  # int: classes
        tau,  # fp32: temperature
        inv_tau,  # fp32: 1 / temperature
        BLOCK_R: tl.constexpr,  # rows per program (power of 2)
        BLOCK_C: tl.constexpr,  # classes per chunk (power of 2)
        COL_I64: tl.constexpr,  # 64-bit column offsets
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        row_mask = rows < R
        rows64 = rows.to(tl.int64)
        z_row = rows64 * stride_zr  # (BLOCK_R,)
        t_row = rows64 * stride_tr  # (BLOCK_R,)
        g_row = rows64 * C  # (BLOCK_R,)
        cols0 = tl.arange(0, BLOCK_C)  # (BLOCK_C,)

        g_r = tl.load(grad_rows_ptr + rows64 * stride_gr, mask=row_mask, other=0.0).to(tl.float32)
        # Rows with zero upstream gradient are masked: never read their logits or lse (they may be NaN).
        active = row_mask & (g_r != 0.0)
        sh_z = tl.load(lse_ptr + rows64 * stride_l1, mask=active, other=0.0)
        log_s_z = tl.load(lse_ptr + stride_l0 + rows64 * stride_l1, mask=active, other=0.0)
        sh_t = tl.load(lse_ptr + 2 * stride_l0 + rows64 * stride_l1, mask=active, other=0.0)
        log_s_t = tl.load(lse_ptr + 3 * stride_l0 + rows64 * stride_l1, mask=active, other=0.0)
        scale = g_r * tau  # (BLOCK_R,)

        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            col_mask = cols < C
            ld_mask = active[:, None] & col_mask[None, :]
            zs = _load_scaled(z_ptr, z_row, cols, stride_zc, ld_mask, inv_tau, COL_I64)
            ts = _load_scaled(t_ptr, t_row, cols, stride_tc, ld_mask, inv_tau, COL_I64)
            # Max and log-sum subtracted separately (see the module docstring): exact-ish for logits ~1e4.
            q = tl.exp((zs - sh_z[:, None]) - log_s_z[:, None])
            p = tl.exp((ts - sh_t[:, None]) - log_s_t[:, None])
            g = scale[:, None] * (q - p)
            # select, not multiply: inactive lanes must be exact zeros even if their lse/logits were NaN.
            g = tl.where(active[:, None], g, 0.0)
            g_offs = g_row[:, None] + cols[None, :]
            tl.store(grad_ptr + g_offs, g.to(grad_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _pick_config(R: int, C: int, with_grad: bool = False) -> Tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_C, SINGLE_CHUNK, num_warps) for an (R, C) problem."""
    c_pow2 = next_pow2(C)
    if c_pow2 <= _MAX_SINGLE_CHUNK:
        block_c, single = c_pow2, True
    else:
        block_c, single = min(_STREAM_BLOCK_C_GRAD if with_grad else _STREAM_BLOCK_C, c_pow2), False
    block_r = 1
    if block_c < _SMALL_ROW_TILE:
        # Pack short rows so a program still moves ~_SMALL_ROW_TILE elements.
        block_r = max(1, min(_SMALL_ROW_TILE // block_c, _MAX_BLOCK_R, next_pow2(R)))
    tile = block_r * block_c
    # 8 elements per thread per tensor up to 4096-wide tiles (one 16 B bf16 vector load), 16 at 8192; no
    # spills at 16 warps (checked with ptxas for sm_90a).
    num_warps = min(16, max(4, tile // 256))
    return block_r, block_c, single, num_warps


def _col_i64(C: int, *col_strides: int) -> bool:
    return (C - 1) * max(abs(int(s)) for s in col_strides) >= _I32_LIMIT


def _check_logits(student: Tensor, teacher: Tensor, temperature: float) -> None:
    if not HAS_TRITON:
        raise RuntimeError("mesa_kl triton kernels require triton")
    if student.dim() != 2:
        raise ValueError(f"mesa_kl: student must be 2-D (rows, classes), got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"mesa_kl: teacher must have the student's shape {tuple(student.shape)}, "
                         f"got {tuple(teacher.shape)}")
    if student.dtype not in _SUPPORTED_DTYPES or teacher.dtype != student.dtype:
        raise TypeError(f"mesa_kl: student/teacher must share a dtype in {_SUPPORTED_DTYPES}, "
                        f"got {student.dtype} / {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"mesa_kl: teacher must be on the student's device {student.device}, got {teacher.device}")
    if not temperature > 0:
        raise ValueError(f"mesa_kl: temperature must be > 0, got {temperature}")


def mesa_kl_fwd_triton(student: Tensor, teacher: Tensor, temperature: float,
                       with_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (loss_rows (R,) f32, lse (4, R) f32 = [m_z, log s_z, m_t, log s_t], grad (R, C) or empty)."""
    _check_logits(student, teacher, temperature)
    R, C = student.shape
    dev = student.device
    loss_rows = torch.empty(R, dtype=torch.float32, device=dev)
    lse = torch.empty(4, R, dtype=torch.float32, device=dev)
    if with_grad:
        grad = torch.empty(R, C, dtype=student.dtype, device=dev)
    else:
        grad = torch.empty(0, dtype=student.dtype, device=dev)
    if R == 0:
        return loss_rows, lse, grad
    tau = float(temperature)
    block_r, block_c, single, num_warps = _pick_config(R, C, bool(with_grad))
    grid = (triton.cdiv(R, block_r),)
    launch_triton(
        _mesa_kl_fwd_kernel, grid,
        student, teacher, loss_rows, lse, grad,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        R, C, tau, 1.0 / tau,
        BLOCK_R=block_r, BLOCK_C=block_c, SINGLE_CHUNK=single, WITH_GRAD=bool(with_grad),
        COL_I64=_col_i64(C, student.stride(1), teacher.stride(1)),
        num_warps=num_warps,
    )
    return loss_rows, lse, grad


def mesa_kl_bwd_triton(grad_rows: Tensor, student: Tensor, teacher: Tensor, lse: Tensor,
                       temperature: float) -> Tensor:
    """Returns (R, C) student-dtype grad_rows[r] * tau * (softmax(z') - softmax(t'))."""
    _check_logits(student, teacher, temperature)
    R, C = student.shape
    if grad_rows.shape != (R,):
        raise ValueError(f"mesa_kl: grad_rows must have shape ({R},), got {tuple(grad_rows.shape)}")
    if lse.shape != (4, R):
        raise ValueError(f"mesa_kl: lse must have shape (4, {R}), got {tuple(lse.shape)}")
    grad = torch.empty(R, C, dtype=student.dtype, device=student.device)
    if R == 0:
        return grad
    tau = float(temperature)
    block_r, block_c, _, num_warps = _pick_config(R, C)
    grid = (triton.cdiv(R, block_r),)
    launch_triton(
        _mesa_kl_bwd_kernel, grid,
        grad_rows, student, teacher, lse, grad,
        grad_rows.stride(0), student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        lse.stride(0), lse.stride(1),
        R, C, tau, 1.0 / tau,
        BLOCK_R=block_r, BLOCK_C=block_c,
        COL_I64=_col_i64(C, student.stride(1), teacher.stride(1)),
        num_warps=num_warps,
    )
    return grad
