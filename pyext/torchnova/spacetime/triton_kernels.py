"""Triton kernels of factorized space-time attention: temporal and spatial, forward and backward.

Temporal attention: a huge batch of tiny (T x T) problems, one tile on chip per problem.
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
Shared memory (temporal_config): whole tiles, so the shared memory (layout-conversion scratch) grows with
T_PAD·D_PAD; where the forward's or the backward's tiles exceed the device's limit per block (fp32 at
T_PAD·D_PAD >= 64·128 on the 99 KB cards, 64·256 on A100 / H100), the op's reasons exclude the triton backend
for those inputs and ``auto`` moves on (cuda, or reference).
Rotary (ROTARY, the temporal_attention_rotary_* ops): cos, sin (T, rot_dim) fp32. With p(d) the partner of dim d
((2i, 2i+1) when INTERLEAVED, else (i, i + rot_dim/2); p(d) = d past rot_dim) and sgn(d) = -1 for the first of
a pair, +1 for the second, each program loads once the (T_PAD, D_PAD) tiles c[t, d] = cos[t, d] (1 past
rot_dim) and z[t, d] = sgn(d)·sin[t, d] (0 past rot_dim), and the same at p(d): c_p, z_p. Per problem it loads
q and q_p = q[:, p(d)] (a second, permuted load) and uses q' = c∘q + z∘q_p (k likewise; in fp32, then q's dtype).
Backward: the gradient of x is the transpose map dx = c∘dx' + z_p∘dx'_p, and dx'_p = dx'[:, p(d)] comes from one
more dot with the permuted operand, x'_p = c_p∘x_p + z_p∘x (e.g. dq'_p = scale·dS K'_p): 2 extra dots, no
register shuffles. Exact for any tables; the tables get no gradient.

Spatial attention: FlashAttention-2 over the S tokens of a frame.
Layout (B, T, S, H, D); one problem per (b, t, h), a sequence over the S tokens of frame t, no mask, no bias:
    s_ij = scale · q_i·k_j   (fp32),   lse_i = log Σ_j exp(s_ij),   P = exp(s − lse),   out = P V
backward (P recomputed from lse, delta_i = dO_i·O_i): dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − delta), dQ = scale · dS K,
dK = scale · dSᵀ Q.
Forward: program (query block, problem) keeps its BLOCK_M x D_PAD query tile and walks the key blocks with the
online softmax in base 2 (scores times scale·log2(e), exp2; running max m and sum l in fp32, the accumulator
rescaled by exp2(m_old − m_new)); it writes out and lse = ln2 · (m + log2 l) (natural log, as the C++ ops).
Backward: two kernels, no atomics, so dq, dk, dv are bit-identical across runs (FA2 tutorial's "two kernels"):
  1. dQ: program (query block, problem) computes delta for its rows from dO and O (it loads dO anyway) and stores
     it, then walks the key blocks recomputing P from lse and accumulates dQ in registers.
  2. dK/dV: program (key block, problem) keeps its k, v tiles and the dk, dv accumulators in registers and walks
     the query blocks (reading lse and the delta written by 1).
Grid (spatial_grid): (row blocks, problems) while B·T·H <= 65,535, CUDA's limit on grid axes 1 and 2; above
that the problems go to axis 0 (up to 2^31 − 1) and the row blocks to axis 1, so any B·T·H works.
Block sizes (spatial_config): per kernel, dtype class (fp32 / fp16 and bf16) and D_PAD a list of candidates,
the first one whose shared memory fits the device's opt-in limit per block taken (_SPATIAL_CANDIDATES); each
block shrunk to next_pow2(S) (>= 16) and capped by SPATIAL_MAX_BLOCK (tests lower it to get several query and
key blocks on tiny inputs). Not tuned on a GPU yet.
Padding: D_PAD = next_pow2(max(D, 16)); rows past S and columns past D load as zeros; keys past S get a −inf
score (forward) or P = 0 (backward). A padded query row sees only real keys, so it stays finite; it is never
stored. q, k, v are read through their own (sb, st, ss, sh) strides (stride(-1) == 1), never copied; out, lse,
dq, dk, dv are contiguous. Problem and token offsets are int64.

Both: fp32 inputs use IEEE fp32 dots (input_precision="ieee"), fp16/bf16 their tensor-core dots with fp32
accumulation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._backend import DEFAULT_SHARED_MEMORY
from .._library import LaunchConfig, accumulation_dtype, launch_triton, next_pow2, pick_config

try:  # the package must import without triton (CPU-only torch builds)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON", "temporal_attention_fwd_triton", "temporal_attention_bwd_triton", "BLOCK_P",
    "temporal_attention_rotary_fwd_triton", "temporal_attention_rotary_bwd_triton",
    "spatial_attention_fwd_triton", "spatial_attention_bwd_triton", "spatial_grid", "spatial_config",
]  # fmt: skip

BLOCK_P = 16  # problems per program (module-level so tests can shrink it to exercise several chunks)
MAX_FRAMES = 64
MAX_HEAD_DIM = 256
# Spatial: cap on every block size (module-level so tests can shrink it to 16 and get several query and key
# blocks on tiny inputs), and CUDA's limit on grid axes 1 and 2 (module-level so tests can lower it and run the
# folded grid without 65,536 problems).
SPATIAL_MAX_BLOCK = 128
MAX_GRID_YZ = 65_535
_MAX_GRID_X = 2**31 - 1
_LOG2E = 1.4426950408889634

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
    def _rotary_table(cos_ptr, sin_ptr, T, rot_dim, cols, INTERLEAVED: tl.constexpr, T_PAD: tl.constexpr):
        """(cos, sgn·sin) at columns ``cols`` (1, D_PAD) of every frame: (T_PAD, D_PAD) fp32, 1 and 0 outside."""
        rows = tl.arange(0, T_PAD)[:, None]
        inside = (rows < T) & (cols < rot_dim)
        if INTERLEAVED:
            first = (cols % 2) == 0
        else:
            first = cols < rot_dim // 2
        cos = tl.load(cos_ptr + rows * rot_dim + cols, mask=inside, other=1.0)
        sin = tl.load(sin_ptr + rows * rot_dim + cols, mask=inside, other=0.0)
        return cos, tl.where(first, -sin, sin)

    @triton.jit
    def _rotary_tables(cos_ptr, sin_ptr, T, rot_dim, INTERLEAVED: tl.constexpr, T_PAD: tl.constexpr,
                       D_PAD: tl.constexpr):  # fmt: skip
        """partner p(d) (1, D_PAD) and the tiles c, z, c_p, z_p of the file header."""
        cols = tl.arange(0, D_PAD)[None, :]
        if INTERLEAVED:
            partner = cols ^ 1
        else:
            half = rot_dim // 2
            partner = tl.where(cols < half, cols + half, cols - half)
        partner = tl.where(cols < rot_dim, partner, cols)
        c, z = _rotary_table(cos_ptr, sin_ptr, T, rot_dim, cols, INTERLEAVED, T_PAD)
        c_p, z_p = _rotary_table(cos_ptr, sin_ptr, T, rot_dim, partner, INTERLEAVED, T_PAD)
        return partner, c, z, c_p, z_p

    @triton.jit
    def _load_partner(ptr, b, s, h, T, D, sb, st, ss, sh, partner, T_PAD: tl.constexpr):
        """x[:, p(d)] of problem (b, s, h): the (T_PAD, D_PAD) tile with permuted columns, zero outside (T, D)."""
        rows = tl.arange(0, T_PAD)[:, None]
        offs = b * sb + s * ss + h * sh + rows * st + partner
        return tl.load(ptr + offs, mask=(rows < T) & (partner < D), other=0.0)

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
        cos_ptr, sin_ptr,  # (T, rot_dim) fp32 contiguous, or dummies when ROTARY is false
        B, T, S, H, D, scale, rot_dim,
        HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_P: tl.constexpr, T_PAD: tl.constexpr, D_PAD: tl.constexpr,
        ROTARY: tl.constexpr = False, INTERLEAVED: tl.constexpr = False,
    ):  # fmt: skip
        h = tl.program_id(0)
        chunk = tl.program_id(1)
        i = tl.arange(0, T_PAD)[:, None]
        j = tl.arange(0, T_PAD)[None, :]
        bias_tile = tl.zeros((T_PAD, T_PAD), dtype=tl.float32)
        if HAS_BIAS:
            bias_tile = tl.load(bias_ptr + h * T * T + i * T + j, mask=(i < T) & (j < T), other=0.0)
        if ROTARY:
            partner, rc, rz, rc_p, rz_p = _rotary_tables(cos_ptr, sin_ptr, T, rot_dim, INTERLEAVED, T_PAD, D_PAD)
        for n in range(BLOCK_P):
            problem = chunk * BLOCK_P + n
            if problem < B * S:
                b = problem // S
                s = problem % S
                q, k, v, tile_mask = _load_qkv(
                    q_ptr, k_ptr, v_ptr, qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
                    b, s, h, T, D, T_PAD, D_PAD,
                )  # fmt: skip
                if ROTARY:  # q' = c q + z q_p, k' likewise (file header)
                    q_p = _load_partner(q_ptr, b, s, h, T, D, qsb, qst, qss, qsh, partner, T_PAD)
                    k_p = _load_partner(k_ptr, b, s, h, T, D, ksb, kst, kss, ksh, partner, T_PAD)
                    q = (rc * q.to(tl.float32) + rz * q_p.to(tl.float32)).to(q_p.dtype)
                    k = (rc * k.to(tl.float32) + rz * k_p.to(tl.float32)).to(k_p.dtype)
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
        dq_ptr, dk_ptr, dv_ptr,  # (B, T, S, H, D) q's dtype, token stride gts (H·D, or 3·H·D in a packed dqkv)
        dbias_ws_ptr,  # (H, chunks, T_PAD, T_PAD) fp32 workspace, or a dummy
        cos_ptr, sin_ptr,  # (T, rot_dim) fp32 contiguous, or dummies when ROTARY is false
        B, T, S, H, D, scale, chunks, gts, rot_dim,
        HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_SEG: tl.constexpr, CAUSAL: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_P: tl.constexpr, T_PAD: tl.constexpr, D_PAD: tl.constexpr,
        ROTARY: tl.constexpr = False, INTERLEAVED: tl.constexpr = False,
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
        if ROTARY:
            partner, rc, rz, rc_p, rz_p = _rotary_tables(cos_ptr, sin_ptr, T, rot_dim, INTERLEAVED, T_PAD, D_PAD)
        for n in range(BLOCK_P):
            problem = chunk * BLOCK_P + n
            if problem < B * S:
                b = problem // S
                s = problem % S
                q, k, v, tile_mask = _load_qkv(
                    q_ptr, k_ptr, v_ptr, qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
                    b, s, h, T, D, T_PAD, D_PAD,
                )  # fmt: skip
                if ROTARY:  # q', k' and their partner-permuted copies q'_p, k'_p (file header)
                    q_p = _load_partner(q_ptr, b, s, h, T, D, qsb, qst, qss, qsh, partner, T_PAD).to(tl.float32)
                    k_p = _load_partner(k_ptr, b, s, h, T, D, ksb, kst, kss, ksh, partner, T_PAD).to(tl.float32)
                    q32, k32 = q.to(tl.float32), k.to(tl.float32)
                    q_rot_p = (rc_p * q_p + rz_p * q32).to(q.dtype)
                    k_rot_p = (rc_p * k_p + rz_p * k32).to(k.dtype)
                    q = (rc * q32 + rz * q_p).to(q.dtype)
                    k = (rc * k32 + rz * k_p).to(k.dtype)
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
                if ROTARY:  # dx = c dx' + z_p dx'_p, with dx'_p from the permuted operands
                    if IEEE:
                        dq_p = tl.dot(ds, k_rot_p.to(tl.float32), input_precision="ieee") * scale
                        dk_p = tl.dot(tl.trans(ds), q_rot_p.to(tl.float32), input_precision="ieee") * scale
                    else:
                        dq_p = tl.dot(ds.to(k.dtype), k_rot_p) * scale
                        dk_p = tl.dot(tl.trans(ds.to(q.dtype)), q_rot_p) * scale
                    dq = rc * dq + rz_p * dq_p
                    dk = rc * dk + rz_p * dk_p
                g_offs, _ = _tile_offsets(b, s, h, T, D, T * S * gts, S * gts, gts, D, T_PAD, D_PAD)
                tl.store(dq_ptr + g_offs, dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)
                tl.store(dk_ptr + g_offs, dk.to(dk_ptr.dtype.element_ty), mask=tile_mask)
                tl.store(dv_ptr + g_offs, dv.to(dv_ptr.dtype.element_ty), mask=tile_mask)
                if BIAS_GRAD:
                    dbias_acc += ds
        if BIAS_GRAD:
            tl.store(dbias_ws_ptr + ((h * chunks + chunk) * T_PAD + i) * T_PAD + j, dbias_acc)


def _pads(T: int, D: int) -> tuple[int, int]:
    return max(16, next_pow2(T)), max(16, next_pow2(D))


class TemporalConfig(NamedTuple):
    t_pad: int
    d_pad: int
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block Triton allocates (upper bound over sm_80/86/89/90/120)


def temporal_shared_bytes(kernel: str, ieee: bool, t_pad: int, d_pad: int, rotary: bool = False) -> int:
    """Shared memory (bytes per block) of the temporal kernel ``kernel`` ("fwd" / "bwd") for T_PAD x D_PAD tiles.

    The temporal kernels keep whole tiles on chip and loop over problems, not over tiles, so nothing is pipelined
    and the shared memory is the scratch Triton allocates for the layout conversions of whole tiles (dot
    operands, transposes): it grows with T_PAD·D_PAD and T_PAD² (the score tiles) and neither num_warps nor
    num_stages changes it (within 0.5 KB). Fitted upper bounds of what Triton 3.8 and 3.9 allocate on sm_86 and
    sm_90 (sm_90's wgmma operand layouts need the most for fp16/bf16 at T_PAD = 64), exact to 0.5 KB on the
    largest tiles (fp32 backward at 64 x 256: 272 KB); the compile check compares every configuration against
    each target's limit. Per-target figures: docs/triton_configs.md.
    Rotary (ROTARY): the backward's extra dots with the permuted operands need 8·T_PAD·D_PAD more bytes in fp32
    and up to 5.5x that in fp16/bf16 (sm_90 at 64 x 256; 4x elsewhere); the forward's scratch already covers its
    rotated tiles (measured with the compile check on sm_86 and sm_90, triton 3.8)."""
    td, tt = t_pad * d_pad, t_pad * t_pad
    if kernel == "fwd":  # the larger of the q/k/v operand scratch and the T x T score scratch
        return max(12 * td, 5 * tt) if ieee else max(6 * td, 4 * tt)
    rotary_extra = (8 * td if ieee else 6 * td) if rotary else 0
    return (16 * td + 4 * tt + 16 * t_pad if ieee else 8 * td + 2 * tt + 8 * t_pad) + rotary_extra


def temporal_config(
    kernel: str, T: int, D: int, dtype: torch.dtype, shared_limit: int = DEFAULT_SHARED_MEMORY, rotary: bool = False
) -> Optional[TemporalConfig]:
    """Launch configuration of the temporal kernel ``kernel`` ("fwd" / "bwd") for T frames of head dim D on a
    device with ``shared_limit`` bytes of shared memory per block, or None when the tiles do not fit (the op's
    reasons then exclude the triton backend for these inputs and ``auto`` moves on). A pure function of its
    arguments: the compile check calls it per target.

    Tiles are T_PAD x D_PAD, whole (see temporal_shared_bytes). num_warps grows with the tile so the fp32
    registers per thread stay bounded: the IEEE fp32 tiles need twice the registers of fp16/bf16 ones, and the
    backward holds about twice as many tiles as the forward (q, k, v, dO, O, P, dS and the T x T bias tiles).
    num_stages = 1: the loop over problems has a data-dependent branch and is not pipelined anyway."""
    t_pad, d_pad = _pads(T, D)
    ieee = dtype == torch.float32
    shared = temporal_shared_bytes(kernel, ieee, t_pad, d_pad, rotary)
    if shared > shared_limit:
        return None
    elements = t_pad * d_pad * (2 if ieee else 1) * (2 if kernel == "bwd" else 1)
    num_warps = 4 if elements < 4096 else 8 if elements < 16384 else 16
    return TemporalConfig(t_pad, d_pad, num_warps, 1, shared)


def temporal_shared_memory_reason(
    T: int, D: int, dtype: torch.dtype, device: torch.device, rotary: bool = False
) -> Optional[str]:
    """Why the temporal kernels cannot launch on ``device`` for T frames of head dim D (the forward's or the
    backward's tiles need more shared memory per block than it has), or None."""
    limit = _backend.shared_memory_per_block(device)
    for kernel in ("fwd", "bwd"):
        if temporal_config(kernel, T, D, dtype, limit, rotary) is None:
            t_pad, d_pad = _pads(T, D)
            need = temporal_shared_bytes(kernel, dtype == torch.float32, t_pad, d_pad, rotary)
            return (f"the temporal {'forward' if kernel == 'fwd' else 'backward'} kernel's {t_pad} x {d_pad} tiles "
                    f"({dtype}{', rotary' if rotary else ''}) need {need} bytes of shared memory per block, more "
                    f"than the device's {limit}")
    return None


def _temporal_launch_config(kernel: str, q: Tensor, rotary: bool = False) -> TemporalConfig:
    T, D = q.shape[1], q.shape[4]
    config = temporal_config(kernel, T, D, q.dtype, _backend.shared_memory_per_block(q.device), rotary)
    if config is None:  # the op's reasons exclude these inputs first; a direct call gets the same message
        why = temporal_shared_memory_reason(T, D, q.dtype, q.device, rotary)
        raise ValueError(f"temporal_attention triton backend: {why}")
    return config


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("temporal_attention triton backend: triton is not importable")
    T, D = q.shape[1], q.shape[4]
    if T > MAX_FRAMES or D > MAX_HEAD_DIM:
        raise ValueError(
            f"temporal_attention triton backend: needs T <= {MAX_FRAMES} and D <= {MAX_HEAD_DIM}, got T={T}, D={D}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1 and x.shape[-1] > 1 and x.numel() > 0:
            raise ValueError(f"temporal_attention triton backend: {name} needs stride(-1) == 1, got {x.stride()}")


def _dummy(device) -> Tensor:
    return torch.empty(1, device=device, dtype=torch.float32)


def temporal_attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor], causal: bool, scale: float
) -> Tuple[Tensor, Tensor]:
    return _temporal_fwd(q, k, v, bias, segment_ids, causal, scale, None, None, False)


def _temporal_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor], causal: bool,
    scale: float, rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], rotary_interleaved: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    _check(q, k, v)
    B, T, S, H, D = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, T, S, H), device=q.device, dtype=accumulation_dtype(q.dtype))
    if q.numel() == 0:
        return out, lse
    cfg = _temporal_launch_config("fwd", q, rotary_cos is not None)
    grid = (H, triton.cdiv(B * S, BLOCK_P))
    launch_triton(
        _temporal_fwd_kernel, grid,
        q, k, v, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4],
        bias if bias is not None else _dummy(q.device),
        segment_ids if segment_ids is not None else _dummy(q.device),
        out, lse, *_rotary_args(q, rotary_cos, rotary_sin), B, T, S, H, D, scale,
        rotary_cos.shape[1] if rotary_cos is not None else 0,
        HAS_BIAS=bias is not None, HAS_SEG=segment_ids is not None, CAUSAL=causal, IEEE=q.dtype == torch.float32,
        BLOCK_P=BLOCK_P, T_PAD=cfg.t_pad, D_PAD=cfg.d_pad, ROTARY=rotary_cos is not None,
        INTERLEAVED=rotary_interleaved, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def _rotary_args(q: Tensor, rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if rotary_cos is None:
        return _dummy(q.device), _dummy(q.device)
    T, D = q.shape[1], q.shape[4]
    rot_dim = rotary_cos.shape[-1]
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if tuple(x.shape) != (T, rot_dim) or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(
                f"temporal_attention triton backend: {name} must be contiguous float32 (T, rot_dim) = ({T}, "
                f"{rot_dim}), got {x.dtype} {tuple(x.shape)}"
            )
    if rot_dim % 2 or not 2 <= rot_dim <= D:
        raise ValueError(f"temporal_attention triton backend: rot_dim must be even and in [2, D={D}], got {rot_dim}")
    return rotary_cos, rotary_sin


def _grad_tensors(q: Tensor, packed: bool) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """(dqkv or None, dq, dk, dv): three contiguous (B, T, S, H, D) tensors, or the slices of one contiguous
    (B, T, S, 3, H, D) dqkv (token stride 3·H·D: the kernels take the token stride of dq, dk, dv)."""
    if packed:
        B, T, S, H, D = q.shape
        dqkv = torch.empty((B, T, S, 3, H, D), device=q.device, dtype=q.dtype)
        return (dqkv, *dqkv.unbind(3))
    return (None, *(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3)))


