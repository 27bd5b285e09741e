// Tensor-core backward of softmax attention (FlashAttention-2 order) for spatial_attention and cogvideo_attention:
// mma.sync m16n8k16 with float16 / bfloat16 operands and float32 accumulation, fed by ldmatrix from shared memory
// (csrc/cuda/tensor_core.cuh through flash_tc.cuh). Deterministic: no atomics, every output element is written
// once by one thread.
//
// Math, per problem (spatial: one (b, t, h) over the S tokens of frame t; CogVideo: one (b, h) over L tokens,
// passed as T = 1), scale s, visible(i, j) = true (spatial) or the CogVideo rule (dual_channel_visibility.cuh:
// layout rule and text_pad_mask), lse from the forward and delta_i = sum_d dO_id O_id from the caller's delta kernel:
//   S_ij = q_i . k_j,   P_ij = exp(s S_ij - lse_i) if visible(i, j) else 0   (lse_i = +inf: row sees nothing, P = 0)
//   dV_j = sum_i P_ij dO_i,   dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - delta_i)
//   dK_j = s sum_i dS_ij q_i, dQ_i = s sum_j dS_ij k_j
//
// Shapes: q, k, v, grad_out (B, T, S, H, D) float16 / bfloat16, any strides over B, T, S, H, unit stride over D;
// lse, delta (B, T, S, H) float32 contiguous; dq, dk, dv (B, T, S, H, D) contiguous. 1 <= D <= 128.
//
// Kernels (4 warps; a warp owns 16 rows of the block's 64; blockIdx.x = problem * row_blocks + row_block):
//   tc_bwd_dkdv_kernel  key-parallel: the block keeps its 64 keys' K and V tiles and streams query tiles of R rows
//                       (Q, dO, lse, delta); per warp S^T = K Q^T and dP^T = V dO^T (16 x R), P^T and dS^T in
//                       registers, then dV += P^T dO and dK += dS^T Q (the C fragments of P^T / dS^T, packed to
//                       16 bits, are the A fragments of the next product, as in FlashAttention-2).
//   tc_bwd_dq_kernel    query-parallel: the block keeps its 64 queries' Q and dO tiles (their lse / delta in
//                       registers) and streams key tiles of R rows (K, V); S = Q K^T, dP = dO V^T, dS, dQ += dS K.
// R = 64 rows (32 at padded D = 128, to bound the registers).
// Cost: 7 GEMMs of 2 N^2 D per problem (dK/dV kernel: S, dP, dV, dK; dQ kernel: S, dP, dQ) against
// FlashAttention-2's 5, which accumulates dQ with fp32 atomicAdd inside the key-parallel loop: 40 % more
// tensor-core FLOPs, bought for a bitwise-deterministic dQ (the order of atomic additions varies run to run) and
// no fp32 dQ scratch buffer. Issue 16 allows atomics only behind an option; none is offered yet.
// Tiles, loaders and fragment loaders are flash_tc.cuh's (shared with the forward): swizzled 16-bit [rows][P]
// tiles (P = D padded to 32 / 64 / 128), conflict-free for ldmatrix; rows past S and columns past D are zeros, so
// they add nothing to the products; P of a query past S is 0 (lse = +inf), P of a key past S is masked. Tiles are
// loaded with cp.async when the base is 16-byte aligned and every stride a multiple of 8 elements, else element by
// element, into two stages: the next streamed tile is issued before the current one is computed, so with
// cp.async its copy overlaps the products.
// CogVideo: a streamed tile with no visible pair against the block's rows is skipped in both kernels
// (tiles_interact, uniform over the block), and pairs are masked per element (pair_visible): the functions the
// SIMT and forward kernels use (dual_channel_visibility.cuh), so all mask and skip the same pairs and tiles.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "attention_tc_bwd.h"
#include "attention_tc_fwd.h"
#include "dual_channel_visibility.cuh"
#include "dynamic_smem.cuh"
#include "flash_tc.cuh"
#include "shared_memory_plan.h"
#include "tensor_core.cuh"

