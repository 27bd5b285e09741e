// Spatial attention (factorized space-time attention, Video Diffusion Models), CUDA kernels.
//
// Layout (B, T, S, H, D); one problem per (b, t, h): full (unmasked, unbiased) attention over the S tokens of
// frame t, head h.
//   scores[i, j] = scale * q[b,t,i,h,:] . k[b,t,j,h,:],  lse[i] = log sum_j exp(scores[i, j])
//   P[i, j] = exp(scores[i, j] - lse[i]),  out[i, :] = sum_j P[i, j] v[j, :]
// Backward (FlashAttention-2 order), delta[i] = rowsum(dO o out)[i], dP[i, j] = dO[i, :] . v[j, :]:
//   dS = P o (dP - delta),  dv[j, :] = sum_i P[i, j] dO[i, :],  dk[j, :] = scale * sum_i dS[i, j] q[i, :],
//   dq[i, :] = scale * sum_j dS[i, j] k[j, :]
//
// Shapes (op schemas in csrc/spacetime_ops.cpp): q, k, v, grad_out, out (B, T, S, H, D) float32/float16/bfloat16
// with any strides and stride(-1) == 1; lse (B, T, S, H) float32; outputs contiguous. D in 1..256, any S.
//
// Kernels (SIMT, fp32 accumulation; FlashAttention-2 tiling). The forward of float16 / bfloat16 with D <= 128 on
// sm_80+ runs on the tensor-core kernel of attention_tc_fwd.cu instead (see spatial_attention_fwd_cuda). Head dims are bucketed into
// compile-time maxima kDMax = 64 / 128 / 256 (per-lane register arrays of kDMax / 32 columns); the runtime D
// bounds every loop. Shared tiles are fp32 [rows][ld] with ld = D | 1 (odd: lanes reading one column of 32 rows
// hit distinct banks; lanes reading 32 columns of one row are consecutive words). Rows past S are zero-filled
// and never stored. Grid: blockIdx.x = problem * row_blocks + row_block (grid.x only, problems ordered
// (b, t, h) with h fastest).
//   spatial_fwd_kernel:   4 warps x 8 query rows = 32 query rows per block; key blocks of 32 stream through
//                         shared memory; lane = key for the scores, lane = head-dim column for the output;
//                         online softmax per row in registers.
//   spatial_delta_kernel: delta = rowsum(dO o out) in fp32, one warp per row.
//   spatial_dkdv_kernel:  8 warps x kKeysPerWarp keys (32 keys per block for kDMax <= 128, 16 for 256) stay in
//                         shared memory; query blocks of 32 stream; lane = query for P and dS, lane = column for
//                         the dk / dv accumulators.
//   spatial_dq_kernel:    4 warps x kRowsPerWarp query rows (8, or 4 for kDMax = 256) with their dO rows; key
//                         blocks of 32 stream; a separate pass, so dq needs no atomics (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_launch.cuh"

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "attention_tc_bwd.h"
#include "attention_tc_fwd.h"
#include "spacetime_common.cuh"

