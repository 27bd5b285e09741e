"""Triton kernels of CogVideo dual-channel attention and the alpha mix (same contract as the C++/CUDA ops).

Attention, per (batch b, head h), tokens i (queries) and j (keys) of one sequence, scale s = D^-1/2:
    S_ij = s · q_i·k_j   (fp32),   visible(i, j) = key_visible(i, j) and (j >= text_len or pad[b, j])
    lse_i = log Σ_{j visible} exp(S_ij),   P_ij = exp(S_ij − lse_i) (0 where not visible),   out_i = Σ_j P_ij v_j
    a row with no visible key: out_i = 0, lse_i = +inf (then exp(S − lse) is exactly 0 in the backward: no NaN)
backward (P recomputed from lse; delta_i = dO_i·O_i):
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − delta),   dQ = s · dS K,   dK = s · dSᵀ Q

Visibility (masks.py / csrc/dual_channel_visibility.h, computed here from token indices by ``_pair_visible``;
no L x L mask exists). Tokens 0 .. text_len-1 are text; token t >= text_len is frame position p = t − text_len,
frame f = p // (gh·gw), raster r = p % (gh·gw), row y = r // gw, col x = r % gw.
    base:  text query -> text keys;  frame query -> text keys + own frame, causal (r_k <= r_q), except
           interpolation-stage even frames (0, 2, 4, ...; any frame count), which see their whole frame.
    plus:  text query -> nothing (out 0);  frame query -> text keys + frame keys of its spatial group ("full":
           the whole grid; "window": window x window cells, on shifted layers the Swin groups of the grid rolled
           by −window/2, the wrapped strip a group of its own per axis) that are
           sequential:     p_k <= p_q;
           interpolation:  in an even frame, or (odd query frame) in its own frame with r_k <= r_q or in an
                           earlier odd frame.

Shapes / dtypes (the torchnova::cogvideo_attention_fwd / _bwd contract of csrc/dual_channel_ops.cpp):
    q, k, v            (B, L, H, D) fp32 / fp16 / bf16, any strides with stride(-1) == 1
    text_pad_mask      (B, text_len) bool or None, True = real token (read as uint8)
    out                (B, L, H, D) q.dtype contiguous;  lse (B, L, H) fp32 contiguous (natural log)
    grad_out           (B, L, H, D) contiguous;  dq, dk, dv (B, L, H, D) q.dtype contiguous
Mix (torchnova::dual_channel_mix_fwd / _bwd), a = sigmoid(alpha_logit):
    y[:, :text_len] = o_base[:, :text_len];   y[:, text_len:] = a·o_base + (1 − a)·o_plus
    d_base = g (text rows) | a·g (frame rows);   d_plus = 0 | (1 − a)·g;
    d_alpha_logit[c] = a_c (1 − a_c) Σ_{b, frame rows} g (o_base − o_plus)
    o_base, o_plus, grad_y (B, L, C); alpha_logit (C,); y, d_base, d_plus (B, L, C) o_base.dtype contiguous;
    d_alpha_logit (C,) fp32.

Algorithm: FlashAttention-2. Forward: one program per (query tile of BLOCK_M tokens, b·H + h), online softmax
in base 2 (scores pre-multiplied by s·log2 e, exp2; running max m, running sum l, rescale by exp2(m_old −
m_new); a running max still at −inf is shifted by 0, so no −inf − (−inf)). Backward: a delta preprocess
kernel; a dK/dV kernel, one program per key tile, looping over the query tiles (text keys collect gradient
from every frame row that sees them); a separate dQ kernel, one program per query tile, looping over key
tiles. Every gradient element is written by exactly one program: deterministic, no atomics.

Tile skipping: ``_block_may_see`` is block_may_see of csrc/dual_channel_visibility.h, a conservative test that is
false only when no query of a tile sees any key of a tile (O(1) scalar integer work: frame ranges, causal
bounds, and per axis the intervals of spatial groups a token range touches). A pre-pass kernel
(``_tile_list_kernel``, one program per row tile, independent of batch and head) runs it for every tile pair and
writes, per query tile (forward, dQ) or per key tile (dK/dV), the list of partner tiles that may hold a visible
pair: (L / BLOCK) x (L / BLOCK) int32 at most, never an L x L mask. The attention kernels loop over their list
only, so a skipped tile costs nothing there (no load, no test) and the cost follows the visible pairs, not L².
``tile_table`` returns those lists as a boolean (query tile, key tile) table (tests, benchmarks).

Blocks: per kernel, padded head dim and dtype from _CONFIGS (fp16/bf16, D <= 64: forward 64 x 32, dK/dV 64 x 32,
dQ 32 x 64 (query x key tokens), 4 warps, 3 stages), the first candidate whose shared memory fits the device's
opt-in limit per block (fewer stages on the 99 KB cards where needed), chosen so that ptxas reports no register
spill over 1 KB; D padded to a power of two >= 16 (tl.dot's minimum; padded columns load 0 and are never
stored). fp32 inputs use IEEE fp32 dots (input_precision="ieee"), fp16/bf16 their tensor-core dots with fp32
accumulation. Not autotuned and not timed: nothing here has run on a GPU yet (every configuration compiles for
sm_80 / sm_86 / sm_89 / sm_90 / sm_120 within its limit, scripts/compile_check_triton.py, and the kernels pass the
interpreter tests).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._backend import DEFAULT_SHARED_MEMORY
from .._library import LaunchConfig, launch_triton, next_pow2, pick_config
from .masks import CHANNELS, STAGES

try:  # the package must import without triton (CPU-only torch builds)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON", "cogvideo_attention_fwd_triton", "cogvideo_attention_bwd_triton", "dual_channel_mix_fwd_triton",
    "dual_channel_mix_bwd_triton", "tile_table", "BLOCK_M", "BLOCK_N", "MAX_HEAD_DIM", "MAX_BATCH_HEADS",
]  # fmt: skip

def _c(block_m: int, block_n: int, num_warps: int, num_stages: int, shared: int) -> LaunchConfig:
    return LaunchConfig(block_m, block_n, num_warps, num_stages, shared)


# Launch configurations per (IEEE fp32 dots or not, D_PAD bucket): for each kernel (forward, dK/dV, dQ) the
# candidates (query tile BLOCK_M, key tile BLOCK_N, num_warps, num_stages, shared bytes) in order of preference;
# _config takes the first whose shared memory fits the device's opt-in limit per block. Picked without a GPU: the
# first candidates are the largest tiles for which ptxas (triton 3.8, sm_86) reported no register spill in the
# heaviest mode; where they need more than the 99 KB of an sm_86 / sm_89 / sm_120 block, the fallback drops a
# pipeline stage (the walked k/v or q/dO tiles are the ones staged in shared memory, one buffer per stage).
# ``shared`` is the most Triton 3.8 and 3.9 (identical here) allocate for the configuration on sm_86 and sm_90
# (the two layouts families: mma v2 for sm_80/86/89/120, wgmma for sm_90) with every pointer 16-byte aligned and
# every integer argument divisible by 16, as a launch on torch tensors specializes them (then loads are staged with
# cp.async: without that specialization the figures are up to 40 % lower), in the plus / window / interpolation
# mode (scripts/compile_check_triton.py --measure; every target and mode: docs/triton_configs.md). dK/dV owns
# BLOCK_N keys and walks BLOCK_M queries: at fp32, D = 64 a 64-query walk spills 13-16 KB per thread on
# sm_86/89/90/120 in the plus / full / sequential mode (issue 14's sweep), a 32-query one does not. Not timed.
_CONFIGS = {  # (ieee, D_PAD): (forward candidates, dK/dV candidates, dQ candidates)
    (False, 64): (
        (_c(64, 32, 4, 3, 32768),),
        (_c(64, 32, 4, 3, 46080),),
        (_c(32, 64, 4, 3, 45056),),
    ),
    (False, 128): (
        (_c(64, 64, 8, 3, 114688), _c(64, 64, 8, 2, 81920)),  # 3 stages: 104-112 KB
        (_c(32, 32, 4, 3, 51712),),
        (_c(64, 64, 8, 3, 131072), _c(64, 64, 8, 2, 98304)),  # 3 stages: 104 KB on sm_86, 128 KB on sm_90
    ),
    (False, 256): (
        (_c(32, 32, 8, 3, 83968), _c(32, 32, 8, 2, 51200)),
        (_c(16, 16, 4, 3, 49920),),
        (_c(32, 32, 8, 3, 100352), _c(32, 32, 8, 2, 67584)),
    ),
    (True, 64): (
        (_c(64, 32, 8, 2, 41216),),
        (_c(32, 32, 8, 2, 37120),),  # a 64-query walk spills 13-16 KB in the plus / full / sequential mode
        (_c(64, 32, 8, 2, 57344),),
    ),
    (True, 128): (
        (_c(32, 64, 8, 2, 90240), _c(32, 32, 8, 2, 53248)),
        (_c(32, 32, 8, 2, 69888),),
        (_c(32, 32, 8, 2, 69632),),
    ),
    (True, 256): (
        (_c(16, 16, 4, 2, 50240),),
        (_c(16, 16, 4, 2, 66688),),
        (_c(16, 16, 4, 2, 66560),),
    ),
}
# Caps on the query / key tile of every kernel (module-level: tests shrink them to 16 so that tiny grids have
# several tiles and the skip logic runs).
BLOCK_M = 128
BLOCK_N = 128
MAX_HEAD_DIM = 256
MAX_BATCH_HEADS = 65535  # B·H rides on grid axis 1 (query / key tiles on axis 0, so a head's tiles run together)
MIX_BLOCK_R = 32  # rows per mix program (the alpha-gradient partial sums are per (row chunk, channel))
MIX_BLOCK_C = 128  # channels per mix program
_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:

    # -----------------------------------------------------------------------------------------------------
    # The visibility rule (pairs) and the tile test (scalars)
    # -----------------------------------------------------------------------------------------------------

    @triton.jit
    def _token_coords(t, text_len, frame_size, grid_w, window, shift):
        """Token indices t (a row or column vector) -> frame position p (0 for text), frame f, raster r and the
        row / column spatial groups (group of a coordinate c: (c + window − shift) // window, see _axis_groups).
        The arithmetic runs in int64 (only non-negative values meet // and %); the results are int32."""
        p = tl.maximum(tl.cast(t, tl.int64) - text_len, 0)
        f = p // frame_size
        r = p - f * frame_size
        y = r // grid_w
        group_y = (y + window - shift) // window
        group_x = (r - y * grid_w + window - shift) // window
        return p.to(tl.int32), f.to(tl.int32), r.to(tl.int32), group_y.to(tl.int32), group_x.to(tl.int32)

    @triton.jit
    def _pair_visible(
        qi,  # query token indices, broadcastable against kj (e.g. (BLOCK_M, 1))
        kj,  # key token indices (e.g. (1, BLOCK_N))
        text_len, frame_size, grid_w, window, shift,
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr,
    ):  # fmt: skip
        """key_visible(query, key) of dual_channel_visibility.h, elementwise (text padding not applied)."""
        k_text = kj < text_len
        q_frame = qi >= text_len
        pq, fq, rq, gyq, gxq = _token_coords(qi, text_len, frame_size, grid_w, window, shift)
        pk, fk, rk, gyk, gxk = _token_coords(kj, text_len, frame_size, grid_w, window, shift)
        if CHANNEL == 0:  # base: text keys for everyone; frame queries their own frame
            if STAGE == 0:
                own = (fq == fk) & (rk <= rq)
            else:
                own = (fq == fk) & ((rk <= rq) | (fq % 2 == 0))
            visible = k_text | (own & q_frame)
        else:  # plus: text queries see nothing
            if STAGE == 0:
                time = pk <= pq
            else:
                time = (fk % 2 == 0) | ((fq % 2 == 1) & (((fk == fq) & (rk <= rq)) | (fk < fq)))
            if ATTENTION == 1:
                time = time & (gyq == gyk) & (gxq == gxk)
            visible = (k_text | time) & q_frame
        return visible

    @triton.jit
    def _axis_groups(p_lo, p_hi, grid_h, grid_w, window, shift, ROWS: tl.constexpr):
        """Spatial groups of one axis (rows if ROWS, else columns) touched by frame positions [p_lo, p_hi], as two
        group intervals [a0, a1] and [b0, b1] (b = a when one suffices).

        The coordinates touched: [lo, hi]; [lo, size − 1] and [0, hi] for a range that wraps past the end of a
        row (columns) or of a frame (rows); all of them for one that covers the axis. The group of a coordinate
        c is (c + window − shift) // window: not shifted c // window + 1; shifted by s = window // 2, the
        wrapped strip c < s is group 0 and the rolled windows are (c − s) // window + 1 (the Swin region rule in
        original coordinates). It is monotone in c, so a coordinate interval maps to [group(lo), group(hi)]."""
        row_lo = p_lo // grid_w
        row_hi = p_hi // grid_w
        if ROWS:
            size = grid_h
            c_lo = row_lo % grid_h
            c_hi = row_hi % grid_h
            every = row_hi - row_lo + 1 >= grid_h
            single = c_lo <= c_hi
        else:
            size = grid_w
            c_lo = p_lo % grid_w
            c_hi = p_hi % grid_w
            every = (row_hi - row_lo >= 2) | ((row_hi > row_lo) & (c_hi + 1 >= c_lo))
            single = row_hi == row_lo
        a0 = tl.where(every, 0, c_lo)
        a1 = tl.where(every | (single == 0), size - 1, c_hi)
        b0 = tl.where(every | single, a0, 0)
        b1 = tl.where(every | single, a1, c_hi)
        offset = window - shift
        return (a0 + offset) // window, (a1 + offset) // window, (b0 + offset) // window, (b1 + offset) // window

    @triton.jit
    def _axis_may_meet(pq_lo, pq_hi, pk_lo, pk_hi, grid_h, grid_w, window, shift, ROWS: tl.constexpr):
        """Whether some query position and some key position may share a spatial group along one axis."""
        qa0, qa1, qb0, qb1 = _axis_groups(pq_lo, pq_hi, grid_h, grid_w, window, shift, ROWS)
        ka0, ka1, kb0, kb1 = _axis_groups(pk_lo, pk_hi, grid_h, grid_w, window, shift, ROWS)
        meet = ((qa0 <= ka1) & (ka0 <= qa1)) | ((qa0 <= kb1) & (kb0 <= qa1))
        return meet | ((qb0 <= ka1) & (ka0 <= qb1)) | ((qb0 <= kb1) & (kb0 <= qb1))

    @triton.jit
    def _block_may_see(
        q_lo, q_hi, k_lo, k_hi,  # token ranges [q_lo, q_hi) x [k_lo, k_hi)
        text_len, frame_size, grid_h, grid_w, window, shift,
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr,
    ):  # fmt: skip
        """block_may_see of dual_channel_visibility.h: false only if no query of the tile sees a key of it.
        Scalar int64 arithmetic (a few dozen operations per tile pair)."""
        q_lo = tl.cast(q_lo, tl.int64)
        q_hi = tl.cast(q_hi, tl.int64)
        k_lo = tl.cast(k_lo, tl.int64)
        k_hi = tl.cast(k_hi, tl.int64)
        nonempty = (q_lo < q_hi) & (k_lo < k_hi)
        if CHANNEL == 0:  # text keys: seen by every query of the base channel, by frame queries of plus
            text_hit = k_lo < text_len
        else:
            text_hit = (k_lo < text_len) & (q_hi > text_len)
        kf_lo = tl.maximum(k_lo, text_len)
        qf_lo = tl.maximum(q_lo, text_len)
        frames_ok = (kf_lo < k_hi) & (qf_lo < q_hi)
        pq_lo = tl.maximum(qf_lo - text_len, 0)
        pq_hi = tl.maximum(q_hi - 1 - text_len, 0)
        pk_lo = tl.maximum(kf_lo - text_len, 0)
        pk_hi = tl.maximum(k_hi - 1 - text_len, 0)
        fq_lo = pq_lo // frame_size
        fq_hi = pq_hi // frame_size
        fk_lo = pk_lo // frame_size
        fk_hi = pk_hi // frame_size
        if CHANNEL == 0:  # a shared frame, and a key at or before a query (or a fully visible even frame)
            f_lo = tl.maximum(fq_lo, fk_lo)
            f_hi = tl.minimum(fq_hi, fk_hi)
            frame_hit = (f_lo <= f_hi) & (pk_lo <= pq_hi)
            if STAGE == 1:
                frame_hit = (f_lo <= f_hi) & ((pk_lo <= pq_hi) | (f_hi > f_lo) | (f_lo % 2 == 0))
        else:
            if STAGE == 0:
                frame_hit = pk_lo <= pq_hi
            else:  # an even key frame in range; or one odd key frame fk: a later odd query frame, or fk causally
                first_odd = tl.maximum(fq_lo, fk_lo + 1)
                first_odd = first_odd + (first_odd % 2 == 0).to(first_odd.dtype)
                own = (fq_lo <= fk_lo) & (fk_lo <= fq_hi) & (pk_lo <= pq_hi)
                frame_hit = (fk_hi > fk_lo) | (fk_lo % 2 == 0) | (first_odd <= fq_hi) | own
            if ATTENTION == 1:
                rows = _axis_may_meet(pq_lo, pq_hi, pk_lo, pk_hi, grid_h, grid_w, window, shift, True)
                cols = _axis_may_meet(pq_lo, pq_hi, pk_lo, pk_hi, grid_h, grid_w, window, shift, False)
                frame_hit = frame_hit & rows & cols
        return nonempty & (text_hit | (frames_ok & frame_hit))

    @triton.jit
    def _tile_list_kernel(
        list_ptr,  # (rows, cols) int32: row r's column tiles that may hold a visible pair, in its first count[r] slots
        count_ptr,  # (rows,) int32
        L, cols,  # sequence length; column tiles cdiv(L, COL_BLOCK) (= the row stride of list)
        text_len, frame_size, grid_h, grid_w, window, shift,  # layout (frame_size = grid_h·grid_w; shift 0 or w/2)
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr,  # 0/1 codes: base/plus, full/window...
        ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr, ROWS_ARE_KEYS: tl.constexpr,  # tile sizes; rows = keys?
    ):  # fmt: skip
        """The pre-pass of every attention launch: one program per row tile (query tiles, or key tiles for the
        dK/dV kernel) runs the tile test against every column tile. The attention kernels then loop over their
        list only, so skipped tiles cost nothing there, not even the test."""
        r = tl.program_id(0)
        r_lo = r * ROW_BLOCK
        r_hi = tl.minimum(r_lo + ROW_BLOCK, L)
        n = tl.full([], 0, tl.int32)
        for c in range(0, cols):
            c_lo = c * COL_BLOCK
            c_hi = tl.minimum(c_lo + COL_BLOCK, L)
            if ROWS_ARE_KEYS:
                may = _block_may_see(c_lo, c_hi, r_lo, r_hi, text_len, frame_size, grid_h, grid_w, window, shift,
                                     CHANNEL, ATTENTION, STAGE)  # fmt: skip
            else:
                may = _block_may_see(r_lo, r_hi, c_lo, c_hi, text_len, frame_size, grid_h, grid_w, window, shift,
                                     CHANNEL, ATTENTION, STAGE)  # fmt: skip
            if may:
                tl.store(list_ptr + r.to(tl.int64) * cols + n, c)
                n += 1
        tl.store(count_ptr + r, n)

    @triton.jit
    def _visible_tile(
        qi, kj,  # token indices, e.g. (BLOCK_M, 1) x (1, BLOCK_N) or transposed
        pad_row_ptr,  # (text_len,) uint8 of this batch row, or a dummy
        L, text_len, frame_size, grid_w, window, shift,
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr, HAS_PAD: tl.constexpr,
    ):  # fmt: skip
        """Pairs visible in this batch row: the rule, both tokens in range, padded text keys removed."""
        visible = _pair_visible(qi, kj, text_len, frame_size, grid_w, window, shift, CHANNEL, ATTENTION, STAGE)
        visible = visible & (qi < L) & (kj < L)
        if HAS_PAD:
            real = tl.load(pad_row_ptr + kj, mask=kj < text_len, other=1)
            visible = visible & (real != 0)
        return visible

    # -----------------------------------------------------------------------------------------------------
    # Tiles and dots
    # -----------------------------------------------------------------------------------------------------

    @triton.jit
    def _load_rows(
        ptr,  # (B, L, H, D) base pointer
        b, h, first, L, D,
        s_b, s_l, s_h,  # element strides of dims 0, 1, 2 (dim 3 has stride 1)
        BLOCK: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        """The (BLOCK, D_PAD) tile of tokens first .. first + BLOCK − 1 of (b, h), zero outside (L, D)."""
        rows = first + tl.arange(0, BLOCK)
        cols = tl.arange(0, D_PAD)
        offs = b.to(tl.int64) * s_b + rows.to(tl.int64)[:, None] * s_l + h * s_h + cols[None, :]
        return tl.load(ptr + offs, mask=(rows[:, None] < L) & (cols[None, :] < D), other=0.0)

    @triton.jit
    def _store_rows(ptr, tile, b, h, first, L, H, D, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
        """Store a (BLOCK, D_PAD) tile into a contiguous (B, L, H, D) tensor (rows < L, cols < D)."""
        rows = first + tl.arange(0, BLOCK)
        cols = tl.arange(0, D_PAD)
        offs = ((b.to(tl.int64) * L + rows[:, None]) * H + h) * D + cols[None, :]
        tl.store(ptr + offs, tile.to(ptr.dtype.element_ty), mask=(rows[:, None] < L) & (cols[None, :] < D))

    @triton.jit
    def _row_stat_offsets(b, h, first, L, H, BLOCK: tl.constexpr):
        """(BLOCK,) offsets into a contiguous (B, L, H) tensor (lse, delta) and the in-range mask."""
        rows = first + tl.arange(0, BLOCK)
        return (b.to(tl.int64) * L + rows) * H + h, rows < L

    @triton.jit
    def _mma(a, b, IEEE: tl.constexpr):
        """a @ b with fp32 accumulation: IEEE fp32 dots for fp32 inputs, else a cast to b's dtype (tensor cores)."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _key_tile(
        k_ptr, v_ptr, ks_b, ks_l, ks_h, vs_b, vs_l, vs_h,  # (B, L, H, D) strided
        list_ptr, tile, cols, n,  # the n-th key tile of query tile `tile`'s list
        b, h, qi, pad_row_ptr, L, D, text_len, frame_size, grid_w, window, shift,
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr, HAS_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    ):  # fmt: skip
        """The k and v tiles of the n-th listed key tile and its visibility against the queries qi (BLOCK_M, 1)."""
        k_lo = tl.load(list_ptr + tile.to(tl.int64) * cols + n) * BLOCK_N
        k = _load_rows(k_ptr, b, h, k_lo, L, D, ks_b, ks_l, ks_h, BLOCK_N, D_PAD)
        v = _load_rows(v_ptr, b, h, k_lo, L, D, vs_b, vs_l, vs_h, BLOCK_N, D_PAD)
        kj = (k_lo + tl.arange(0, BLOCK_N))[None, :]
        visible = _visible_tile(qi, kj, pad_row_ptr, L, text_len, frame_size, grid_w, window, shift,
                                CHANNEL, ATTENTION, STAGE, HAS_PAD)  # fmt: skip
        return k, v, visible

    # -----------------------------------------------------------------------------------------------------
    # Attention kernels
    # -----------------------------------------------------------------------------------------------------

    @triton.jit
    def _cogvideo_fwd_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, L, H, D) q.dtype, strides (s_b, s_l, s_h) each, stride(-1) == 1
        qs_b, qs_l, qs_h, ks_b, ks_l, ks_h, vs_b, vs_l, vs_h,  # element strides of dims 0, 1, 2
        pad_ptr,  # (B, text_len) uint8, 1 = real text token; a dummy when HAS_PAD is false
        list_ptr, count_ptr,  # (cdiv(L, BLOCK_M), cols) / (cdiv(L, BLOCK_M),) int32: key tiles per query tile
        out_ptr,  # (B, L, H, D) q.dtype contiguous
        lse_ptr,  # (B, L, H) fp32 contiguous, natural log; +inf for rows with no visible key
        L, H, D, cols, qk_scale,  # sizes; list row stride; qk_scale = D^-1/2 · log2(e)
        text_len, frame_size, grid_w, window, shift,  # layout (see _tile_list_kernel)
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr, HAS_PAD: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,  # tiles, padded D
    ):  # fmt: skip
        tile = tl.program_id(0)
        q_lo = tile * BLOCK_M
        b, h = tl.program_id(1) // H, tl.program_id(1) % H
        qi = (q_lo + tl.arange(0, BLOCK_M))[:, None]
        pad_row_ptr = pad_ptr + b * text_len
        q = _load_rows(q_ptr, b, h, q_lo, L, D, qs_b, qs_l, qs_h, BLOCK_M, D_PAD)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        for n in range(0, tl.load(count_ptr + tile)):
            k, v, visible = _key_tile(k_ptr, v_ptr, ks_b, ks_l, ks_h, vs_b, vs_l, vs_h, list_ptr, tile, cols, n, b, h,
                                      qi, pad_row_ptr, L, D, text_len, frame_size, grid_w, window, shift, CHANNEL,
                                      ATTENTION, STAGE, HAS_PAD, BLOCK_N, D_PAD)  # fmt: skip
            scores = tl.where(visible, _mma(q, tl.trans(k), IEEE) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            shift_by = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.exp2(scores - shift_by[:, None])
            rescale = tl.exp2(m_i - shift_by)
            l_i = l_i * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + _mma(p, v, IEEE)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        _store_rows(out_ptr, out, b, h, q_lo, L, H, D, BLOCK_M, D_PAD)
        stat_offs, in_range = _row_stat_offsets(b, h, q_lo, L, H, BLOCK_M)
        lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
        tl.store(lse_ptr + stat_offs, lse, mask=in_range)

    @triton.jit
    def _cogvideo_bwd_delta_kernel(
        out_ptr, grad_out_ptr,  # (B, L, H, D) contiguous
        delta_ptr,  # (B, L, H) fp32 contiguous: delta = rowsum(dO ∘ O)
        L, H, D, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,  # sizes, rows per program, padded D
    ):  # fmt: skip
        first = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        o = _load_rows(out_ptr, b, h, first, L, D, L * H * D, H * D, D, BLOCK_M, D_PAD)
        do = _load_rows(grad_out_ptr, b, h, first, L, D, L * H * D, H * D, D, BLOCK_M, D_PAD)
        offs, in_range = _row_stat_offsets(b, h, first, L, H, BLOCK_M)
        tl.store(delta_ptr + offs, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=in_range)

    @triton.jit
    def _load_row_stats(lse_ptr, delta_ptr, b, h, first, L, H, BLOCK: tl.constexpr):
        """(BLOCK,) lse · log2(e) and delta of tokens first .. first + BLOCK − 1 (0 outside L)."""
        offs, in_range = _row_stat_offsets(b, h, first, L, H, BLOCK)
        lse2 = tl.load(lse_ptr + offs, mask=in_range, other=0.0) * 1.4426950408889634
        return lse2, tl.load(delta_ptr + offs, mask=in_range, other=0.0)

    @triton.jit
    def _cogvideo_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, L, H, D) q.dtype, strides (s_b, s_l, s_h) each, stride(-1) == 1
        qs_b, qs_l, qs_h, ks_b, ks_l, ks_h, vs_b, vs_l, vs_h,  # element strides of dims 0, 1, 2
        grad_out_ptr,  # (B, L, H, D) q.dtype contiguous
        lse_ptr, delta_ptr,  # (B, L, H) fp32 contiguous
        pad_ptr,  # (B, text_len) uint8 or a dummy
        list_ptr, count_ptr,  # (cdiv(L, BLOCK_N), cols) / (cdiv(L, BLOCK_N),) int32: query tiles per key tile
        dk_ptr, dv_ptr,  # (B, L, H, D) q.dtype contiguous
        L, H, D, cols, scale, qk_scale,  # sizes; list row stride; scale = D^-1/2, qk_scale = scale · log2(e)
        text_len, frame_size, grid_w, window, shift,  # layout (see _tile_list_kernel)
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr, HAS_PAD: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,  # tiles, padded D
    ):  # fmt: skip
        """One key tile; loops over the query tiles that may see it, on transposed (key, query) tiles."""
        tile = tl.program_id(0)
        k_lo = tile * BLOCK_N
        b, h = tl.program_id(1) // H, tl.program_id(1) % H
        kj = (k_lo + tl.arange(0, BLOCK_N))[:, None]
        pad_row_ptr = pad_ptr + b * text_len
        k = _load_rows(k_ptr, b, h, k_lo, L, D, ks_b, ks_l, ks_h, BLOCK_N, D_PAD)
        v = _load_rows(v_ptr, b, h, k_lo, L, D, vs_b, vs_l, vs_h, BLOCK_N, D_PAD)
        dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        for n in range(0, tl.load(count_ptr + tile)):
            q_lo = tl.load(list_ptr + tile.to(tl.int64) * cols + n) * BLOCK_M
            q = _load_rows(q_ptr, b, h, q_lo, L, D, qs_b, qs_l, qs_h, BLOCK_M, D_PAD)
            do = _load_rows(grad_out_ptr, b, h, q_lo, L, D, L * H * D, H * D, D, BLOCK_M, D_PAD)
            lse2, delta = _load_row_stats(lse_ptr, delta_ptr, b, h, q_lo, L, H, BLOCK_M)
            qi = (q_lo + tl.arange(0, BLOCK_M))[None, :]
            visible = _visible_tile(qi, kj, pad_row_ptr, L, text_len, frame_size, grid_w, window, shift,
                                    CHANNEL, ATTENTION, STAGE, HAS_PAD)  # fmt: skip
            p_t = tl.where(visible, tl.exp2(_mma(k, tl.trans(q), IEEE) * qk_scale - lse2[None, :]), 0.0)
            dv += _mma(p_t, do, IEEE)
            ds_t = p_t * (_mma(v, tl.trans(do), IEEE) - delta[None, :])
            dk += _mma(ds_t, q, IEEE)
        _store_rows(dk_ptr, dk * scale, b, h, k_lo, L, H, D, BLOCK_N, D_PAD)
        _store_rows(dv_ptr, dv, b, h, k_lo, L, H, D, BLOCK_N, D_PAD)

    @triton.jit
    def _cogvideo_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr,  # (B, L, H, D) q.dtype, strides (s_b, s_l, s_h) each, stride(-1) == 1
        qs_b, qs_l, qs_h, ks_b, ks_l, ks_h, vs_b, vs_l, vs_h,  # element strides of dims 0, 1, 2
        grad_out_ptr,  # (B, L, H, D) q.dtype contiguous
        lse_ptr, delta_ptr,  # (B, L, H) fp32 contiguous
        pad_ptr,  # (B, text_len) uint8 or a dummy
        list_ptr, count_ptr,  # (cdiv(L, BLOCK_M), cols) / (cdiv(L, BLOCK_M),) int32: key tiles per query tile
        dq_ptr,  # (B, L, H, D) q.dtype contiguous
        L, H, D, cols, scale, qk_scale,  # as the dK/dV kernel
        text_len, frame_size, grid_w, window, shift,  # layout (see _tile_list_kernel)
        CHANNEL: tl.constexpr, ATTENTION: tl.constexpr, STAGE: tl.constexpr, HAS_PAD: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,  # tiles, padded D
    ):  # fmt: skip
        """One query tile; loops over the key tiles it may see (as the forward)."""
        tile = tl.program_id(0)
        q_lo = tile * BLOCK_M
        b, h = tl.program_id(1) // H, tl.program_id(1) % H
        qi = (q_lo + tl.arange(0, BLOCK_M))[:, None]
        pad_row_ptr = pad_ptr + b * text_len
        q = _load_rows(q_ptr, b, h, q_lo, L, D, qs_b, qs_l, qs_h, BLOCK_M, D_PAD)
        do = _load_rows(grad_out_ptr, b, h, q_lo, L, D, L * H * D, H * D, D, BLOCK_M, D_PAD)
        lse2, delta = _load_row_stats(lse_ptr, delta_ptr, b, h, q_lo, L, H, BLOCK_M)
        dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        for n in range(0, tl.load(count_ptr + tile)):
            k, v, visible = _key_tile(k_ptr, v_ptr, ks_b, ks_l, ks_h, vs_b, vs_l, vs_h, list_ptr, tile, cols, n, b, h,
                                      qi, pad_row_ptr, L, D, text_len, frame_size, grid_w, window, shift, CHANNEL,
                                      ATTENTION, STAGE, HAS_PAD, BLOCK_N, D_PAD)  # fmt: skip
            p = tl.where(visible, tl.exp2(_mma(q, tl.trans(k), IEEE) * qk_scale - lse2[:, None]), 0.0)
            ds = p * (_mma(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _mma(ds, k, IEEE)
        _store_rows(dq_ptr, dq * scale, b, h, q_lo, L, H, D, BLOCK_M, D_PAD)

    # -----------------------------------------------------------------------------------------------------
    # Mix kernels
    # -----------------------------------------------------------------------------------------------------

    @triton.jit
    def _mix_tile(rows_total, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        return rows, cols, offs, (rows[:, None] < rows_total) & (cols[None, :] < C)

    @triton.jit
    def _mix_fwd_kernel(
        base_ptr, plus_ptr,  # (B, L, C) contiguous, o_base.dtype
        alpha_logit_ptr,  # (C,) contiguous, any float dtype
        y_ptr,  # (B, L, C) contiguous, o_base.dtype
        rows_total, L, C, text_len,  # rows_total = B · L
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # rows x channels per program
    ):  # fmt: skip
        rows, cols, offs, mask = _mix_tile(rows_total, C, BLOCK_R, BLOCK_C)
        alpha = tl.sigmoid(tl.load(alpha_logit_ptr + cols, mask=cols < C, other=0.0).to(tl.float32))[None, :]
        base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        plus = tl.load(plus_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        text = ((rows % L) < text_len)[:, None]
        y = tl.where(text, base, alpha * base + (1.0 - alpha) * plus)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mix_bwd_kernel(
        grad_y_ptr, base_ptr, plus_ptr,  # (B, L, C) contiguous, o_base.dtype
        alpha_logit_ptr,  # (C,) contiguous
        d_base_ptr, d_plus_ptr,  # (B, L, C) contiguous, o_base.dtype
        d_alpha_partial_ptr,  # (cdiv(B·L, BLOCK_R), C) fp32: this program's rows' share of d alpha_logit
        rows_total, L, C, text_len,  # rows_total = B · L
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,  # rows x channels per program
    ):  # fmt: skip
        rows, cols, offs, mask = _mix_tile(rows_total, C, BLOCK_R, BLOCK_C)
        alpha = tl.sigmoid(tl.load(alpha_logit_ptr + cols, mask=cols < C, other=0.0).to(tl.float32))
        g = tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        plus = tl.load(plus_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        text = ((rows % L) < text_len)[:, None]
        tl.store(d_base_ptr + offs, tl.where(text, g, alpha[None, :] * g).to(d_base_ptr.dtype.element_ty), mask=mask)
        tl.store(d_plus_ptr + offs, tl.where(text, 0.0, (1.0 - alpha[None, :]) * g).to(d_plus_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip
        share = tl.sum(tl.where(text, 0.0, g * (base - plus)), axis=0) * alpha * (1.0 - alpha)  # masked: g = 0
        tl.store(d_alpha_partial_ptr + tl.program_id(0).to(tl.int64) * C + cols, share, mask=cols < C)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


class _Layout:
    """Kernel arguments of the visibility rule (runtime ints, then constexpr codes)."""

    def __init__(self, text_len, frames, grid_h, grid_w, channel, attention, window, shifted, stage):
        self.text_len, self.frames, self.grid_h, self.grid_w = text_len, frames, grid_h, grid_w
        self.frame_size = grid_h * grid_w
        window_rule = channel == "plus" and attention == "window"
        self.channel, self.attention, self.stage = CHANNELS.index(channel), int(window_rule), STAGES.index(stage)
        self.window = window if window_rule else 1  # unused outside the plus-window rule
        self.shift = window // 2 if window_rule and shifted else 0

    @property
    def length(self) -> int:
        return self.text_len + self.frames * self.frame_size

    def pair_args(self) -> tuple:
        """Runtime arguments of _pair_visible (the attention kernels)."""
        return (self.text_len, self.frame_size, self.grid_w, self.window, self.shift)

    def constexprs(self) -> dict:
        return dict(CHANNEL=self.channel, ATTENTION=self.attention, STAGE=self.stage)

    def tile_lists(self, row_block: int, col_block: int, rows_are_keys: bool, device) -> tuple[Tensor, Tensor, int]:
        """Per row tile, the column tiles that may hold a visible pair: list (rows, cols) int32, count (rows,)
        int32, cols. Rows are query tiles (forward, dQ) or key tiles (dK/dV, rows_are_keys)."""
        L = self.length
        rows, cols = triton.cdiv(L, row_block), triton.cdiv(L, col_block)
        tiles = torch.empty((rows, cols), device=device, dtype=torch.int32)
        counts = torch.empty((rows,), device=device, dtype=torch.int32)
        launch_triton(_tile_list_kernel, (rows,), tiles, counts, L, cols, self.text_len, self.frame_size, self.grid_h,
                      self.grid_w, self.window, self.shift, **self.constexprs(), ROW_BLOCK=row_block,
                      COL_BLOCK=col_block, ROWS_ARE_KEYS=rows_are_keys)  # fmt: skip
        return tiles, counts, cols


_FWD, _DKDV, _DQ = range(3)


def _config(
    kernel: int, head_dim: int, dtype: torch.dtype, shared_limit: int = DEFAULT_SHARED_MEMORY
) -> Optional[dict]:
    """Launch constants of one attention kernel (_FWD, _DKDV, _DQ): BLOCK_M (query tile), BLOCK_N (key tile),
    D_PAD, num_warps, num_stages, for a device with ``shared_limit`` bytes of shared memory per block; None if no
    candidate fits. A pure function of its arguments (and the BLOCK_M / BLOCK_N caps): the compile check calls it
    per target."""
    d_pad = max(16, next_pow2(head_dim))
    config = pick_config(_CONFIGS[(dtype == torch.float32, max(64, d_pad))][kernel], shared_limit)
    if config is None:
        return None
    return dict(BLOCK_M=min(config.block_m, BLOCK_M), BLOCK_N=min(config.block_n, BLOCK_N), D_PAD=d_pad,
                num_warps=config.num_warps, num_stages=config.num_stages)


def shared_memory_reason(head_dim: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the attention kernels cannot launch on ``device`` for this head dim (no configuration of some kernel
    fits its shared memory per block), or None."""
    limit = _backend.shared_memory_per_block(device)
    for kernel, name in ((_FWD, "forward"), (_DKDV, "dK/dV"), (_DQ, "dQ")):
        if _config(kernel, head_dim, dtype, limit) is None:
            return (f"no launch configuration of the {name} kernel for head dim D={head_dim}, {dtype} fits the "
                    f"device's {limit} bytes of shared memory per block")
    return None


def _launch_config(kernel: int, q: Tensor) -> dict:
    config = _config(kernel, q.shape[-1], q.dtype, _backend.shared_memory_per_block(q.device))
    if config is None:  # the op's reasons exclude these inputs first; a direct call gets the same message
        raise ValueError(f"cogvideo_attention triton backend: {shared_memory_reason(q.shape[-1], q.dtype, q.device)}")
    return config


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("cogvideo_attention triton backend: triton is not importable")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"cogvideo_attention triton backend: dtype {q.dtype} not supported (fp32, fp16, bf16)")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"cogvideo_attention triton backend: head dim D={q.shape[-1]} > {MAX_HEAD_DIM}")
    if q.shape[0] * q.shape[2] > MAX_BATCH_HEADS:
        raise ValueError(f"cogvideo_attention triton backend: B*H = {q.shape[0] * q.shape[2]} > {MAX_BATCH_HEADS}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1 and x.shape[-1] > 1:
            raise ValueError(f"cogvideo_attention triton backend: {name} needs stride(-1) == 1, got {x.stride()}")


def _pad_arg(text_pad_mask: Optional[Tensor], device) -> Tensor:
    if text_pad_mask is None:
        return torch.ones(1, device=device, dtype=torch.uint8)
    return text_pad_mask.contiguous().view(torch.uint8)  # bool and uint8 share the byte layout: no copy


def _strides(*xs: Tensor) -> list[int]:
    return [s for x in xs for s in x.stride()[:3]]


def cogvideo_attention_fwd_triton(
    q: Tensor, k: Tensor, v: Tensor, text_pad_mask: Optional[Tensor], text_len: int, frames: int, grid_h: int,
    grid_w: int, channel: str, attention: str, window: int, shifted: bool, stage: str,
) -> Tuple[Tensor, Tensor]:  # fmt: skip
    """-> out (B, L, H, D) q.dtype, lse (B, L, H) fp32 (+inf on rows with no visible key)."""
    _check(q, k, v)
    layout = _Layout(text_len, frames, grid_h, grid_w, channel, attention, window, shifted, stage)
    B, L, H, D = q.shape
    out = torch.empty((B, L, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, L, H), device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return out, lse
    config = _launch_config(_FWD, q)
    tiles, counts, cols = layout.tile_lists(config["BLOCK_M"], config["BLOCK_N"], False, q.device)
    launch_triton(
        _cogvideo_fwd_kernel, (counts.shape[0], B * H),
        q, k, v, *_strides(q, k, v), _pad_arg(text_pad_mask, q.device), tiles, counts, out, lse,
        L, H, D, cols, D**-0.5 * _LOG2E, *layout.pair_args(), **layout.constexprs(),
        HAS_PAD=text_pad_mask is not None, IEEE=q.dtype == torch.float32, **config,
    )  # fmt: skip
    return out, lse


def cogvideo_attention_bwd_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, text_pad_mask: Optional[Tensor],
    text_len: int, frames: int, grid_h: int, grid_w: int, channel: str, attention: str, window: int, shifted: bool,
    stage: str,
) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """-> dq, dk, dv (B, L, H, D) q.dtype contiguous."""
    _check(q, k, v)
    layout = _Layout(text_len, frames, grid_h, grid_w, channel, attention, window, shifted, stage)
    B, L, H, D = q.shape
    dq, dk, dv = (torch.empty((B, L, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv
    grad_out, out = grad_out.contiguous().to(q.dtype), out.contiguous()
    lse = lse.contiguous().to(torch.float32)
    dkdv_config, dq_config = _launch_config(_DKDV, q), _launch_config(_DQ, q)
    delta = torch.empty((B, L, H), device=q.device, dtype=torch.float32)
    launch_triton(_cogvideo_bwd_delta_kernel, (triton.cdiv(L, dq_config["BLOCK_M"]), B * H), out, grad_out, delta,
                  L, H, D, BLOCK_M=dq_config["BLOCK_M"], D_PAD=dq_config["D_PAD"])  # fmt: skip
    scale = D**-0.5
    common = dict(**layout.constexprs(), HAS_PAD=text_pad_mask is not None, IEEE=q.dtype == torch.float32)
    inputs = (q, k, v, *_strides(q, k, v), grad_out, lse, delta, _pad_arg(text_pad_mask, q.device))
    for config, keys_first, outputs in ((dkdv_config, True, (dk, dv)), (dq_config, False, (dq,))):
        kernel = _cogvideo_bwd_dkdv_kernel if keys_first else _cogvideo_bwd_dq_kernel
        rows, cols = (config["BLOCK_N"], config["BLOCK_M"]) if keys_first else (config["BLOCK_M"], config["BLOCK_N"])
        tiles, counts, n_cols = layout.tile_lists(rows, cols, keys_first, q.device)
        launch_triton(kernel, (counts.shape[0], B * H), *inputs, tiles, counts, *outputs, L, H, D, n_cols, scale,
                      scale * _LOG2E, *layout.pair_args(), **common, **config)  # fmt: skip
    return dq, dk, dv


def tile_table(text_len, frames, grid_h, grid_w, channel, attention="full", window=10, shifted=False,
               stage="sequential", block_m=64, block_n=32, device="cpu") -> Tensor:  # fmt: skip
    """(cdiv(L, block_m), cdiv(L, block_n)) bool: which (query tile, key tile) pairs the attention kernels
    process, from the tile lists they loop over (the others hold no visible pair and are skipped)."""
    layout = _Layout(text_len, frames, grid_h, grid_w, channel, attention, window, shifted, stage)
    tiles, counts, cols = layout.tile_lists(block_m, block_n, False, device)
    listed = torch.arange(cols, device=device)[None, :] < counts[:, None]
    table = torch.zeros((counts.shape[0], cols + 1), device=device, dtype=torch.bool)  # last column: a sink
    table.scatter_(1, torch.where(listed, tiles.long(), cols), listed)
    return table[:, :cols]


def _mix_launch_args(o_base: Tensor, alpha_logit: Tensor):
    B, L, C = o_base.shape
    grid = (triton.cdiv(B * L, MIX_BLOCK_R), triton.cdiv(C, MIX_BLOCK_C))
    return grid, alpha_logit.contiguous(), (B * L, L, C)


def dual_channel_mix_fwd_triton(o_base: Tensor, o_plus: Tensor, alpha_logit: Tensor, text_len: int) -> Tensor:
    """-> y (B, L, C) o_base.dtype contiguous."""
    y = torch.empty(o_base.shape, device=o_base.device, dtype=o_base.dtype)
    if y.numel() == 0:
        return y
    grid, alpha_logit, sizes = _mix_launch_args(o_base, alpha_logit)
    launch_triton(_mix_fwd_kernel, grid, o_base.contiguous(), o_plus.contiguous(), alpha_logit, y, *sizes, text_len,
                  BLOCK_R=MIX_BLOCK_R, BLOCK_C=MIX_BLOCK_C)  # fmt: skip
    return y


def dual_channel_mix_bwd_triton(
    grad_y: Tensor, o_base: Tensor, o_plus: Tensor, alpha_logit: Tensor, text_len: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> d_base, d_plus (B, L, C) o_base.dtype contiguous, d_alpha_logit (C,) fp32 (fixed-order reduction)."""
    d_base = torch.empty(o_base.shape, device=o_base.device, dtype=o_base.dtype)
    d_plus = torch.empty_like(d_base)
    if o_base.numel() == 0:
        return d_base, d_plus, torch.zeros(alpha_logit.shape, device=o_base.device, dtype=torch.float32)
    grid, alpha_logit, sizes = _mix_launch_args(o_base, alpha_logit)
    partial = torch.empty((grid[0], o_base.shape[2]), device=o_base.device, dtype=torch.float32)
    launch_triton(_mix_bwd_kernel, grid, grad_y.contiguous(), o_base.contiguous(), o_plus.contiguous(), alpha_logit,
                  d_base, d_plus, partial, *sizes, text_len, BLOCK_R=MIX_BLOCK_R, BLOCK_C=MIX_BLOCK_C)  # fmt: skip
    return d_base, d_plus, partial.sum(dim=0)  # per-program partial sums added in a fixed order: deterministic