namespace torchnova {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kOwnRows = smem_plan::kTcBwdOwnRows;  // 64 rows per block, 16 per warp
static_assert(kOwnRows == kWarps * 16, "a warp owns one 16-row mma tile");
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Strides {  // element strides of a (B, T, S, H, D) tensor over B, T, S, H
  int64_t b, t, s, h;
};

struct Problem {  // decoded from blockIdx.x
  int64_t b, t, h, block;
};

__device__ __forceinline__ Problem decode_block(int64_t row_blocks, int64_t T, int64_t H) {
  const int64_t linear = blockIdx.x;
  const int64_t problem = linear / row_blocks;
  const int64_t h = problem % H, bt = problem / H;
  return {bt / T, bt % T, h, linear % row_blocks};
}

__device__ __forceinline__ int64_t head_offset(const Strides& st, const Problem& p) {
  return p.b * st.b + p.t * st.t + p.h * st.h;
}

// Visibility policies: tile_may_see(query rows [q_lo, q_hi), key rows [k_lo, k_hi)) is uniform over a block
// (false: skip the tile pair); visible(b, query, key) masks one pair (both indices < S, checked by the caller).
struct DenseVisibility {
  __device__ __forceinline__ bool tile_may_see(int64_t, int64_t, int64_t, int64_t) const { return true; }
  __device__ __forceinline__ bool visible(int64_t, int64_t, int64_t) const { return true; }
};

struct CogVideoPolicy {
  dual_channel::Layout layout;
  const bool* text_pad_mask;  // (B, text_len) contiguous or nullptr
  dual_channel_cuda::AttentionShape shape;
  __device__ __forceinline__ bool tile_may_see(int64_t q_lo, int64_t q_hi, int64_t k_lo, int64_t k_hi) const {
    return dual_channel_cuda::tiles_interact(layout, q_lo, static_cast<int>(q_hi - q_lo), k_lo,
                                             static_cast<int>(k_hi - k_lo), shape.seq_len);
  }
  __device__ __forceinline__ bool visible(int64_t b, int64_t query, int64_t key) const {
    return dual_channel_cuda::pair_visible(layout, text_pad_mask, b, query, key, shape);
  }
};

// Start of the first streamed tile at or after `from` (a multiple of kStream) that may hold a pair visible to the
// block's own rows [own0, own_end); S when none does. kStreamedAreQueries: the streamed rows are queries (dK/dV
// kernel) or keys (dQ kernel). Uniform over the block.
template <int kStream, bool kStreamedAreQueries, typename Policy>
__device__ __forceinline__ int64_t next_visible_tile(const Policy& policy, int64_t from, int64_t own0,
                                                     int64_t own_end, int64_t S) {
  for (int64_t row0 = from; row0 < S; row0 += kStream) {
    const int64_t row_end = row0 + kStream < S ? row0 + kStream : S;
    if (kStreamedAreQueries ? policy.tile_may_see(row0, row_end, own0, own_end)
                            : policy.tile_may_see(own0, own_end, row0, row_end)) {
      return row0;
    }
  }
  return S;
}

// acc[16 x kCols] (C fragments, kCols / 8 n-tiles) += A[16 x kK] * tile[0 .. kK-1][0 .. kCols-1]. A is held as
// the C-fragment registers of an earlier 16 x kK product (P^T, dS^T or dS), packed to 16 bits into A fragments
// (the C layout of two adjacent n-tiles is the A layout of one k-step); `tile` is a swizzled [kK][kCols] tile.
template <typename scalar_t, int kK, int kCols>
__device__ __forceinline__ void accumulate_product(float (&acc)[kCols / 8][4], const float (&weights)[kK / 8][4],
                                                   const scalar_t* tile) {
  using Pair = typename flash_tc::MmaType<scalar_t>::Pair;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint32_t a[4] = {tc::pack_two<Pair>(weights[2 * kk][0], weights[2 * kk][1]),
                           tc::pack_two<Pair>(weights[2 * kk][2], weights[2 * kk][3]),
                           tc::pack_two<Pair>(weights[2 * kk + 1][0], weights[2 * kk + 1][1]),
                           tc::pack_two<Pair>(weights[2 * kk + 1][2], weights[2 * kk + 1][3])};
#pragma unroll
    for (int nt = 0; nt < kCols / 16; ++nt) {
      uint32_t b[4];
      flash_tc::load_b_kn<kCols>(b, tile, kk * 16, nt * 16);
      flash_tc::mma_accumulate<scalar_t>(acc[2 * nt], a, b);
      flash_tc::mma_accumulate<scalar_t>(acc[2 * nt + 1], a, b + 2);
    }
  }
}