namespace torchnova {
namespace {

using namespace spacetime_cuda;

// Tile sizes live in shared_memory_plan.h, which also tells the backend reasons what each launch needs.
constexpr int kFwdWarps = smem_plan::kSpatialFwdWarps;
constexpr int kFwdRowsPerWarp = smem_plan::kSpatialFwdRowsPerWarp;
constexpr int kFwdBlockQ = smem_plan::kSpatialFwdBlockQ;            // 32
constexpr int kKeyBlock = smem_plan::kSpatialKeyBlock;              // keys per streamed block = lanes (fwd, dq)
constexpr int kDkDvWarps = 8;
constexpr int kDkDvQueryBlock = smem_plan::kSpatialDkDvQueryBlock;  // queries per streamed block = lanes (dkdv)
constexpr int kDqWarps = smem_plan::kSpatialDqWarps;
constexpr int kDeltaWarps = 8;
static_assert(kKeyBlock == kWarpSize && kDkDvQueryBlock == kWarpSize, "streamed blocks have one row per lane");

template <int kDMax>
constexpr int kDkDvBlockK = smem_plan::spatial_dkdv_block_k(kDMax);
template <int kDMax>
constexpr int kDqRowsPerWarp = smem_plan::spatial_dq_rows_per_warp(kDMax);

constexpr float kInf = std::numeric_limits<float>::infinity();

// One problem's position: (b, t, h) and the row block, from blockIdx.x.
struct ProblemIndex {
  int64_t b, t, h;
  int64_t block;  // row block within the problem
};

__device__ __forceinline__ ProblemIndex decode_block(int64_t row_blocks, int64_t T, int64_t H) {
  const int64_t linear = blockIdx.x;
  const int64_t problem = linear / row_blocks;
  const int64_t h = problem % H, bt = problem / H;
  return {bt / T, bt % T, h, linear % row_blocks};
}

// tile[r][d] = x[b, t, row0 + r, h, d] for r < rows, d < D, as float; rows at or past S are zeros.
// All threads of the block take part (consecutive threads read consecutive d: coalesced).
template <typename scalar_t>
__device__ __forceinline__ void load_rows(float* tile,           // [rows][ld]
                                          int ld,
                                          const scalar_t* base,  // x[b, t, 0, h, :]
                                          int64_t token_stride,  // element stride over s
                                          int64_t row0, int rows, int64_t S, int D) {
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = e / D, d = e - r * D;
    const int64_t s = row0 + r;
    tile[r * ld + d] = s < S ? to_float(base[s * token_stride + d]) : 0.f;
  }
}

template <typename scalar_t, int kDMax>
__global__ void __launch_bounds__(kFwdWarps* kWarpSize)
    spatial_fwd_kernel(const scalar_t* __restrict__ q,  // (B, T, S, H, D), strides q_st
                       const scalar_t* __restrict__ k,  // (B, T, S, H, D), strides k_st
                       const scalar_t* __restrict__ v,  // (B, T, S, H, D), strides v_st
                       TokenStrides q_st, TokenStrides k_st, TokenStrides v_st, float scale, int64_t T, int64_t S,
                       int64_t H, int D,
                       int64_t query_blocks,        // ceil(S / kFwdBlockQ)
                       scalar_t* __restrict__ out,  // (B, T, S, H, D) contiguous
                       float* __restrict__ lse) {   // (B, T, S, H) contiguous
  constexpr int kCols = kDMax / kWarpSize;           // head-dim columns per lane
  extern __shared__ float smem[];
  const int ld = odd_stride(D);
  float* q_tile = smem;                        // [kFwdBlockQ][ld]
  float* k_tile = q_tile + kFwdBlockQ * ld;    // [kKeyBlock][ld]
  float* v_tile = k_tile + kKeyBlock * ld;     // [kKeyBlock][ld]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const ProblemIndex p = decode_block(query_blocks, T, H);
  const int64_t q_row0 = p.block * kFwdBlockQ;
  load_rows(q_tile, ld, q + token_offset(q_st, p.b, p.t, 0, p.h), q_st.s, q_row0, kFwdBlockQ, S, D);
  const scalar_t* k_base = k + token_offset(k_st, p.b, p.t, 0, p.h);
  const scalar_t* v_base = v + token_offset(v_st, p.b, p.t, 0, p.h);

  const float* my_q = q_tile + warp * kFwdRowsPerWarp * ld;  // this warp's kFwdRowsPerWarp rows
  float row_max[kFwdRowsPerWarp], row_sum[kFwdRowsPerWarp], acc[kFwdRowsPerWarp][kCols];
#pragma unroll
  for (int r = 0; r < kFwdRowsPerWarp; ++r) {
    row_max[r] = -kInf;
    row_sum[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  }

  for (int64_t key0 = 0; key0 < S; key0 += kKeyBlock) {
    __syncthreads();  // previous key block fully consumed (and, the first time, nothing pending)
    load_rows(k_tile, ld, k_base, k_st.s, key0, kKeyBlock, S, D);
    load_rows(v_tile, ld, v_base, v_st.s, key0, kKeyBlock, S, D);
    __syncthreads();

    // Lane = key: scores of the warp's rows against key key0 + lane.
    float score[kFwdRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kFwdRowsPerWarp; ++r) score[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = k_tile[lane * ld + d];
#pragma unroll
      for (int r = 0; r < kFwdRowsPerWarp; ++r) score[r] += my_q[r * ld + d] * kd;
    }
    const bool key_valid = key0 + lane < S;  // lane 0 is always valid: key0 < S
#pragma unroll
    for (int r = 0; r < kFwdRowsPerWarp; ++r) {
      const float x = key_valid ? score[r] * scale : -kInf;
      const float new_max = fmaxf(row_max[r], warp_max(x));  // finite: lane 0's key is valid
      const float p_lane = expf(x - new_max);
      const float carry = expf(row_max[r] - new_max);  // 0 on the first block (row_max = -inf)
      row_sum[r] = row_sum[r] * carry + warp_sum(p_lane);
      row_max[r] = new_max;
      score[r] = p_lane;
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] *= carry;
    }
    // Lane = column: acc[r][c] += sum_j p[r][j] v[j][lane + 32 c].
    const int keys = static_cast<int>(S - key0 < kKeyBlock ? S - key0 : kKeyBlock);
    for (int j = 0; j < keys; ++j) {
      float vj[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + c * kWarpSize;
        vj[c] = d < D ? v_tile[j * ld + d] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kFwdRowsPerWarp; ++r) {
        const float pj = __shfl_sync(kFullWarp, score[r], j);
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[r][c] += pj * vj[c];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kFwdRowsPerWarp; ++r) {
    const int64_t s = q_row0 + warp * kFwdRowsPerWarp + r;
    if (s >= S) continue;
    const int64_t row = row_index(p.b, p.t, s, p.h, T, S, H);
    const float inv_sum = 1.f / row_sum[r];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < D) out[row * D + d] = from_float<scalar_t>(acc[r][c] * inv_sum);
    }
    if (lane == 0) lse[row] = row_max[r] + logf(row_sum[r]);
  }
}

// delta[row] = sum_d dO[row, d] * out[row, d] in fp32; one warp per (b, t, s, h) row, rows in lse order.
template <typename scalar_t>
__global__ void __launch_bounds__(kDeltaWarps* kWarpSize)
    spatial_delta_kernel(const scalar_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                         const scalar_t* __restrict__ out,       // (B, T, S, H, D), strides out_st
                         TokenStrides do_st, TokenStrides out_st, int64_t T, int64_t S, int64_t H, int D,
                         int64_t rows,                  // B * T * S * H
                         float* __restrict__ delta) {   // (B, T, S, H) contiguous
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kDeltaWarps + warp;
  if (row >= rows) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t h = row % H, s = (row / H) % S, t = (row / (H * S)) % T, b = row / (H * S * T);
  const scalar_t* do_row = grad_out + token_offset(do_st, b, t, s, h);
  const scalar_t* out_row = out + token_offset(out_st, b, t, s, h);
  float sum = 0.f;
  for (int d = lane; d < D; d += kWarpSize) sum += to_float(do_row[d]) * to_float(out_row[d]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

template <typename scalar_t, int kDMax>
__global__ void __launch_bounds__(kDkDvWarps* kWarpSize)
    spatial_dkdv_kernel(const scalar_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                        const scalar_t* __restrict__ q,         // (B, T, S, H, D), strides q_st
                        const scalar_t* __restrict__ k,         // (B, T, S, H, D), strides k_st
                        const scalar_t* __restrict__ v,         // (B, T, S, H, D), strides v_st
                        TokenStrides do_st, TokenStrides q_st, TokenStrides k_st, TokenStrides v_st,
                        const float* __restrict__ lse,    // (B, T, S, H) contiguous
                        const float* __restrict__ delta,  // (B, T, S, H) contiguous
                        float scale, int64_t T, int64_t S, int64_t H, int D,
                        int64_t key_blocks,          // ceil(S / kDkDvBlockK)
                        scalar_t* __restrict__ dk,   // (B, T, S, H, D) contiguous
                        scalar_t* __restrict__ dv) { // (B, T, S, H, D) contiguous
  constexpr int kCols = kDMax / kWarpSize;
  constexpr int kBlockK = kDkDvBlockK<kDMax>;
  constexpr int kKeysPerWarp = kBlockK / kDkDvWarps;
  extern __shared__ float smem[];
  const int ld = odd_stride(D);
  float* k_tile = smem;                                  // [kBlockK][ld]
  float* v_tile = k_tile + kBlockK * ld;                 // [kBlockK][ld]
  float* q_tile = v_tile + kBlockK * ld;                  // [kDkDvQueryBlock][ld]
  float* do_tile = q_tile + kDkDvQueryBlock * ld;        // [kDkDvQueryBlock][ld]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const ProblemIndex p = decode_block(key_blocks, T, H);
  const int64_t key_row0 = p.block * kBlockK;
  load_rows(k_tile, ld, k + token_offset(k_st, p.b, p.t, 0, p.h), k_st.s, key_row0, kBlockK, S, D);
  load_rows(v_tile, ld, v + token_offset(v_st, p.b, p.t, 0, p.h), v_st.s, key_row0, kBlockK, S, D);
  const scalar_t* q_base = q + token_offset(q_st, p.b, p.t, 0, p.h);
  const scalar_t* do_base = grad_out + token_offset(do_st, p.b, p.t, 0, p.h);
  const int64_t stat_row0 = row_index(p.b, p.t, 0, p.h, T, S, H);  // lse / delta of token s at stat_row0 + s * H

  const float* my_k = k_tile + warp * kKeysPerWarp * ld;
  const float* my_v = v_tile + warp * kKeysPerWarp * ld;
  float dk_acc[kKeysPerWarp][kCols], dv_acc[kKeysPerWarp][kCols];
#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) dk_acc[kk][c] = dv_acc[kk][c] = 0.f;
  }

  for (int64_t query0 = 0; query0 < S; query0 += kDkDvQueryBlock) {
    __syncthreads();  // previous query block consumed; the first time, orders the k / v tile loads
    load_rows(q_tile, ld, q_base, q_st.s, query0, kDkDvQueryBlock, S, D);
    load_rows(do_tile, ld, do_base, do_st.s, query0, kDkDvQueryBlock, S, D);
    __syncthreads();

    // Lane = query query0 + lane; a query past S gets P = 0 (lse = +inf) and dS = 0.
    const int64_t s = query0 + lane;
    const float row_lse = s < S ? lse[stat_row0 + s * H] : kInf;
    const float row_delta = s < S ? delta[stat_row0 + s * H] : 0.f;
    float score[kKeysPerWarp], dprob[kKeysPerWarp];
#pragma unroll
    for (int kk = 0; kk < kKeysPerWarp; ++kk) score[kk] = dprob[kk] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float qd = q_tile[lane * ld + d], dod = do_tile[lane * ld + d];
#pragma unroll
      for (int kk = 0; kk < kKeysPerWarp; ++kk) {
        score[kk] += qd * my_k[kk * ld + d];
        dprob[kk] += dod * my_v[kk * ld + d];
      }
    }
    float prob[kKeysPerWarp], dscore[kKeysPerWarp];
#pragma unroll
    for (int kk = 0; kk < kKeysPerWarp; ++kk) {
      prob[kk] = expf(score[kk] * scale - row_lse);
      dscore[kk] = prob[kk] * (dprob[kk] - row_delta);
    }

    // Lane = column: dv[kk] += sum_i P[i, kk] dO[i, :], dk[kk] += sum_i dS[i, kk] q[i, :].
    const int queries = static_cast<int>(S - query0 < kDkDvQueryBlock ? S - query0 : kDkDvQueryBlock);
    for (int i = 0; i < queries; ++i) {
      float qi[kCols], doi[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + c * kWarpSize;
        qi[c] = d < D ? q_tile[i * ld + d] : 0.f;
        doi[c] = d < D ? do_tile[i * ld + d] : 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kKeysPerWarp; ++kk) {
        const float pi = __shfl_sync(kFullWarp, prob[kk], i);
        const float dsi = __shfl_sync(kFullWarp, dscore[kk], i);
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          dv_acc[kk][c] += pi * doi[c];
          dk_acc[kk][c] += dsi * qi[c];
        }
      }
    }
  }

#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
    const int64_t s = key_row0 + warp * kKeysPerWarp + kk;
    if (s >= S) continue;
    const int64_t row = row_index(p.b, p.t, s, p.h, T, S, H);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < D) {
        dk[row * D + d] = from_float<scalar_t>(scale * dk_acc[kk][c]);
        dv[row * D + d] = from_float<scalar_t>(dv_acc[kk][c]);
      }
    }
  }
}

