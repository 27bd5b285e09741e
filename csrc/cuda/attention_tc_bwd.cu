// Tensor-core backward of softmax attention (FlashAttention-2 order) for spatial_attention and cogvideo_attention:
// mma.sync m16n8k16 with float16 / bfloat16 operands and float32 accumulation, fed by ldmatrix from shared memory
// (csrc/cuda/tensor_core.cuh). Deterministic: no atomics, every output element is written once by one thread.
//
// Math, per problem (spatial: one (b, t, h) over the S tokens of frame t; CogVideo: one (b, h) over L tokens,
// passed as T = 1), scale s, visible(i, j) = true (spatial) or the CogVideo rule (csrc/dual_channel_visibility.h
// plus text_pad_mask), lse and delta_i = sum_d dO_id O_id from the forward and the delta kernel of the caller:
//   S_ij = q_i . k_j,   P_ij = exp(s S_ij - lse_i) if visible(i, j) else 0   (lse_i = +inf: row sees nothing, P = 0)
//   dV_j = sum_i P_ij dO_i,   dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - delta_i)
//   dK_j = s sum_i dS_ij q_i, dQ_i = s sum_j dS_ij k_j
//
// Shapes: q, k, v, grad_out (B, T, S, H, D) float16 / bfloat16, any strides over B, T, S, H, unit stride over D;
// lse, delta (B, T, S, H) float32 contiguous; dq, dk, dv (B, T, S, H, D) contiguous. 1 <= D <= 128.
//
// Kernels (4 warps; a warp owns 16 rows of the block's 64; blockIdx.x = problem * row_blocks + row_block):
//   tc_bwd_dkdv_kernel  key-parallel: the block keeps its 64 keys' K and V tiles; streams query tiles of R rows
//                       (Q, dO, lse, delta); per warp S^T = K Q^T and dP^T = V dO^T (16 x R, mma), P^T, dS^T in
//                       registers, then dV += P^T dO and dK += dS^T Q (the C fragments of P^T / dS^T are
//                       exactly the A fragments of the next product after packing to 16 bits, as in FA2).
//   tc_bwd_dq_kernel    query-parallel: the block keeps its 64 queries' Q and dO tiles and their lse / delta in
//                       registers; streams key tiles of R rows (K, V); S = Q K^T, dP = dO V^T, dS, dQ += dS K.
// Cost: 7 GEMMs of N^2 D per problem (dkdv: S, dP, dV, dK; dq: S, dP, dQ) against FA2's 5 with an atomic fp32 dQ
// accumulation inside the key-parallel loop: 40% more tensor-core FLOPs, bought for bitwise-deterministic dQ
// (atomicAdd order varies run to run) and no fp32 dQ scratch buffer. Issue 16 allows atomics only behind an
// option; none is offered yet.
// Tiles live in shared memory as 16-bit rows of P + 8 halves (P = D padded to 32 / 64 / 128 with zeros); the
// 16-byte pad makes the 8 rows an ldmatrix reads fall in 8 different bank groups. Rows past S are zeros, columns
// past D are zeros, so they add nothing to the products; P of a query past S is 0 (lse = +inf), P of a key past S
// is masked. Tiles are loaded with cp.async when every row is 16-byte aligned (D % 8 == 0, strides and base
// aligned), else element by element; one stage (no double buffering yet).
// CogVideo: a streamed tile with no visible pair against the block's rows is skipped in both kernels
// (block_may_see, uniform over the block), and pairs are masked per element.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "attention_tc_bwd.h"
#include "dual_channel_visibility.h"
#include "dynamic_smem.cuh"
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
  int64_t text_len;
  __device__ __forceinline__ bool tile_may_see(int64_t q_lo, int64_t q_hi, int64_t k_lo, int64_t k_hi) const {
    return dual_channel::block_may_see(layout, static_cast<int>(q_lo), static_cast<int>(q_hi),
                                       static_cast<int>(k_lo), static_cast<int>(k_hi));
  }
  __device__ __forceinline__ bool visible(int64_t b, int64_t query, int64_t key) const {
    if (key < text_len && text_pad_mask != nullptr && !text_pad_mask[b * text_len + key]) return false;
    return dual_channel::key_visible(layout, static_cast<int>(query), static_cast<int>(key));
  }
};

