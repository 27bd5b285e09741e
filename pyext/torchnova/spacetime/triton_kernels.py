"""Triton kernels of temporal attention: a huge batch of tiny (T x T) problems, one tile on chip per problem.

Layout (B, T, S, H, D); one problem per (b, s, h), a sequence over the T frames:
    s_ij = scale · q_i·k_j + bias[h, i, j]   (fp32)
    visible(i, j) = seg[b,i] == seg[b,j] and (not causal or j <= i)
    lse_i = log Σ_{j visible} exp(s_ij),   P = exp(s − lse),   out = P V
backward (P recomputed from lse, delta_i = dO_i·O_i):
    dV = Pᵀ dO,  dS = P ∘ (dO Vᵀ − delta),  dQ = scale · dS K,  dK = scale · dSᵀ Q,
    dbias[h] = Σ_(b,s) dS
Grid: (H, chunks). Program (h, c) owns the problems (b, s) = c·BLOCK_P ... c·BLOCK_P + BLOCK_P − 1 of head h
and loops over them with the T_PAD x D_PAD tiles of q, k, v in registers and the bias tile of h loaded once.
The backward sums dS over its problems in a T_PAD x T_PAD register tile and writes it to its own slot of a
(H, chunks, T_PAD, T_PAD) fp32 workspace; the slots are then summed in a fixed order (torch.sum over the chunk
dim), so dbias is deterministic. The problem count sits on grid dim 1 (up to 65,535 chunks of BLOCK_P problems),
so 70,000+ problems per launch are fine.
Padding: T_PAD, D_PAD >= 16 (tl.dot's minimum) and powers of two; padded rows see only their own (zero) key, so
no row is empty and no NaN appears; padded rows and columns are never stored.
fp32 inputs use IEEE fp32 dots (input_precision="ieee"), fp16/bf16 their tensor-core dots with fp32 accumulation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._library import accumulation_dtype, launch_triton, next_pow2

try:  # the package must import without triton (CPU-only torch builds)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "temporal_attention_fwd_triton", "temporal_attention_bwd_triton", "BLOCK_P"]

BLOCK_P = 16  # problems per program (module-level so tests can shrink it to exercise several chunks)
MAX_FRAMES = 64
MAX_HEAD_DIM = 256

if HAS_TRITON:

    @triton.jit
    def _tile_offsets(b, s, h, T, D, sb, st, ss, sh, T_PAD: tl.constexpr, D_PAD: tl.constexpr):
        rows = tl.arange(0, T_PAD)
        cols = tl.arange(0, D_PAD)
        offs = b * sb + s * ss + h * sh + rows[:, None] * st + cols[None, :]
        mask = (rows[:, None] < T) & (cols[None, :] < D)
        return offs, mask

    @triton.jit
    def _load_qkv(
        q_ptr, k_ptr, v_ptr, qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
        b, s, h, T, D, T_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        """The (T_PAD, D_PAD) tiles of problem (b, s, h), zero outside (T, D), and the in-bounds mask."""
        q_offs, tile_mask = _tile_offsets(b, s, h, T, D, qsb, qst, qss, qsh, T_PAD, D_PAD)
        k_offs, _ = _tile_offsets(b, s, h, T, D, ksb, kst, kss, ksh, T_PAD, D_PAD)
        v_offs, _ = _tile_offsets(b, s, h, T, D, vsb, vst, vss, vsh, T_PAD, D_PAD)
        q = tl.load(q_ptr + q_offs, mask=tile_mask, other=0.0)
        k = tl.load(k_ptr + k_offs, mask=tile_mask, other=0.0)
        v = tl.load(v_ptr + v_offs, mask=tile_mask, other=0.0)
        return q, k, v, tile_mask

    @triton.jit
    def _visible(seg_ptr, b, T, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, T_PAD: tl.constexpr):
        i = tl.arange(0, T_PAD)[:, None]
        j = tl.arange(0, T_PAD)[None, :]
        visible = (i < T) & (j < T)
        if HAS_SEG:
            seg_i = tl.load(seg_ptr + b * T + i, mask=i < T, other=-1)
            seg_j = tl.load(seg_ptr + b * T + j, mask=j < T, other=-2)
            visible = visible & (seg_i == seg_j)
        if CAUSAL:
            visible = visible & (j <= i)
        return visible | (i == j)  # the diagonal: always visible, padded rows see only themselves

    @triton.jit
    def _scores(q, k, bias_tile, visible, scale, IEEE: tl.constexpr):
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        return tl.where(visible, qk * scale + bias_tile, float("-inf"))

    @triton.jit
    def _temporal_fwd_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, T, S, H, D), each with its own strides (sb, st, ss, sh) and stride(-1) == 1
        qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
        bias_ptr,  # (H, T, T) fp32 contiguous, or a dummy when HAS_BIAS is false
        seg_ptr,  # (B, T) int64 contiguous, or a dummy
        out_ptr,  # (B, T, S, H, D) contiguous, q's dtype
        lse_ptr,  # (B, T, S, H) fp32 contiguous
        B, T, S, H, D, scale,
        HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_P: tl.constexpr, T_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(0)
        chunk = tl.program_id(1)
        i = tl.arange(0, T_PAD)[:, None]
        j = tl.arange(0, T_PAD)[None, :]
        bias_tile = tl.zeros((T_PAD, T_PAD), dtype=tl.float32)
        if HAS_BIAS:
            bias_tile = tl.load(bias_ptr + h * T * T + i * T + j, mask=(i < T) & (j < T), other=0.0)
        for n in range(BLOCK_P):
            problem = chunk * BLOCK_P + n
            if problem < B * S:
                b = problem // S
                s = problem % S
                q, k, v, tile_mask = _load_qkv(
                    q_ptr, k_ptr, v_ptr, qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
                    b, s, h, T, D, T_PAD, D_PAD,
                )  # fmt: skip
                visible = _visible(seg_ptr, b, T, HAS_SEG, CAUSAL, T_PAD)
                scores = _scores(q, k, bias_tile, visible, scale, IEEE)
                row_max = tl.max(scores, axis=1)
                p = tl.exp(scores - row_max[:, None])
                row_sum = tl.sum(p, axis=1)
                p = p / row_sum[:, None]
                if IEEE:
                    out = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    out = tl.dot(p.to(v.dtype), v)
                o_offs, o_mask = _tile_offsets(b, s, h, T, D, T * S * H * D, S * H * D, H * D, D, T_PAD, D_PAD)
                tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
                rows = tl.arange(0, T_PAD)
                tl.store(lse_ptr + ((b * T + rows) * S + s) * H + h, row_max + tl.log(row_sum), mask=rows < T)

    @triton.jit
    def _temporal_bwd_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, T, S, H, D) strided
        qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
        grad_out_ptr, out_ptr,  # (B, T, S, H, D) contiguous, q's dtype
        lse_ptr,  # (B, T, S, H) fp32 contiguous
        bias_ptr,  # (H, T, T) fp32 contiguous, or a dummy
        seg_ptr,  # (B, T) int64 contiguous, or a dummy
        dq_ptr, dk_ptr, dv_ptr,  # (B, T, S, H, D) contiguous, q's dtype
        dbias_ws_ptr,  # (H, chunks, T_PAD, T_PAD) fp32 workspace, or a dummy
        B, T, S, H, D, scale, chunks,
        HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_P: tl.constexpr, T_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(0)
        chunk = tl.program_id(1)
        i = tl.arange(0, T_PAD)[:, None]
        j = tl.arange(0, T_PAD)[None, :]
        rows = tl.arange(0, T_PAD)
        bias_tile = tl.zeros((T_PAD, T_PAD), dtype=tl.float32)
        if HAS_BIAS:
            bias_tile = tl.load(bias_ptr + h * T * T + i * T + j, mask=(i < T) & (j < T), other=0.0)
        dbias_acc = tl.zeros((T_PAD, T_PAD), dtype=tl.float32)
        for n in range(BLOCK_P):
            problem = chunk * BLOCK_P + n
            if problem < B * S:
                b = problem // S
                s = problem % S
                q, k, v, tile_mask = _load_qkv(
                    q_ptr, k_ptr, v_ptr, qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
                    b, s, h, T, D, T_PAD, D_PAD,
                )  # fmt: skip
                c_offs, _ = _tile_offsets(b, s, h, T, D, T * S * H * D, S * H * D, H * D, D, T_PAD, D_PAD)
                do = tl.load(grad_out_ptr + c_offs, mask=tile_mask, other=0.0)
                o = tl.load(out_ptr + c_offs, mask=tile_mask, other=0.0)
                lse = tl.load(lse_ptr + ((b * T + rows) * S + s) * H + h, mask=rows < T, other=0.0)
                visible = _visible(seg_ptr, b, T, HAS_SEG, CAUSAL, T_PAD)
                scores = _scores(q, k, bias_tile, visible, scale, IEEE)
                p = tl.exp(scores - lse[:, None])  # masked scores are -inf: exactly 0
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
                if IEEE:
                    dv = tl.dot(tl.trans(p), do.to(tl.float32), input_precision="ieee")
                    dp = tl.dot(do.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision="ieee")
                else:
                    dv = tl.dot(tl.trans(p.to(do.dtype)), do)
                    dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                ds = tl.where((i < T) & (j < T), ds, 0.0)
                if IEEE:
                    dq = tl.dot(ds, k.to(tl.float32), input_precision="ieee") * scale
                    dk = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee") * scale
                else:
                    dq = tl.dot(ds.to(k.dtype), k) * scale
                    dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
                tl.store(dq_ptr + c_offs, dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)
                tl.store(dk_ptr + c_offs, dk.to(dk_ptr.dtype.element_ty), mask=tile_mask)
                tl.store(dv_ptr + c_offs, dv.to(dv_ptr.dtype.element_ty), mask=tile_mask)
                if BIAS_GRAD:
                    dbias_acc += ds
        if BIAS_GRAD:
            tl.store(dbias_ws_ptr + ((h * chunks + chunk) * T_PAD + i) * T_PAD + j, dbias_acc)


def _pads(T: int, D: int) -> tuple[int, int]:
    return max(16, next_pow2(T)), max(16, next_pow2(D))


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("temporal_attention triton backend: triton is not importable")
    T, D = q.shape[1], q.shape[4]
    if T > MAX_FRAMES or D > MAX_HEAD_DIM:
        raise ValueError(
            f"temporal_attention triton backend: needs T <= {MAX_FRAMES} and D <= {MAX_HEAD_DIM}, got T={T}, D={D}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"temporal_attention triton backend: {name} needs stride(-1) == 1, got {x.stride()}")


def _dummy(device) -> Tensor:
    return torch.empty(1, device=device, dtype=torch.float32)


def temporal_attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor], causal: bool, scale: float
) -> Tuple[Tensor, Tensor]:
    _check(q, k, v)
    B, T, S, H, D = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, T, S, H), device=q.device, dtype=accumulation_dtype(q.dtype))
    if q.numel() == 0:
        return out, lse
    T_PAD, D_PAD = _pads(T, D)
    grid = (H, triton.cdiv(B * S, BLOCK_P))
    launch_triton(
        _temporal_fwd_kernel, grid,
        q, k, v, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4],
        bias if bias is not None else _dummy(q.device),
        segment_ids if segment_ids is not None else _dummy(q.device),
        out, lse, B, T, S, H, D, scale,
        HAS_BIAS=bias is not None, HAS_SEG=segment_ids is not None, CAUSAL=causal, IEEE=q.dtype == torch.float32,
        BLOCK_P=BLOCK_P, T_PAD=T_PAD, D_PAD=D_PAD,
    )  # fmt: skip
    return out, lse


def temporal_attention_bwd_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
    segment_ids: Optional[Tensor], causal: bool, scale: float, needs_bias_grad: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    _check(q, k, v)
    B, T, S, H, D = q.shape
    grad_out, out = grad_out.contiguous(), out.contiguous()
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    acc = accumulation_dtype(q.dtype)
    if q.numel() == 0:
        dbias = torch.zeros((H, T, T) if needs_bias_grad else (0,), device=q.device, dtype=acc)
        return dq, dk, dv, dbias
    T_PAD, D_PAD = _pads(T, D)
    chunks = triton.cdiv(B * S, BLOCK_P)
    workspace = (
        torch.empty((H, chunks, T_PAD, T_PAD), device=q.device, dtype=torch.float32)
        if needs_bias_grad
        else _dummy(q.device)
    )
    launch_triton(
        _temporal_bwd_kernel, (H, chunks),
        q, k, v, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4],
        grad_out, out, lse.contiguous(),
        bias if bias is not None else _dummy(q.device),
        segment_ids if segment_ids is not None else _dummy(q.device),
        dq, dk, dv, workspace, B, T, S, H, D, scale, chunks,
        HAS_BIAS=bias is not None, BIAS_GRAD=needs_bias_grad, HAS_SEG=segment_ids is not None, CAUSAL=causal,
        IEEE=q.dtype == torch.float32, BLOCK_P=BLOCK_P, T_PAD=T_PAD, D_PAD=D_PAD,
    )  # fmt: skip
    if needs_bias_grad:  # the per-program partial sums, added in a fixed order: deterministic
        dbias = workspace.sum(dim=1)[:, :T, :T].to(acc).contiguous()
    else:
        dbias = torch.empty((0,), device=q.device, dtype=acc)
    return dq, dk, dv, dbias