def _temporal_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
    segment_ids: Optional[Tensor], causal: bool, scale: float, needs_bias_grad: bool, packed: bool,
    rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = False,
) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dqkv or None, dq, dk, dv, dbias) of the temporal backward; see _grad_tensors."""
    _check(q, k, v)
    B, T, S, H, D = q.shape
    grad_out, out = grad_out.contiguous(), out.contiguous()
    dqkv, dq, dk, dv = _grad_tensors(q, packed)
    acc = accumulation_dtype(q.dtype)
    if q.numel() == 0:
        dbias = torch.zeros((H, T, T) if needs_bias_grad else (0,), device=q.device, dtype=acc)
        return dqkv, dq, dk, dv, dbias
    cfg = _temporal_launch_config("bwd", q, rotary_cos is not None)
    T_PAD = cfg.t_pad
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
        dq, dk, dv, workspace, *_rotary_args(q, rotary_cos, rotary_sin), B, T, S, H, D, scale, chunks, dq.stride(2),
        rotary_cos.shape[1] if rotary_cos is not None else 0,
        HAS_BIAS=bias is not None, BIAS_GRAD=needs_bias_grad, HAS_SEG=segment_ids is not None, CAUSAL=causal,
        IEEE=q.dtype == torch.float32, BLOCK_P=BLOCK_P, T_PAD=T_PAD, D_PAD=cfg.d_pad, ROTARY=rotary_cos is not None,
        INTERLEAVED=rotary_interleaved, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if needs_bias_grad:  # the per-program partial sums, added in a fixed order: deterministic
        dbias = workspace.sum(dim=1)[:, :T, :T].to(acc).contiguous()
    else:
        dbias = torch.empty((0,), device=q.device, dtype=acc)
    return dqkv, dq, dk, dv, dbias


def temporal_attention_bwd_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
    segment_ids: Optional[Tensor], causal: bool, scale: float, needs_bias_grad: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    _, dq, dk, dv, dbias = _temporal_bwd(
        grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, needs_bias_grad, packed=False
    )  # fmt: skip
    return dq, dk, dv, dbias


def temporal_attention_qkvpacked_fwd_triton(
    qkv: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor], causal: bool, scale: float
) -> Tuple[Tensor, Tensor]:
    """The temporal forward on the q, k, v slices of a packed (B, T, S, 3, H, D) qkv (views: no copy)."""
    return temporal_attention_fwd_triton(*_unpack_qkv(qkv), bias, segment_ids, causal, scale)


def temporal_attention_qkvpacked_bwd_triton(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor],
    causal: bool, scale: float, needs_bias_grad: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """(dqkv (B, T, S, 3, H, D) contiguous, dbias): the kernel writes the three gradients into one tensor."""
    dqkv, _, _, _, dbias = _temporal_bwd(
        grad_out, *_unpack_qkv(qkv), out, lse, bias, segment_ids, causal, scale, needs_bias_grad, packed=True
    )  # fmt: skip
    return dqkv, dbias


def temporal_attention_rotary_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor], causal: bool,
    scale: float, rotary_cos: Tensor, rotary_sin: Tensor, rotary_interleaved: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """The temporal forward with q and k rotated inside the kernel (rotary_cos, rotary_sin: (T, rot_dim) fp32)."""
    return _temporal_fwd(q, k, v, bias, segment_ids, causal, scale, rotary_cos, rotary_sin, rotary_interleaved)


def temporal_attention_rotary_bwd_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
    segment_ids: Optional[Tensor], causal: bool, scale: float, rotary_cos: Tensor, rotary_sin: Tensor,
    rotary_interleaved: bool, needs_bias_grad: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of the unrotated q, k (and v, bias); the tables get none."""
    _, dq, dk, dv, dbias = _temporal_bwd(
        grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, needs_bias_grad, False, rotary_cos,
        rotary_sin, rotary_interleaved,
    )  # fmt: skip
    return dq, dk, dv, dbias