template <typename scalar_t>
struct MmaOf;
template <>
struct MmaOf<at::Half> {
  using Pair = __half2;
  __device__ __forceinline__ static void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    tc::mma_m16n8k16_f16(d, a, b, d);
  }
};
template <>
struct MmaOf<at::BFloat16> {
  using Pair = __nv_bfloat162;
  __device__ __forceinline__ static void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    tc::mma_m16n8k16_bf16(d, a, b, d);
  }
};

// tile[r][c] (rows of ld halves) = x[row0 + r, c] for r < rows, c < padded; zeros past S and past D. All threads.
// aligned: D % 8 == 0 and every row start 16-byte aligned, so a row is D / 8 whole cp.async packets.
__device__ __forceinline__ void load_tile(uint16_t* __restrict__ tile,  // [rows][ld] shared
                                          int ld, int rows, int padded,
                                          const uint16_t* __restrict__ base,  // x[b, t, 0, h, :]
                                          int64_t row_stride, int64_t row0, int64_t S, int D, bool aligned) {
  const int packets = padded / 8;
  if (aligned) {
    for (int e = threadIdx.x; e < rows * packets; e += kThreads) {
      const int r = e / packets, c = (e - r * packets) * 8;
      const int64_t s = row0 + r;
      const bool valid = s < S && c < D;
      // src_bytes = 0 zero-fills; the address must still be valid, so it points at the row base then.
      tc::cp_async_16(tile + r * ld + c, valid ? base + s * row_stride + c : base, valid ? 16 : 0);
    }
    tc::cp_async_commit();
    tc::cp_async_wait<0>();
  } else {
    for (int e = threadIdx.x; e < rows * padded; e += kThreads) {
      const int r = e / padded, c = e - r * padded;
      const int64_t s = row0 + r;
      tile[r * ld + c] = (s < S && c < D) ? base[s * row_stride + c] : uint16_t(0);
    }
  }
}

// ldmatrix x4 addressing, lane = 8 j + r gives row r of matrix j:
//   A operand (16 x 16 at (row0, col0) of a row-major tile): matrices (0,0), (8,0), (0,8), (8,8).
__device__ __forceinline__ void load_a(uint32_t a[4], const uint16_t* tile, int ld, int row0, int col0, int lane) {
  const int j = lane >> 3, r = lane & 7;
  tc::ldmatrix<4, false>(a, tile + (row0 + (j & 1) * 8 + r) * ld + col0 + (j >> 1) * 8);
}
//   B = tile^T (tile rows are the n index): n-tiles n0 and n0 + 8, k = columns k0 .. k0 + 15.
//   b[0..1] for n-tile n0, b[2..3] for n0 + 8.
__device__ __forceinline__ void load_b_transposed_tile(uint32_t b[4], const uint16_t* tile, int ld, int n0, int k0,
                                                       int lane) {
  const int j = lane >> 3, r = lane & 7;
  tc::ldmatrix<4, false>(b, tile + (n0 + (j >> 1) * 8 + r) * ld + k0 + (j & 1) * 8);
}
//   B = tile (tile rows are the k index, k0 .. k0 + 15): n-tiles n0 and n0 + 8 (.trans).
__device__ __forceinline__ void load_b_tile(uint32_t b[4], const uint16_t* tile, int ld, int k0, int n0, int lane) {
  const int j = lane >> 3, r = lane & 7;
  tc::ldmatrix<4, true>(b, tile + (k0 + (j & 1) * 8 + r) * ld + n0 + (j >> 1) * 8);
}