template <typename scalar_t, int kDMax>
__global__ void __launch_bounds__(kDqWarps* kWarpSize)
    spatial_dq_kernel(const scalar_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                      const scalar_t* __restrict__ q,         // (B, T, S, H, D), strides q_st
                      const scalar_t* __restrict__ k,         // (B, T, S, H, D), strides k_st
                      const scalar_t* __restrict__ v,         // (B, T, S, H, D), strides v_st
                      TokenStrides do_st, TokenStrides q_st, TokenStrides k_st, TokenStrides v_st,
                      const float* __restrict__ lse,    // (B, T, S, H) contiguous
                      const float* __restrict__ delta,  // (B, T, S, H) contiguous
                      float scale, int64_t T, int64_t S, int64_t H, int D,
                      int64_t query_blocks,         // ceil(S / (kDqWarps * kDqRowsPerWarp))
                      scalar_t* __restrict__ dq) {  // (B, T, S, H, D) contiguous
  constexpr int kCols = kDMax / kWarpSize;
  constexpr int kRowsPerWarp = kDqRowsPerWarp<kDMax>;
  constexpr int kBlockQ = kDqWarps * kRowsPerWarp;
  extern __shared__ float smem[];
  const int ld = odd_stride(D);
  float* q_tile = smem;                      // [kBlockQ][ld]
  float* do_tile = q_tile + kBlockQ * ld;    // [kBlockQ][ld]
  float* k_tile = do_tile + kBlockQ * ld;    // [kKeyBlock][ld]
  float* v_tile = k_tile + kKeyBlock * ld;   // [kKeyBlock][ld]
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const ProblemIndex p = decode_block(query_blocks, T, H);
  const int64_t q_row0 = p.block * kBlockQ;
  load_rows(q_tile, ld, q + token_offset(q_st, p.b, p.t, 0, p.h), q_st.s, q_row0, kBlockQ, S, D);
  load_rows(do_tile, ld, grad_out + token_offset(do_st, p.b, p.t, 0, p.h), do_st.s, q_row0, kBlockQ, S, D);
  const scalar_t* k_base = k + token_offset(k_st, p.b, p.t, 0, p.h);
  const scalar_t* v_base = v + token_offset(v_st, p.b, p.t, 0, p.h);

  const float* my_q = q_tile + warp * kRowsPerWarp * ld;
  const float* my_do = do_tile + warp * kRowsPerWarp * ld;
  float row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], dq_acc[kRowsPerWarp][kCols];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t s = q_row0 + warp * kRowsPerWarp + r;
    const int64_t row = row_index(p.b, p.t, s, p.h, T, S, H);
    row_lse[r] = s < S ? lse[row] : kInf;  // a row past S gets P = 0
    row_delta[r] = s < S ? delta[row] : 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) dq_acc[r][c] = 0.f;
  }

  for (int64_t key0 = 0; key0 < S; key0 += kKeyBlock) {
    __syncthreads();
    load_rows(k_tile, ld, k_base, k_st.s, key0, kKeyBlock, S, D);
    load_rows(v_tile, ld, v_base, v_st.s, key0, kKeyBlock, S, D);
    __syncthreads();

    // Lane = key key0 + lane: P and dS of the warp's rows; a key past S gets P = 0.
    float score[kRowsPerWarp], dprob[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) score[r] = dprob[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = k_tile[lane * ld + d], vd = v_tile[lane * ld + d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        score[r] += my_q[r * ld + d] * kd;
        dprob[r] += my_do[r * ld + d] * vd;
      }
    }
    const bool key_valid = key0 + lane < S;
    float dscore[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float prob = key_valid ? expf(score[r] * scale - row_lse[r]) : 0.f;
      dscore[r] = prob * (dprob[r] - row_delta[r]);
    }

    // Lane = column: dq[r] += sum_j dS[r, j] k[j, :].
    const int keys = static_cast<int>(S - key0 < kKeyBlock ? S - key0 : kKeyBlock);
    for (int j = 0; j < keys; ++j) {
      float kj[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int d = lane + c * kWarpSize;
        kj[c] = d < D ? k_tile[j * ld + d] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float dsj = __shfl_sync(kFullWarp, dscore[r], j);
#pragma unroll
        for (int c = 0; c < kCols; ++c) dq_acc[r][c] += dsj * kj[c];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t s = q_row0 + warp * kRowsPerWarp + r;
    if (s >= S) continue;
    const int64_t row = row_index(p.b, p.t, s, p.h, T, S, H);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int d = lane + c * kWarpSize;
      if (d < D) dq[row * D + d] = from_float<scalar_t>(scale * dq_acc[r][c]);
    }
  }
}