// out[16 x kN] = rows row0 .. row0 + 15 of the swizzled [.][kPadded] `rows_tile` times the transpose of the
// swizzled [kN][kPadded] `cols_tile`, over the kPadded columns.
template <typename scalar_t, int kPadded, int kN>
__device__ __forceinline__ void row_products(float (&out)[kN / 8][4], const scalar_t* rows_tile, int row0,
                                             const scalar_t* cols_tile) {
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) out[nt][0] = out[nt][1] = out[nt][2] = out[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kPadded / 16; ++kk) {
    uint32_t a[4];
    flash_tc::load_a<kPadded>(a, rows_tile, row0, kk * 16);
#pragma unroll
    for (int nt = 0; nt < kN / 16; ++nt) {
      uint32_t b[4];
      flash_tc::load_b_nk<kPadded>(b, cols_tile, nt * 16, kk * 16);
      flash_tc::mma_accumulate<scalar_t>(out[2 * nt], a, b);
      flash_tc::mma_accumulate<scalar_t>(out[2 * nt + 1], a, b + 2);
    }
  }
}

// Writes the warp's 16 x kPadded accumulator (times `factor`) to rows warp_row0 .. warp_row0 + 15 of a
// contiguous output whose row s of this problem is out_base[s * out_row_stride]; rows >= S and columns >= D are
// not written.
template <typename scalar_t, int kPadded>
__device__ __forceinline__ void store_rows(scalar_t* __restrict__ out_base, int64_t out_row_stride,
                                           const float (&acc)[kPadded / 8][4], float factor, int64_t warp_row0,
                                           int64_t S, int D) {
  const int lane = threadIdx.x % 32, group = lane >> 2, quad = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kPadded / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t s = warp_row0 + group + (e >= 2 ? 8 : 0);
      const int d = nt * 8 + 2 * quad + (e & 1);
      if (s < S && d < D) out_base[s * out_row_stride + d] = static_cast<scalar_t>(acc[nt][e] * factor);
    }
  }
}