// acc[16 x kCols] (C fragments, kCols / 8 n-tiles) += A[16 x kK] (C-fragment registers of a 16 x kK product,
// converted to 16-bit A fragments) * tile[k rows 0 .. kK-1][0 .. kCols-1].
template <typename scalar_t, int kK, int kCols>
__device__ __forceinline__ void accumulate_product(float (&acc)[kCols / 8][4], const float (&weights)[kK / 8][4],
                                                   const uint16_t* tile, int ld, int lane) {
  using Pair = typename MmaOf<scalar_t>::Pair;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint32_t a[4] = {tc::pack_two<Pair>(weights[2 * kk][0], weights[2 * kk][1]),
                           tc::pack_two<Pair>(weights[2 * kk][2], weights[2 * kk][3]),
                           tc::pack_two<Pair>(weights[2 * kk + 1][0], weights[2 * kk + 1][1]),
                           tc::pack_two<Pair>(weights[2 * kk + 1][2], weights[2 * kk + 1][3])};
#pragma unroll
    for (int nt = 0; nt < kCols / 16; ++nt) {
      uint32_t b[4];
      load_b_tile(b, tile, ld, kk * 16, nt * 16, lane);
      MmaOf<scalar_t>::mma(acc[2 * nt], a, b);
      MmaOf<scalar_t>::mma(acc[2 * nt + 1], a, b + 2);
    }
  }
}

// out[16 x kN] = rows row0 .. row0+15 of `rows_tile` times the transpose of `cols_tile` (kN rows), over kPadded.
template <typename scalar_t, int kPadded, int kN>
__device__ __forceinline__ void row_products(float (&out)[kN / 8][4], const uint16_t* rows_tile, int row0,
                                             const uint16_t* cols_tile, int ld, int lane) {
#pragma unroll
  for (int nt = 0; nt < kN / 8; ++nt) out[nt][0] = out[nt][1] = out[nt][2] = out[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kPadded / 16; ++kk) {
    uint32_t a[4];
    load_a(a, rows_tile, ld, row0, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < kN / 16; ++nt) {
      uint32_t b[4];
      load_b_transposed_tile(b, cols_tile, ld, nt * 16, kk * 16, lane);
      MmaOf<scalar_t>::mma(out[2 * nt], a, b);
      MmaOf<scalar_t>::mma(out[2 * nt + 1], a, b + 2);
    }
  }
}