// Calls fn(std::integral_constant<int, kDMax>) for the smallest bucket 64 / 128 / 256 holding D.
template <typename Fn>
void dispatch_head_dim(int D, Fn&& fn) {
  if (D <= 64) {
    fn(std::integral_constant<int, 64>{});
  } else if (D <= 128) {
    fn(std::integral_constant<int, 128>{});
  } else {
    fn(std::integral_constant<int, kMaxHeadDim>{});
  }
}
static_assert(smem_plan::spatial_head_dim_bucket(64) == 64 && smem_plan::spatial_head_dim_bucket(65) == 128 &&
                  smem_plan::spatial_head_dim_bucket(129) == kMaxHeadDim,
              "dispatch_head_dim and shared_memory_plan.h must agree on the buckets");


std::tuple<at::Tensor, at::Tensor> spatial_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, double scale) {
  constexpr const char* op = "spatial_attention_fwd";
  check_like_q(op, "q", q, q);
  check_like_q(op, "k", k, q);
  check_like_q(op, "v", v, q);
  const at::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3);
  const int D = static_cast<int>(q.size(4));
  if (out.numel() == 0) return {out, lse};
  // float16 / bfloat16 with D <= 128 on sm_80+: the tensor-core kernel (attention_tc_fwd.cu), unless
  // TORCHNOVA_CUDA_ATTENTION_KERNEL says otherwise.
  if (attention_tc::use_tensor_core_forward(op, q, D)) {
    attention_tc::spatial_attention_fwd(q, k, v, scale, out, lse);
    return {out, lse};
  }

  const int64_t query_blocks = (S + kFwdBlockQ - 1) / kFwdBlockQ;
  const unsigned blocks = checked_grid(op, B * T * H * query_blocks);
  const int64_t smem_bytes = smem_plan::spatial_fwd_bytes(D);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TORCHNOVA_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "spatial_attention_fwd_cuda", [&] {
    dispatch_head_dim(D, [&](auto d_max) {
      constexpr int kDMax = decltype(d_max)::value;
      auto kernel = spatial_fwd_kernel<scalar_t, kDMax>;
      cuda_smem::prepare_launch(op, kernel, smem_bytes, smem_plan::spatial_fwd_bytes(kDMax),
                                "the spatial forward kernel");
      TORCHNOVA_LAUNCH_KERNEL(blocks, kFwdWarps * kWarpSize, smem_bytes, stream, kernel)(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          token_strides(q), token_strides(k), token_strides(v), static_cast<float>(scale), T, S, H, D, query_blocks,
          out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_bwd_cuda(const at::Tensor& grad_out,
                                                                          const at::Tensor& q, const at::Tensor& k,
                                                                          const at::Tensor& v, const at::Tensor& out,
                                                                          const at::Tensor& lse, double scale) {
  constexpr const char* op = "spatial_attention_bwd";
  check_like_q(op, "q", q, q);
  check_like_q(op, "k", k, q);
  check_like_q(op, "v", v, q);
  const at::Tensor grad_out_u = with_unit_head_stride(op, "grad_out", grad_out, q);
  const at::Tensor out_u = with_unit_head_stride(op, "out", out, q);
  const at::Tensor lse_c = checked_lse(op, lse, q);
  const at::cuda::CUDAGuard guard(q.device());
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous), dk = at::empty(q.sizes(), contiguous),
             dv = at::empty(q.sizes(), contiguous);
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3);
  const int D = static_cast<int>(q.size(4));
  if (dq.numel() == 0) return {dq, dk, dv};

  const int64_t rows = B * T * S * H, problems = B * T * H;
  // float16 / bfloat16 with D <= 128 on sm_80+: the tensor-core dq / dk / dv kernels (attention_tc_bwd.cu) after
  // the same delta kernel; TORCHNOVA_CUDA_ATTENTION_KERNEL overrides.
  const bool tensor_cores = attention_tc::use_tensor_core_backward(op, q);
  at::Tensor delta = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TORCHNOVA_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "spatial_attention_bwd_cuda", [&] {
    TORCHNOVA_LAUNCH_KERNEL(checked_grid(op, (rows + kDeltaWarps - 1) / kDeltaWarps), kDeltaWarps * kWarpSize, 0,
                            stream, spatial_delta_kernel<scalar_t>)(
        grad_out_u.const_data_ptr<scalar_t>(), out_u.const_data_ptr<scalar_t>(), token_strides(grad_out_u),
        token_strides(out_u), T, S, H, D, rows, delta.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (tensor_cores) {
      attention_tc::attention_bwd(op, grad_out_u, q, k, v, lse_c, delta, scale, nullptr, dq, dk, dv);
      return;
    }

    dispatch_head_dim(D, [&](auto d_max) {
      constexpr int kDMax = decltype(d_max)::value;
      constexpr int kBlockK = kDkDvBlockK<kDMax>;
      const int64_t key_blocks = (S + kBlockK - 1) / kBlockK;
      const int64_t dkdv_smem = smem_plan::spatial_dkdv_bytes(D);
      auto dkdv_kernel = spatial_dkdv_kernel<scalar_t, kDMax>;
      cuda_smem::prepare_launch(op, dkdv_kernel, dkdv_smem, smem_plan::spatial_dkdv_bytes(kDMax),
                                "the spatial dk/dv kernel");
      TORCHNOVA_LAUNCH_KERNEL(checked_grid(op, problems * key_blocks), kDkDvWarps * kWarpSize, dkdv_smem, stream,
                              dkdv_kernel)(
          grad_out_u.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), token_strides(grad_out_u), token_strides(q), token_strides(k),
          token_strides(v), lse_c.const_data_ptr<float>(), delta.const_data_ptr<float>(), static_cast<float>(scale),
          T, S, H, D, key_blocks, dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      constexpr int kBlockQ = kDqWarps * kDqRowsPerWarp<kDMax>;
      const int64_t query_blocks = (S + kBlockQ - 1) / kBlockQ;
      const int64_t dq_smem = smem_plan::spatial_dq_bytes(D);
      auto dq_kernel = spatial_dq_kernel<scalar_t, kDMax>;
      cuda_smem::prepare_launch(op, dq_kernel, dq_smem, smem_plan::spatial_dq_bytes(kDMax), "the spatial dq kernel");
      TORCHNOVA_LAUNCH_KERNEL(checked_grid(op, problems * query_blocks), kDqWarps * kWarpSize, dq_smem, stream,
                              dq_kernel)(
          grad_out_u.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), token_strides(grad_out_u), token_strides(q), token_strides(k),
          token_strides(v), lse_c.const_data_ptr<float>(), delta.const_data_ptr<float>(), static_cast<float>(scale),
          T, S, H, D, query_blocks, dq.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CUDA, m) {
  m.impl("spatial_attention_fwd", &spatial_attention_fwd_cuda);
  m.impl("spatial_attention_bwd", &spatial_attention_bwd_cuda);
}

}  // namespace torchnova