template <typename scalar_t, int kPadded, typename Policy>
__global__ void __launch_bounds__(kThreads)
    tc_bwd_dkdv_kernel(const scalar_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                       const scalar_t* __restrict__ q,         // (B, T, S, H, D), strides q_st
                       const scalar_t* __restrict__ k,         // (B, T, S, H, D), strides k_st
                       const scalar_t* __restrict__ v,         // (B, T, S, H, D), strides v_st
                       Strides do_st, Strides q_st, Strides k_st, Strides v_st,
                       bool async,                       // cp.async loads (flash_tc::can_load_async of all four)
                       const float* __restrict__ lse,    // (B, T, S, H) contiguous
                       const float* __restrict__ delta,  // (B, T, S, H) contiguous
                       Policy policy, float scale, int64_t T, int64_t S, int64_t H, int D,
                       int64_t key_blocks,           // ceil(S / 64)
                       scalar_t* __restrict__ dk,    // (B, T, S, H, D) contiguous
                       scalar_t* __restrict__ dv) {  // (B, T, S, H, D) contiguous
  constexpr int kStream = smem_plan::tc_bwd_stream_rows(kPadded);
  constexpr int kTile = kStream * kPadded;  // elements of one streamed tile
  extern __shared__ float smem[];
  scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem);  // [64][kPadded] swizzled
  scalar_t* v_tile = k_tile + kOwnRows * kPadded;        // [64][kPadded]
  scalar_t* q_stages = v_tile + kOwnRows * kPadded;      // [2 stages][kStream][kPadded]
  scalar_t* do_stages = q_stages + 2 * kTile;            // [2 stages][kStream][kPadded]
  float* lse_stages = reinterpret_cast<float*>(do_stages + 2 * kTile);  // [2 stages][kStream]
  float* delta_stages = lse_stages + 2 * kStream;                       // [2 stages][kStream]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane >> 2, quad = lane & 3;
  const Problem p = decode_block(key_blocks, T, H);
  const int64_t key0 = p.block * kOwnRows, key_end = key0 + kOwnRows < S ? key0 + kOwnRows : S;
  const scalar_t* q_base = q + head_offset(q_st, p);
  const scalar_t* do_base = grad_out + head_offset(do_st, p);
  const int64_t stat0 = ((p.b * T + p.t) * S) * H + p.h;  // lse / delta of token s at stat0 + s * H

  // Query tile `query0` into stage `stage`: Q and dO (cp.async or plain), lse and delta (plain).
  const auto issue_query_tile = [&](int stage, int64_t query0) {
    flash_tc::load_tile<kStream, kPadded, kThreads>(async, q_stages + stage * kTile, q_base, q_st.s, query0, S, D);
    flash_tc::load_tile<kStream, kPadded, kThreads>(async, do_stages + stage * kTile, do_base, do_st.s, query0, S,
                                                    D);
    for (int r = threadIdx.x; r < kStream; r += kThreads) {
      const int64_t s = query0 + r;
      lse_stages[stage * kStream + r] = s < S ? lse[stat0 + s * H] : kInf;  // a query past S gets P = 0
      delta_stages[stage * kStream + r] = s < S ? delta[stat0 + s * H] : 0.f;
    }
  };

  // Pipeline: group 0 = the own K, V tiles, then one group per query tile, the next one issued before the
  // current one is computed (two stages), so its copy overlaps the products.
  flash_tc::load_tile<kOwnRows, kPadded, kThreads>(async, k_tile, k + head_offset(k_st, p), k_st.s, key0, S, D);
  flash_tc::load_tile<kOwnRows, kPadded, kThreads>(async, v_tile, v + head_offset(v_st, p), v_st.s, key0, S, D);
  tc::cp_async_commit();
  int64_t query0 = next_visible_tile<kStream, true>(policy, 0, key0, key_end, S);
  if (query0 < S) issue_query_tile(0, query0);
  tc::cp_async_commit();

  float dk_acc[kPadded / 8][4], dv_acc[kPadded / 8][4];
#pragma unroll
  for (int nt = 0; nt < kPadded / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[nt][e] = dv_acc[nt][e] = 0.f;
  }

  for (int stage = 0; query0 < S; stage ^= 1) {
    const int64_t next0 = next_visible_tile<kStream, true>(policy, query0 + kStream, key0, key_end, S);
    if (next0 < S) issue_query_tile(stage ^ 1, next0);  // stage ^ 1 was released by the barrier ending the last step
    tc::cp_async_commit();   // possibly empty: one group per step keeps the wait count fixed
    tc::cp_async_wait<1>();  // all but the newest group landed: the own tiles and this step's query tile
    __syncthreads();         // ... for every thread's copies and plain stores
    const scalar_t* q_tile = q_stages + stage * kTile;
    const scalar_t* do_tile = do_stages + stage * kTile;
    const float* lse_tile = lse_stages + stage * kStream;
    const float* delta_tile = delta_stages + stage * kStream;

    // S^T and dP^T of the warp's 16 keys against the kStream queries.
    float prob[kStream / 8][4], dscore[kStream / 8][4];
    row_products<scalar_t, kPadded, kStream>(prob, k_tile, warp * 16, q_tile);
    row_products<scalar_t, kPadded, kStream>(dscore, v_tile, warp * 16, do_tile);
#pragma unroll
    for (int nt = 0; nt < kStream / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = key0 + warp * 16 + group + (e >= 2 ? 8 : 0);
        const int query_local = nt * 8 + 2 * quad + (e & 1);
        const int64_t query = query0 + query_local;
        const bool visible = key < S && query < S && policy.visible(p.b, query, key);
        const float pr = visible ? expf(prob[nt][e] * scale - lse_tile[query_local]) : 0.f;
        prob[nt][e] = pr;
        dscore[nt][e] = pr * (dscore[nt][e] - delta_tile[query_local]);
      }
    }
    accumulate_product<scalar_t, kStream, kPadded>(dv_acc, prob, do_tile);
    accumulate_product<scalar_t, kStream, kPadded>(dk_acc, dscore, q_tile);
    __syncthreads();  // this stage is consumed: the next step may refill it
    query0 = next0;
  }
  tc::cp_async_wait<0>();  // no copy outlives the block (the own tiles, when no query tile was visible)

  const int64_t out0 = ((p.b * T + p.t) * S * H + p.h) * D;  // dk[b, t, 0, h, 0]
  store_rows<scalar_t, kPadded>(dk + out0, H * D, dk_acc, scale, key0 + warp * 16, S, D);
  store_rows<scalar_t, kPadded>(dv + out0, H * D, dv_acc, 1.f, key0 + warp * 16, S, D);
}