// Writes the warp's 16 x kPadded accumulator (times `factor`) to rows row0 + 16 w .. of a contiguous output whose
// row s of this problem is out_base[s * out_row_stride]; rows >= S and columns >= D are not written.
template <typename scalar_t, int kPadded>
__device__ __forceinline__ void store_rows(scalar_t* __restrict__ out_base, int64_t out_row_stride,
                                           const float (&acc)[kPadded / 8][4], float factor, int64_t warp_row0,
                                           int64_t S, int D, int lane) {
  const int group = lane >> 2, quad = lane & 3;
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
    tc_bwd_dkdv_kernel(const uint16_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                       const uint16_t* __restrict__ q,         // (B, T, S, H, D), strides q_st
                       const uint16_t* __restrict__ k,         // (B, T, S, H, D), strides k_st
                       const uint16_t* __restrict__ v,         // (B, T, S, H, D), strides v_st
                       Strides do_st, Strides q_st, Strides k_st, Strides v_st, bool aligned,
                       const float* __restrict__ lse,    // (B, T, S, H) contiguous
                       const float* __restrict__ delta,  // (B, T, S, H) contiguous
                       Policy policy, float scale, int64_t T, int64_t S, int64_t H, int D,
                       int64_t key_blocks,           // ceil(S / 64)
                       scalar_t* __restrict__ dk,    // (B, T, S, H, D) contiguous
                       scalar_t* __restrict__ dv) {  // (B, T, S, H, D) contiguous
  constexpr int kStream = smem_plan::tc_bwd_stream_rows(kPadded);
  constexpr int ld = smem_plan::tc_bwd_row_halves(kPadded);
  extern __shared__ float smem[];
  uint16_t* k_tile = reinterpret_cast<uint16_t*>(smem);  // [64][ld]
  uint16_t* v_tile = k_tile + kOwnRows * ld;              // [64][ld]
  uint16_t* q_tile = v_tile + kOwnRows * ld;              // [kStream][ld]
  uint16_t* do_tile = q_tile + kStream * ld;              // [kStream][ld]
  float* lse_tile = reinterpret_cast<float*>(do_tile + kStream * ld);  // [kStream]
  float* delta_tile = lse_tile + kStream;                              // [kStream]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane >> 2, quad = lane & 3;
  const Problem p = decode_block(key_blocks, T, H);
  const int64_t key0 = p.block * kOwnRows, key_end = key0 + kOwnRows < S ? key0 + kOwnRows : S;
  load_tile(k_tile, ld, kOwnRows, kPadded, k + head_offset(k_st, p), k_st.s, key0, S, D, aligned);
  load_tile(v_tile, ld, kOwnRows, kPadded, v + head_offset(v_st, p), v_st.s, key0, S, D, aligned);
  const uint16_t* q_base = q + head_offset(q_st, p);
  const uint16_t* do_base = grad_out + head_offset(do_st, p);
  const int64_t stat0 = ((p.b * T + p.t) * S) * H + p.h;  // lse / delta of token s at stat0 + s * H

  float dk_acc[kPadded / 8][4], dv_acc[kPadded / 8][4];
#pragma unroll
  for (int nt = 0; nt < kPadded / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[nt][e] = dv_acc[nt][e] = 0.f;
  }

  for (int64_t query0 = 0; query0 < S; query0 += kStream) {
    const int64_t query_end = query0 + kStream < S ? query0 + kStream : S;
    if (!policy.tile_may_see(query0, query_end, key0, key_end)) continue;
    __syncthreads();  // the previous query tile is consumed (the first time: nothing pending)
    load_tile(q_tile, ld, kStream, kPadded, q_base, q_st.s, query0, S, D, aligned);
    load_tile(do_tile, ld, kStream, kPadded, do_base, do_st.s, query0, S, D, aligned);
    for (int r = threadIdx.x; r < kStream; r += kThreads) {
      const int64_t s = query0 + r;
      lse_tile[r] = s < S ? lse[stat0 + s * H] : kInf;  // a query past S gets P = 0
      delta_tile[r] = s < S ? delta[stat0 + s * H] : 0.f;
    }
    __syncthreads();

    // S^T and dP^T of the warp's 16 keys against the kStream queries.
    float prob[kStream / 8][4], dscore[kStream / 8][4];
    row_products<scalar_t, kPadded, kStream>(prob, k_tile, warp * 16, q_tile, ld, lane);
    row_products<scalar_t, kPadded, kStream>(dscore, v_tile, warp * 16, do_tile, ld, lane);
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
    accumulate_product<scalar_t, kStream, kPadded>(dv_acc, prob, do_tile, ld, lane);
    accumulate_product<scalar_t, kStream, kPadded>(dk_acc, dscore, q_tile, ld, lane);
  }

  const int64_t out_row_stride = H * D;
  const int64_t out0 = ((p.b * T + p.t) * S * H + p.h) * D;  // dk[b, t, 0, h, 0]
  store_rows<scalar_t, kPadded>(dk + out0, out_row_stride, dk_acc, scale, key0 + warp * 16, S, D, lane);
  store_rows<scalar_t, kPadded>(dv + out0, out_row_stride, dv_acc, 1.f, key0 + warp * 16, S, D, lane);
}

template <typename scalar_t, int kPadded, typename Policy>
__global__ void __launch_bounds__(kThreads)
    tc_bwd_dq_kernel(const uint16_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                     const uint16_t* __restrict__ q,         // (B, T, S, H, D), strides q_st
                     const uint16_t* __restrict__ k,         // (B, T, S, H, D), strides k_st
                     const uint16_t* __restrict__ v,         // (B, T, S, H, D), strides v_st
                     Strides do_st, Strides q_st, Strides k_st, Strides v_st, bool aligned,
                     const float* __restrict__ lse,    // (B, T, S, H) contiguous
                     const float* __restrict__ delta,  // (B, T, S, H) contiguous
                     Policy policy, float scale, int64_t T, int64_t S, int64_t H, int D,
                     int64_t query_blocks,         // ceil(S / 64)
                     scalar_t* __restrict__ dq) {  // (B, T, S, H, D) contiguous
  constexpr int kStream = smem_plan::tc_bwd_stream_rows(kPadded);
  constexpr int ld = smem_plan::tc_bwd_row_halves(kPadded);
  extern __shared__ float smem[];
  uint16_t* q_tile = reinterpret_cast<uint16_t*>(smem);  // [64][ld]
  uint16_t* do_tile = q_tile + kOwnRows * ld;             // [64][ld]
  uint16_t* k_tile = do_tile + kOwnRows * ld;             // [kStream][ld]
  uint16_t* v_tile = k_tile + kStream * ld;               // [kStream][ld]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane >> 2, quad = lane & 3;
  const Problem p = decode_block(query_blocks, T, H);
  const int64_t query0 = p.block * kOwnRows, query_end = query0 + kOwnRows < S ? query0 + kOwnRows : S;
  load_tile(q_tile, ld, kOwnRows, kPadded, q + head_offset(q_st, p), q_st.s, query0, S, D, aligned);
  load_tile(do_tile, ld, kOwnRows, kPadded, grad_out + head_offset(do_st, p), do_st.s, query0, S, D, aligned);
  const uint16_t* k_base = k + head_offset(k_st, p);
  const uint16_t* v_base = v + head_offset(v_st, p);
  const int64_t stat0 = ((p.b * T + p.t) * S) * H + p.h;

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

  for (int64_t key0 = 0; key0 < S; key0 += kStream) {
    const int64_t key_end = key0 + kStream < S ? key0 + kStream : S;
    if (!policy.tile_may_see(query0, query_end, key0, key_end)) continue;
    __syncthreads();  // the previous key tile is consumed; the first time, orders the q / dO loads
    load_tile(k_tile, ld, kStream, kPadded, k_base, k_st.s, key0, S, D, aligned);
    load_tile(v_tile, ld, kStream, kPadded, v_base, v_st.s, key0, S, D, aligned);
    __syncthreads();

    float dscore[kStream / 8][4], dprob[kStream / 8][4];
    row_products<scalar_t, kPadded, kStream>(dscore, q_tile, warp * 16, k_tile, ld, lane);
    row_products<scalar_t, kPadded, kStream>(dprob, do_tile, warp * 16, v_tile, ld, lane);
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
    accumulate_product<scalar_t, kStream, kPadded>(dq_acc, dscore, k_tile, ld, lane);
  }

  const int64_t out0 = ((p.b * T + p.t) * S * H + p.h) * D;
  store_rows<scalar_t, kPadded>(dq + out0, H * D, dq_acc, scale, query0 + warp * 16, S, D, lane);
}

Strides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

// Every row of every tensor starts on a 16-byte boundary and D is whole 16-byte packets (cp.async path).
bool rows_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* x : tensors) {
    if (x->size(4) % 8 != 0 || reinterpret_cast<uintptr_t>(x->const_data_ptr()) % 16 != 0) return false;
    for (int dim = 0; dim < 4; ++dim) {
      if (x->size(dim) > 1 && x->stride(dim) % 8 != 0) return false;
    }
  }
  return true;
}

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
  const bool aligned = rows_aligned({&grad_out, &q, &k, &v});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* go_p = reinterpret_cast<const uint16_t*>(grad_out.const_data_ptr());
  const auto* q_p = reinterpret_cast<const uint16_t*>(q.const_data_ptr());
  const auto* k_p = reinterpret_cast<const uint16_t*>(k.const_data_ptr());
  const auto* v_p = reinterpret_cast<const uint16_t*>(v.const_data_ptr());
  dispatch_padded(D, [&](auto padded) {
    constexpr int kPadded = decltype(padded)::value;
    constexpr int64_t kDkDvBytes = smem_plan::tc_bwd_dkdv_bytes_of_padded(kPadded);
    constexpr int64_t kDqBytes = smem_plan::tc_bwd_dq_bytes_of_padded(kPadded);
    auto dkdv_kernel = tc_bwd_dkdv_kernel<scalar_t, kPadded, Policy>;
    cuda_smem::prepare_launch(op, dkdv_kernel, kDkDvBytes, kDkDvBytes, "the tensor-core dk/dv kernel");
    TORCHNOVA_LAUNCH_KERNEL(static_cast<unsigned>(blocks), kThreads, kDkDvBytes, stream, dkdv_kernel)(
        go_p, q_p, k_p, v_p, strides_of(grad_out), strides_of(q), strides_of(k), strides_of(v), aligned,
        lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), policy, static_cast<float>(scale), T, S, H, D,
        row_blocks, dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dq_kernel = tc_bwd_dq_kernel<scalar_t, kPadded, Policy>;
    cuda_smem::prepare_launch(op, dq_kernel, kDqBytes, kDqBytes, "the tensor-core dq kernel");
    TORCHNOVA_LAUNCH_KERNEL(static_cast<unsigned>(blocks), kThreads, kDqBytes, stream, dq_kernel)(
        go_p, q_p, k_p, v_p, strides_of(grad_out), strides_of(q), strides_of(k), strides_of(v), aligned,
        lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), policy, static_cast<float>(scale), T, S, H, D,
        row_blocks, dq.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

namespace attention_tc {

bool tensor_core_backward_supports(const at::Tensor& q, const char** why_not) {
  const char* reason = nullptr;
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) {
    reason = "the tensor-core backward takes float16 or bfloat16 inputs";
  } else if (q.size(-1) > kMaxHeadDim) {
    reason = "the tensor-core backward takes head dims up to 128";
  } else if (at::cuda::getCurrentDeviceProperties()->major < 8) {
    reason = "tensor-core mma.sync needs compute capability 8.0 or newer";
  }
  if (why_not != nullptr) *why_not = reason;
  return reason == nullptr;
}

bool use_tensor_core_backward(const char* op, const at::Tensor& q) {
  const char* env = std::getenv("TORCHNOVA_CUDA_ATTENTION_KERNEL");
  const std::string choice = env == nullptr ? "auto" : env;
  TORCH_CHECK_VALUE(choice == "auto" || choice == "tensor_core" || choice == "simt" || choice.empty(), op,
                    ": TORCHNOVA_CUDA_ATTENTION_KERNEL must be auto, tensor_core or simt, got \"", choice, "\"");
  if (choice == "simt") return false;
  const char* why_not = nullptr;
  const bool supported = tensor_core_backward_supports(q, &why_not);
  TORCH_CHECK_VALUE(supported || choice != "tensor_core", op,
                    ": TORCHNOVA_CUDA_ATTENTION_KERNEL=tensor_core, but ", why_not, " (got ", q.scalar_type(),
                    ", head dim ", q.size(-1), "); unset it or set auto to fall back to the SIMT kernels");
  return supported;
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
      const CogVideoPolicy policy{cogvideo->layout, cogvideo->text_pad_mask, cogvideo->text_len};
      launch_backward<scalar_t>(op, grad_out, q, k, v, lse, delta, scale, policy, dq, dk, dv);
    }
  };
  if (q.scalar_type() == at::kHalf) {
    run(at::Half{});
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, op, ": internal error: tensor-core backward for ",
                q.scalar_type());
    run(at::BFloat16{});
  }
}

}  // namespace attention_tc
}  // namespace torchnova