def temporal_attention_rotary_qkvpacked_fwd_triton(
    qkv: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor], causal: bool, scale: float,
    rotary_cos: Tensor, rotary_sin: Tensor, rotary_interleaved: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    return _temporal_fwd(
        *_unpack_qkv(qkv), bias, segment_ids, causal, scale, rotary_cos, rotary_sin, rotary_interleaved
    )  # fmt: skip


def temporal_attention_rotary_qkvpacked_bwd_triton(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor], segment_ids: Optional[Tensor],
    causal: bool, scale: float, rotary_cos: Tensor, rotary_sin: Tensor, rotary_interleaved: bool,
    needs_bias_grad: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    dqkv, _, _, _, dbias = _temporal_bwd(
        grad_out, *_unpack_qkv(qkv), out, lse, bias, segment_ids, causal, scale, needs_bias_grad, True, rotary_cos,
        rotary_sin, rotary_interleaved,
    )  # fmt: skip
    return dqkv, dbias


def _unpack_qkv(qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f"qkv must have shape (B, T, S, 3, H, D), got {tuple(qkv.shape)}")
    return qkv.unbind(3)


# ---------------------------------------------------------------------------------------------------------
# Spatial attention (FlashAttention-2)
# ---------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b in fp32: IEEE fp32 FMAs for fp32 operands, tensor cores (fp32 accumulation) for fp16/bf16."""
        if IEEE:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def _spatial_problem(
        q_ptr, k_ptr, v_ptr, qsb, qst, qsh, ksb, kst, ksh, vsb, vst, vsh, T, S, H, PROBLEMS_ON_AXIS0: tl.constexpr
    ):  # fmt: skip
        """This program's row block, and problem (b, t, h) = (b·T + t)·H + h as pointers to its token 0 in q, k, v
        plus the int64 offset of its token 0 in a contiguous (B, T, S, H) tensor (lse, delta; token s is H further
        per s, and the same token of a contiguous (B, T, S, H, D) tensor sits at D times that). See spatial_grid."""
        if PROBLEMS_ON_AXIS0:
            problem = tl.program_id(0).to(tl.int64)
            block = tl.program_id(1)
        else:
            block = tl.program_id(0)
            problem = tl.program_id(1).to(tl.int64)
        b = problem // (T * H)
        t = (problem // H) % T
        h = problem % H
        q_base = q_ptr + b * qsb + t * qst + h * qsh
        k_base = k_ptr + b * ksb + t * kst + h * ksh
        v_base = v_ptr + b * vsb + t * vst + h * vsh
        return block, q_base, k_base, v_base, (problem // H) * S * H + h

    @triton.jit
    def _rows_tile(rows, stride, S, D, D_PAD: tl.constexpr):
        """Offsets (int64) and in-bounds mask of the (len(rows), D_PAD) tile of tokens ``rows``."""
        cols = tl.arange(0, D_PAD)
        offs = rows.to(tl.int64)[:, None] * stride + cols[None, :]
        return offs, (rows[:, None] < S) & (cols[None, :] < D)

    @triton.jit
    def _load_rows(base_ptr, rows, stride, S, D, D_PAD: tl.constexpr):
        offs, mask = _rows_tile(rows, stride, S, D, D_PAD)
        return tl.load(base_ptr + offs, mask=mask, other=0.0)

    @triton.jit
    def _load_kv(k_base, v_base, keys, kss, vss, S, D, D_PAD: tl.constexpr):
        return _load_rows(k_base, keys, kss, S, D, D_PAD), _load_rows(v_base, keys, vss, S, D, D_PAD)

    @triton.jit
    def _load_lse2(lse_ptr, stat_offs, rows, S):
        """lse · log2(e) of the query rows (0 past S): P = exp2(score · scale · log2(e) − lse2)."""
        return tl.load(lse_ptr + stat_offs, mask=rows < S, other=0.0) * 1.4426950408889634

    @triton.jit
    def _grad_offset(stat, H, D, gts):
        """Offset of the problem's token 0, head h, in a gradient of token stride gts: stat = frame_token0·H + h
        (from _spatial_problem) with frame_token0 = (b·T + t)·S."""
        return (stat // H) * gts + (stat % H) * D

    @triton.jit
    def _store_rows(base_ptr, rows, stride, tile, S, D, D_PAD: tl.constexpr):
        offs, mask = _rows_tile(rows, stride, S, D, D_PAD)
        tl.store(base_ptr + offs, tile.to(base_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _spatial_fwd_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, T, S, H, D), each with its own strides (sb, st, ss, sh) and stride(-1) == 1
        qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
        out_ptr,  # (B, T, S, H, D) contiguous, q's dtype
        lse_ptr,  # (B, T, S, H) fp32 contiguous, natural log
        T, S, H, D,
        qk_scale,  # scale · log2(e): scores in base 2
        PROBLEMS_ON_AXIS0: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        block, q_base, k_base, v_base, stat = _spatial_problem(
            q_ptr, k_ptr, v_ptr, qsb, qst, qsh, ksb, kst, ksh, vsb, vst, vsh, T, S, H, PROBLEMS_ON_AXIS0
        )  # fmt: skip
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, qss, S, D, D_PAD)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of the base-2 scores
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running Σ exp2(score − m_i)
        acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        for start in range(0, S, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k, v = _load_kv(k_base, v_base, keys, kss, vss, S, D, D_PAD)
            scores = _dot(q, tl.trans(k), IEEE) * qk_scale
            scores = tl.where(keys[None, :] < S, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every key block has a real key
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        acc = acc / l_i[:, None]
        _store_rows(out_ptr + stat * D, rows, H * D, acc, S, D, D_PAD)
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln 2: back to the natural log
        tl.store(lse_ptr + stat + rows.to(tl.int64) * H, lse, mask=rows < S)

    @triton.jit
    def _spatial_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, T, S, H, D) strided, stride(-1) == 1
        qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
        grad_out_ptr, out_ptr,  # (B, T, S, H, D) contiguous, q's dtype
        lse_ptr,  # (B, T, S, H) fp32 contiguous, natural log
        delta_ptr,  # (B, T, S, H) fp32 contiguous, written here: delta_i = dO_i·O_i
        dq_ptr,  # (B, T, S, H, D) q's dtype, token stride gts (H·D, or 3·H·D in a packed dqkv)
        T, S, H, D, scale, gts,
        qk_scale,  # scale · log2(e)
        PROBLEMS_ON_AXIS0: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        block, q_base, k_base, v_base, stat = _spatial_problem(
            q_ptr, k_ptr, v_ptr, qsb, qst, qsh, ksb, kst, ksh, vsb, vst, vsh, T, S, H, PROBLEMS_ON_AXIS0
        )  # fmt: skip
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows, qss, S, D, D_PAD)
        do = _load_rows(grad_out_ptr + stat * D, rows, H * D, S, D, D_PAD)
        o = _load_rows(out_ptr + stat * D, rows, H * D, S, D, D_PAD)
        stat_offs = stat + rows.to(tl.int64) * H
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(delta_ptr + stat_offs, delta, mask=rows < S)
        lse2 = _load_lse2(lse_ptr, stat_offs, rows, S)
        dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        for start in range(0, S, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k, v = _load_kv(k_base, v_base, keys, kss, vss, S, D, D_PAD)
            # Masked before exp2: a padded (zero) key scores 0, and exp2(0 − lse2) could overflow to inf.
            exponent = _dot(q, tl.trans(k), IEEE) * qk_scale - lse2[:, None]
            p = tl.exp2(tl.where(keys[None, :] < S, exponent, float("-inf")))
            dp = _dot(do, tl.trans(v), IEEE)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        _store_rows(dq_ptr + _grad_offset(stat, H, D, gts), rows, gts, dq * scale, S, D, D_PAD)

    @triton.jit
    def _spatial_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, T, S, H, D) strided, stride(-1) == 1
        qsb, qst, qss, qsh, ksb, kst, kss, ksh, vsb, vst, vss, vsh,
        grad_out_ptr,  # (B, T, S, H, D) contiguous, q's dtype
        lse_ptr, delta_ptr,  # (B, T, S, H) fp32 contiguous
        dk_ptr, dv_ptr,  # (B, T, S, H, D) q's dtype, token stride gts (H·D, or 3·H·D in a packed dqkv)
        T, S, H, D, scale, gts,
        qk_scale,  # scale · log2(e)
        PROBLEMS_ON_AXIS0: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        block, q_base, k_base, v_base, stat = _spatial_problem(
            q_ptr, k_ptr, v_ptr, qsb, qst, qsh, ksb, kst, ksh, vsb, vst, vsh, T, S, H, PROBLEMS_ON_AXIS0
        )  # fmt: skip
        keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, keys, kss, vss, S, D, D_PAD)
        dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
        for start in range(0, S, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, rows, qss, S, D, D_PAD)
            do = _load_rows(grad_out_ptr + stat * D, rows, H * D, S, D, D_PAD)
            stat_offs = stat + rows.to(tl.int64) * H
            lse2 = _load_lse2(lse_ptr, stat_offs, rows, S)
            delta = tl.load(delta_ptr + stat_offs, mask=rows < S, other=0.0)
            exponent = _dot(k, tl.trans(q), IEEE) * qk_scale - lse2[None, :]  # Pᵀ: (keys, queries)
            p_t = tl.exp2(tl.where((keys[:, None] < S) & (rows[None, :] < S), exponent, float("-inf")))
            dv += _dot(p_t.to(do.dtype), do, IEEE)
            ds_t = p_t * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, IEEE)
        grad_base = _grad_offset(stat, H, D, gts)
        _store_rows(dk_ptr + grad_base, keys, gts, dk * scale, S, D, D_PAD)
        _store_rows(dv_ptr + grad_base, keys, gts, dv, S, D, D_PAD)


class SpatialConfig(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    d_pad: int
    num_warps: int
    num_stages: int


def _c(block_m: int, block_n: int, num_warps: int, num_stages: int, shared: int) -> LaunchConfig:
    return LaunchConfig(block_m, block_n, num_warps, num_stages, shared)


# Candidate launch configurations per kernel, IEEE (fp32) or not, and D_PAD bucket (<= 64, 128, 256), in order of
# preference; spatial_config takes the first whose shared memory fits the device's opt-in limit per block.
# fwd and dq own BLOCK_M query rows and walk BLOCK_N keys; dkdv owns BLOCK_N keys and walks BLOCK_M queries.
# The first candidate of each list is the A100/H100 configuration written from the FA2 Triton tutorial's sizes
# with the register budget in mind (the owned tile and its fp32 accumulator stay in registers, the walked tiles
# are pipelined through shared memory, one buffer per stage; fp32 owns half the rows: IEEE fp32 dots need twice
# the registers per element). The later ones drop a pipeline stage, then halve a tile, until they fit the 99 KB of
# sm_86 / sm_89 / sm_120. fp32, D_PAD 128 forward: 64 x 64 with 3 stages needs 176 KB and spills 25-34 KB per
# thread (issue 14's sweep), so 64 x 32 with 2 stages (72 KB) is the only large one. ``shared`` (the last field,
# bytes) is the most Triton 3.8 and 3.9 (identical here) allocate for the configuration on sm_86 and sm_90 (the
# mma v2 and wgmma layout families) with 16-byte aligned pointers and integer arguments divisible by 16, as a
# launch on torch tensors specializes them (scripts/compile_check_triton.py --measure; every target:
# docs/triton_configs.md). Not timed on a GPU yet.
_SPATIAL_CANDIDATES = {
    ("fwd", False): {
        64: (_c(128, 64, 4, 3, 65536), _c(128, 64, 4, 2, 49152), _c(64, 64, 4, 2, 40960)),
        128: (_c(128, 64, 8, 3, 131072), _c(128, 64, 8, 2, 98304), _c(64, 64, 4, 2, 81920)),
        256: (_c(64, 32, 8, 2, 98304), _c(32, 32, 4, 2, 51200), _c(16, 32, 4, 2, 41984)),
    },
    ("dq", False): {
        64: (_c(128, 32, 4, 3, 57344), _c(128, 32, 4, 2, 49152), _c(64, 32, 4, 2, 32768)),
        128: (_c(64, 32, 8, 2, 65536), _c(32, 32, 4, 2, 34816)),
        256: (_c(32, 32, 8, 2, 67584), _c(16, 32, 4, 2, 50176)),
    },
    ("dkdv", False): {
        64: (_c(32, 128, 8, 3, 57856), _c(32, 128, 8, 2, 49408), _c(32, 64, 4, 2, 33024)),
        128: (_c(32, 64, 8, 2, 65792), _c(32, 32, 4, 2, 35072)),
        256: (_c(16, 64, 8, 2, 98432), _c(16, 32, 4, 2, 50304)),
    },
    ("fwd", True): {
        64: (_c(64, 64, 4, 3, 98304), _c(64, 64, 4, 2, 65536), _c(64, 32, 4, 2, 41216)),
        128: (_c(64, 32, 8, 2, 73728), _c(32, 32, 4, 2, 53248)),
        256: (_c(32, 32, 8, 2, 102528), _c(32, 16, 4, 2, 67712), _c(16, 16, 4, 2, 50240)),
    },
    ("dq", True): {
        64: (_c(64, 32, 4, 3, 73728), _c(64, 32, 4, 2, 57344), _c(32, 32, 4, 2, 36864)),
        128: (_c(32, 32, 8, 2, 69632), _c(32, 16, 4, 2, 51200)),
        256: (_c(16, 32, 8, 2, 100352), _c(16, 16, 4, 2, 66560)),
    },
    ("dkdv", True): {
        64: (_c(32, 64, 8, 3, 74240), _c(32, 64, 8, 2, 57600), _c(32, 32, 4, 2, 37120)),
        128: (_c(32, 32, 8, 2, 69888), _c(16, 32, 4, 2, 51328)),
        256: (_c(16, 32, 8, 2, 100480), _c(16, 16, 4, 2, 66688)),
    },
}


def spatial_config(
    kernel: str, S: int, D: int, dtype: torch.dtype, shared_limit: int = DEFAULT_SHARED_MEMORY
) -> Optional[SpatialConfig]:
    """Block sizes and launch options of a spatial kernel ("fwd", "dq" or "dkdv") for S tokens of head dim D on a
    device with ``shared_limit`` bytes of shared memory per block, or None if no candidate fits. A pure function
    of its arguments (and SPATIAL_MAX_BLOCK): the compile check calls it per target."""
    d_pad = next_pow2(max(D, 16))
    config = pick_config(_SPATIAL_CANDIDATES[(kernel, dtype == torch.float32)][max(64, d_pad)], shared_limit)
    if config is None:
        return None
    fit = min(SPATIAL_MAX_BLOCK, max(16, next_pow2(S)))  # tl.dot needs >= 16
    # Shrinking a tile to a short sequence only lowers the shared memory the configuration needs.
    block_m, block_n = max(16, min(config.block_m, fit)), max(16, min(config.block_n, fit))
    num_warps = config.num_warps
    shrunk = (block_m, block_n) != (config.block_m, config.block_n)
    if shrunk and block_m * block_n <= 32 * 32:  # a tile shrunk to a short sequence does not need 8 warps
        num_warps = min(num_warps, 4)
    return SpatialConfig(block_m, block_n, d_pad, num_warps, config.num_stages)


def spatial_grid(blocks: int, problems: int) -> Tuple[Tuple[int, int], bool]:
    """Launch grid of a spatial kernel with ``blocks`` row blocks per problem and ``problems`` = B·T·H problems,
    and whether the problems sit on axis 0. CUDA allows 2^31 − 1 programs on grid axis 0 but only 65,535 on
    axes 1 and 2: the problems stay on axis 1 (consecutive programs share a problem's k, v in L2) while they
    fit, and move to axis 0 otherwise."""
    if problems <= MAX_GRID_YZ and blocks <= _MAX_GRID_X:
        return (blocks, problems), False
    if blocks <= MAX_GRID_YZ and problems <= _MAX_GRID_X:
        return (problems, blocks), True
    raise ValueError(
        f"spatial_attention triton backend: {problems} problems of {blocks} row blocks do not fit a CUDA grid"
    )


def spatial_shared_memory_reason(D: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the spatial kernels cannot launch on ``device`` for head dim D (no configuration of some kernel fits its
    shared memory per block), or None."""
    limit = _backend.shared_memory_per_block(device)
    for kernel in ("fwd", "dq", "dkdv"):
        if spatial_config(kernel, 16, D, dtype, limit) is None:
            return (f"no launch configuration of the spatial {kernel} kernel for head dim D={D}, {dtype} fits the "
                    f"device's {limit} bytes of shared memory per block")
    return None


def _check_spatial(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("spatial_attention triton backend: triton is not importable")
    if q.shape[4] > MAX_HEAD_DIM:
        raise ValueError(f"spatial_attention triton backend: needs D <= {MAX_HEAD_DIM}, got D={q.shape[4]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1 and x.shape[-1] > 1 and x.numel() > 0:
            raise ValueError(f"spatial_attention triton backend: {name} needs stride(-1) == 1, got {x.stride()}")


def _launch_spatial(
    kernel, name: str, q: Tensor, k: Tensor, v: Tensor, *tensors: Tensor, scale: float, gts: Optional[int] = None
) -> None:
    """Launch the spatial kernel ``name`` ("fwd", "dq", "dkdv"): its arguments are q, k, v and their strides,
    ``tensors``, T, S, H, D, then (backward only) the scale and the gradients' token stride gts, then
    scale·log2(e) and the constexprs."""
    B, T, S, H, D = q.shape
    cfg = spatial_config(name, S, D, q.dtype, _backend.shared_memory_per_block(q.device))
    if cfg is None:  # the op's reasons exclude these inputs first; a direct call gets the same message
        raise ValueError(f"spatial_attention triton backend: {spatial_shared_memory_reason(D, q.dtype, q.device)}")
    owned = cfg.block_n if name == "dkdv" else cfg.block_m
    grid, problems_on_axis0 = spatial_grid(triton.cdiv(S, owned), B * T * H)
    scales = (scale * _LOG2E,) if name == "fwd" else (scale, gts, scale * _LOG2E)
    launch_triton(
        kernel, grid,
        q, k, v, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *tensors, T, S, H, D, *scales,
        PROBLEMS_ON_AXIS0=problems_on_axis0, IEEE=q.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_PAD=cfg.d_pad,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def spatial_attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    _check_spatial(q, k, v)
    B, T, S, H, D = q.shape
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((B, T, S, H), device=q.device, dtype=accumulation_dtype(q.dtype))
    if q.numel() == 0:
        return out, lse
    _launch_spatial(_spatial_fwd_kernel, "fwd", q, k, v, out, lse, scale=scale)
    return out, lse


def _spatial_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, packed: bool
) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """(dqkv or None, dq, dk, dv) of the spatial backward; see _grad_tensors."""
    _check_spatial(q, k, v)
    B, T, S, H, D = q.shape
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    dqkv, dq, dk, dv = _grad_tensors(q, packed)
    if q.numel() == 0:
        return dqkv, dq, dk, dv
    delta = torch.empty((B, T, S, H), device=q.device, dtype=torch.float32)
    gts = dq.stride(2)  # token stride of dq, dk, dv
    # dq first: it writes delta, which the dk/dv kernel reads (same stream, so ordered).
    _launch_spatial(_spatial_bwd_dq_kernel, "dq", q, k, v, grad_out, out, lse, delta, dq, scale=scale, gts=gts)
    _launch_spatial(_spatial_bwd_dkdv_kernel, "dkdv", q, k, v, grad_out, lse, delta, dk, dv, scale=scale, gts=gts)
    return dqkv, dq, dk, dv


def spatial_attention_bwd_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> Tuple[Tensor, Tensor, Tensor]:
    _, dq, dk, dv = _spatial_bwd(grad_out, q, k, v, out, lse, scale, packed=False)
    return dq, dk, dv


def spatial_attention_qkvpacked_fwd_triton(qkv: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """The spatial forward on the q, k, v slices of a packed (B, T, S, 3, H, D) qkv (views: no copy)."""
    return spatial_attention_fwd_triton(*_unpack_qkv(qkv), scale)


def spatial_attention_qkvpacked_bwd_triton(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float
) -> Tensor:
    """dqkv (B, T, S, 3, H, D) contiguous: the kernels write the three gradients into one tensor."""
    dqkv, _, _, _ = _spatial_bwd(grad_out, *_unpack_qkv(qkv), out, lse, scale, packed=True)
    return dqkv