template <typename scalar_t, int kPadded, typename Policy>
__global__ void __launch_bounds__(kThreads)
    tc_bwd_dq_kernel(const scalar_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                     const scalar_t* __restrict__ q,         // (B, T, S, H, D), strides q_st
                     const scalar_t* __restrict__ k,         // (B, T, S, H, D), strides k_st
                     const scalar_t* __restrict__ v,         // (B, T, S, H, D), strides v_st
                     Strides do_st, Strides q_st, Strides k_st, Strides v_st,
                     bool async,                       // cp.async loads (flash_tc::can_load_async of all four)
                     const float* __restrict__ lse,    // (B, T, S, H) contiguous
                     const float* __restrict__ delta,  // (B, T, S, H) contiguous
                     Policy policy, float scale, int64_t T, int64_t S, int64_t H, int D,
                     int64_t query_blocks,         // ceil(S / 64)
                     scalar_t* __restrict__ dq) {  // (B, T, S, H, D) contiguous
  constexpr int kStream = smem_plan::tc_bwd_stream_rows(kPadded);
  constexpr int kTile = kStream * kPadded;
  extern __shared__ float smem[];
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem);  // [64][kPadded] swizzled
  scalar_t* do_tile = q_tile + kOwnRows * kPadded;       // [64][kPadded]
  scalar_t* k_stages = do_tile + kOwnRows * kPadded;     // [2 stages][kStream][kPadded]
  scalar_t* v_stages = k_stages + 2 * kTile;             // [2 stages][kStream][kPadded]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane >> 2, quad = lane & 3;
  const Problem p = decode_block(query_blocks, T, H);
  const int64_t query0 = p.block * kOwnRows, query_end = query0 + kOwnRows < S ? query0 + kOwnRows : S;
  const scalar_t* k_base = k + head_offset(k_st, p);
  const scalar_t* v_base = v + head_offset(v_st, p);
  const int64_t stat0 = ((p.b * T + p.t) * S) * H + p.h;

  const auto issue_key_tile = [&](int stage, int64_t key0) {
    flash_tc::load_tile<kStream, kPadded, kThreads>(async, k_stages + stage * kTile, k_base, k_st.s, key0, S, D);
    flash_tc::load_tile<kStream, kPadded, kThreads>(async, v_stages + stage * kTile, v_base, v_st.s, key0, S, D);
  };
  // Pipeline as in the dK/dV kernel: group 0 = the own Q, dO tiles, then one group per key tile.
  flash_tc::load_tile<kOwnRows, kPadded, kThreads>(async, q_tile, q + head_offset(q_st, p), q_st.s, query0, S, D);
  flash_tc::load_tile<kOwnRows, kPadded, kThreads>(async, do_tile, grad_out + head_offset(do_st, p), do_st.s,
                                                   query0, S, D);
  tc::cp_async_commit();
  int64_t key0 = next_visible_tile<kStream, false>(policy, 0, query0, query_end, S);
  if (key0 < S) issue_key_tile(0, key0);
  tc::cp_async_commit();

  // This lane's two query rows (group, group + 8 of the warp's 16): lse (+inf past S: P = 0) and delta.
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t s = query0 + warp * 16 + group + 8 * half;
    row_lse[half] = s < S ? lse[stat0 + s * H] : kInf;
    row_delta[half] = s < S ? delta[stat0 + s * H] : 0.f;
  }
  float dq_acc[kPadded / 8][4];
#pragma unroll
  for (int nt = 0; nt < kPadded / 8; ++nt) dq_acc[nt][0] = dq_acc[nt][1] = dq_acc[nt][2] = dq_acc[nt][3] = 0.f;

  for (int stage = 0; key0 < S; stage ^= 1) {
    const int64_t next0 = next_visible_tile<kStream, false>(policy, key0 + kStream, query0, query_end, S);
    if (next0 < S) issue_key_tile(stage ^ 1, next0);  // stage ^ 1 was released by the barrier ending the last step
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
    __syncthreads();
    const scalar_t* k_tile = k_stages + stage * kTile;
    const scalar_t* v_tile = v_stages + stage * kTile;

    float dscore[kStream / 8][4], dprob[kStream / 8][4];
    row_products<scalar_t, kPadded, kStream>(dscore, q_tile, warp * 16, k_tile);
    row_products<scalar_t, kPadded, kStream>(dprob, do_tile, warp * 16, v_tile);
#pragma unroll
    for (int nt = 0; nt < kStream / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >= 2 ? 1 : 0;
        const int64_t query = query0 + warp * 16 + group + 8 * half;
        const int64_t key = key0 + nt * 8 + 2 * quad + (e & 1);
        const bool visible = key < S && query < S && policy.visible(p.b, query, key);
        const float pr = visible ? expf(dscore[nt][e] * scale - row_lse[half]) : 0.f;
        dscore[nt][e] = pr * (dprob[nt][e] - row_delta[half]);
      }
    }
    accumulate_product<scalar_t, kStream, kPadded>(dq_acc, dscore, k_tile);
    __syncthreads();  // this stage is consumed: the next step may refill it
    key0 = next0;
  }
  tc::cp_async_wait<0>();

  const int64_t out0 = ((p.b * T + p.t) * S * H + p.h) * D;
  store_rows<scalar_t, kPadded>(dq + out0, H * D, dq_acc, scale, query0 + warp * 16, S, D);
}

std::atomic<int64_t> g_backward_launches{0};

Strides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

template <typename Fn>
void dispatch_padded(int D, Fn&& fn) {
  if (D <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    fn(std::integral_constant<int, 64>{});
  } else {
    fn(std::integral_constant<int, 128>{});
  }
}
static_assert(smem_plan::tc_bwd_padded_dim(32) == 32 && smem_plan::tc_bwd_padded_dim(33) == 64 &&
                  smem_plan::tc_bwd_padded_dim(65) == 128,
              "dispatch_padded and shared_memory_plan.h must agree on the padded widths");

template <typename scalar_t, typename Policy>
void launch_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, double scale,
                     const Policy& policy, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3);
  const int D = static_cast<int>(q.size(4));
  const int64_t row_blocks = (S + kOwnRows - 1) / kOwnRows;
  const int64_t blocks = B * T * H * row_blocks;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks,
              " thread blocks exceed the grid.x limit of 2^31 - 1; split the batch");
  const bool async = flash_tc::can_load_async(grad_out) && flash_tc::can_load_async(q) &&
                     flash_tc::can_load_async(k) && flash_tc::can_load_async(v);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_padded(D, [&](auto padded) {
    constexpr int kPadded = decltype(padded)::value;
    constexpr int64_t kDkDvBytes = smem_plan::tc_bwd_dkdv_bytes_of_padded(kPadded);
    constexpr int64_t kDqBytes = smem_plan::tc_bwd_dq_bytes_of_padded(kPadded);
    auto dkdv_kernel = tc_bwd_dkdv_kernel<scalar_t, kPadded, Policy>;
    cuda_smem::prepare_launch(op, dkdv_kernel, kDkDvBytes, kDkDvBytes, "the tensor-core dk/dv kernel");
    TORCHNOVA_LAUNCH_KERNEL(static_cast<unsigned>(blocks), kThreads, kDkDvBytes, stream, dkdv_kernel)(
        grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), strides_of(grad_out), strides_of(q), strides_of(k), strides_of(v), async,
        lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), policy, static_cast<float>(scale), T, S, H, D,
        row_blocks, dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dq_kernel = tc_bwd_dq_kernel<scalar_t, kPadded, Policy>;
    cuda_smem::prepare_launch(op, dq_kernel, kDqBytes, kDqBytes, "the tensor-core dq kernel");
    TORCHNOVA_LAUNCH_KERNEL(static_cast<unsigned>(blocks), kThreads, kDqBytes, stream, dq_kernel)(
        grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), strides_of(grad_out), strides_of(q), strides_of(k), strides_of(v), async,
        lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), policy, static_cast<float>(scale), T, S, H, D,
        row_blocks, dq.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    g_backward_launches.fetch_add(1, std::memory_order_relaxed);
  });
}

}  // namespace

namespace attention_tc {

bool use_tensor_core_backward(const char* op, const at::Tensor& q) {
  const KernelChoice choice = kernel_choice_from_env();
  if (choice == KernelChoice::kSimt) return false;
  // Why q cannot take the tensor-core kernels; empty when it can.
  std::string why;
  const auto dtype = q.scalar_type();
  const int64_t head_dim = q.size(-1);
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    why = std::string("dtype is ") + c10::toString(dtype) +
          " (the tensor-core backward takes float16 or bfloat16; float32 runs on the SIMT kernels)";
  } else if (head_dim > smem_plan::kTcBwdMaxHeadDim) {
    why = "head dim D = " + std::to_string(head_dim) + " exceeds " + std::to_string(smem_plan::kTcBwdMaxHeadDim);
  } else if (props->major < 8) {
    why = "compute capability " + std::to_string(props->major) + "." + std::to_string(props->minor) +
          " is below 8.0 (mma.sync m16n8k16, ldmatrix and cp.async need sm_80)";
  } else if (smem_plan::tc_bwd_max_bytes(static_cast<int>(head_dim)) >
             static_cast<int64_t>(props->sharedMemPerBlockOptin)) {
    why = "it needs " + std::to_string(smem_plan::tc_bwd_max_bytes(static_cast<int>(head_dim))) +
          " bytes of shared memory per block, the device allows " + std::to_string(props->sharedMemPerBlockOptin);
  }
  TORCH_CHECK_VALUE(why.empty() || choice != KernelChoice::kTensorCore, op,
                    ": TORCHNOVA_CUDA_ATTENTION_KERNEL=tensor_core, but the tensor-core backward cannot run this "
                    "call: ", why);
  return why.empty();
}

void attention_bwd(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, double scale,
                   const CogVideoVisibility* cogvideo, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  TORCH_CHECK(q.dim() == 5 && lse.is_contiguous() && delta.is_contiguous() && dq.is_contiguous() &&
                  dk.is_contiguous() && dv.is_contiguous(),
              op, ": internal error: the tensor-core backward got non-canonical tensors");
  if (q.numel() == 0) return;
  const auto run = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    if (cogvideo == nullptr) {
      launch_backward<scalar_t>(op, grad_out, q, k, v, lse, delta, scale, DenseVisibility{}, dq, dk, dv);
    } else {
      const CogVideoPolicy policy{cogvideo->layout, cogvideo->text_pad_mask, cogvideo->shape};
      launch_backward<scalar_t>(op, grad_out, q, k, v, lse, delta, scale, policy, dq, dk, dv);
    }
  };
  if (q.scalar_type() == at::kHalf) {
    run(c10::Half{});
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, op, ": internal error: tensor-core backward for ",
                q.scalar_type());
    run(c10::BFloat16{});
  }
}

int64_t backward_launches() { return g_backward_launches.load(std::memory_order_relaxed); }

}  // namespace attention_tc
}  // namespace torchnova
