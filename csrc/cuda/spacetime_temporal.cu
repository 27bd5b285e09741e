// Temporal attention (factorized space-time attention, Video Diffusion Models), CUDA kernels.
//
// Layout (B, T, S, H, D); one problem per (b, s, h): a sequence over the T frames of pixel s, head h.
//   scores[i, j] = scale * q[b,i,s,h,:] . k[b,j,s,h,:] + bias[h, i, j]                      (bias optional)
//   visible(i, j) = i == j  or  ((not causal or j <= i) and (no segment_ids or seg[b,i] == seg[b,j]))
//   P[i, j] = visible ? exp(scores[i, j] - lse[i]) : 0,  lse[i] = log sum_{visible j} exp(scores[i, j])
//   out[i, :] = sum_j P[i, j] v[j, :]
// Backward, with dP[i, j] = dO[i, :] . v[j, :] and dS = P o (dP - rowsum(P o dP)):
//   dv[j, :] = sum_i P[i, j] dO[i, :],  dq[i, :] = scale * sum_j dS[i, j] k[j, :],
//   dk[j, :] = scale * sum_i dS[i, j] q[i, :]
//   dbias[h, i, j] = sum over (b, s) of dS[i, j]
// rowsum(P o dP) equals rowsum(dO o out) in exact arithmetic; it is computed from the fp32 P recomputed here, so
// the backward does not read `out` (one tensor less of HBM traffic, and the exact gradient of the fp32 softmax).
//
// Shapes (op schemas in csrc/spacetime_ops.cpp): q, k, v, grad_out, out (B, T, S, H, D) float32/float16/bfloat16
// with any strides and stride(-1) == 1; bias (H, T, T) float32 contiguous; segment_ids (B, T) int64 contiguous;
// lse (B, T, S, H) float32; outputs contiguous; dbias (H, T, T) float32 or (0,).
// Limits: T in 1..128, D in 1..256.
//
// Rotary position embedding (the temporal_attention_rotary_* ops; the same kernels, template flag kRotary): q and
// k are rotated as their tiles are loaded into shared memory, so no rotated copy ever goes through HBM:
//   x'[t]_a = cos[t]_a x[t]_a - sin[t]_a x[t]_b,   x'[t]_b = cos[t]_b x[t]_b + sin[t]_b x[t]_a
// on the pairs (a, b) = (2i, 2i+1) (interleaved, rotary-embedding-torch) or (i, i + rot_dim/2) (half-split,
// GPT-NeoX / HF) of the first rot_dim head dims (the rest pass through); rotary_cos, rotary_sin (T, rot_dim)
// float32 contiguous. Scores, P, dS are then those of q', k', and dq', dk' go back through the transpose map
//   dx_a = cos_a dx'_a + sin_b dx'_b,   dx_b = cos_b dx'_b - sin_a dx'_a        (no gradient for the tables).
// Both members of a pair sit in the same 32-column q/k tile, on partner lanes lane ^ 1 (interleaved: chunks of 32
// consecutive dims) or lane ^ 16 (half-split: a q/k chunk holds 16 first members in lanes 0..15 and their 16
// partners in lanes 16..31; the dims past rot_dim follow in chunks of 32). The dot products do not care about
// the column order, a lane loads its own element and its partner's (the same row, already in L1), and the
// backward's transpose map takes the partner's dq', dk' with one shuffle: no extra shared memory.
//
// Work split: one warp owns one problem at a time; warps never synchronise with each other, so a block is just
// warps_per_block independent warps, each with its own slice of dynamic shared memory:
//   probs [T][ld] fp32 (ld = T | 1, odd: lanes walking a column of rows hit distinct banks),
//   (backward) dprobs [T][ld],
//   tile_a, tile_b [T][33] fp32: 32 head-dim columns of two of q, k, v, dO (lane = column when loading, so each
//   row load is one coalesced 32-element request; ceil(D / 32) column chunks, zero-filled past D).
// Forward: problem = blockIdx.x * warps_per_block + warp, ordered (b, s, h) with h fastest; grid.x only.
// Backward: warp g < H * C owns head h = g % H and the (b, s) pairs g / H, g / H + C, ...; it accumulates its dS
// sums in its own (T, T) slice g of a float32 workspace (no other writer), and a second kernel adds the C slices
// of each head in a fixed order. So dbias is always deterministic (bit-identical across runs); the atomic
// alternative would save only the (H * C * T * T) workspace pass, which is small next to the problems' traffic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_launch.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "spacetime_common.cuh"

namespace torchnova {
namespace {

using namespace spacetime_cuda;

constexpr int kMaxFrames = smem_plan::kTemporalMaxFrames;
constexpr int kMaxWarpsPerBlock = smem_plan::kTemporalMaxWarpsPerBlock;
constexpr int kTileCols = smem_plan::kTemporalTileCols;  // head-dim columns per tile chunk = lanes
constexpr int kTileLd = smem_plan::kTemporalTileLd;      // odd row stride of the column tiles
static_assert(kTileCols == kWarpSize, "a column tile has one column per lane");
constexpr int kReduceThreads = 256;
constexpr int64_t kMaxWorkspaceFloats = int64_t(1) << 24;

// Floats of shared memory per warp (shared_memory_plan.h, also what the backend reasons check).
__host__ __device__ __forceinline__ int forward_floats_per_warp(int T) {
  return static_cast<int>(smem_plan::temporal_fwd_floats_per_warp(T));
}
__host__ __device__ __forceinline__ int backward_floats_per_warp(int T) {
  return static_cast<int>(smem_plan::temporal_bwd_floats_per_warp(T));
}
// The most any launch requests: kMaxWarpsPerBlock warps at T = kMaxFrames (capped at the device limit).
constexpr int64_t kMaxForwardSmemBytes =
    kMaxWarpsPerBlock * smem_plan::temporal_fwd_floats_per_warp(kMaxFrames) * smem_plan::kFloatBytes;
constexpr int64_t kMaxBackwardSmemBytes =
    kMaxWarpsPerBlock * smem_plan::temporal_bwd_floats_per_warp(kMaxFrames) * smem_plan::kFloatBytes;

__device__ __forceinline__ bool is_visible(int i, int j, bool causal,
                                           const int64_t* segment_row) {  // (T,) segment ids of batch b, or nullptr
  if (i == j) return true;
  if (causal && j > i) return false;
  return segment_row == nullptr || segment_row[i] == segment_row[j];
}

// Rotary tables (file header); cos == nullptr on the launches without rotation.
struct Rotary {
  const float* cos;  // (T, rot_dim) contiguous
  const float* sin;  // (T, rot_dim) contiguous
  int rot_dim;       // even, 2..D
  bool interleaved;
};

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Half-split q/k chunks: 16 pairs per chunk.
constexpr int kHalfPairsPerChunk = kWarpSize / 2;

// Number of q/k column chunks under rotation (file header): ceil(D / 32) interleaved; half-split
// ceil(rot_dim / 32) chunks of 16 pairs, then ceil((D - rot_dim) / 32) chunks of the unrotated dims.
__device__ __forceinline__ int rotary_qk_chunks(const Rotary& rot, int D) {
  if (rot.interleaved) return ceil_div(D, kTileCols);
  return ceil_div(rot.rot_dim / 2, kHalfPairsPerChunk) + ceil_div(D - rot.rot_dim, kTileCols);
}

// The head-dim column a lane holds in q/k chunk `chunk` under rotation, and its pair.
struct RotaryColumn {
  int d;          // head dim of this lane's tile column, -1: none (the column is zero)
  int partner;    // the other member of d's pair (held by lane ^ partner_lane_mask), -1: d is not rotated
  float sign;     // x'_d = cos_d x_d + sign * sin_d x_partner: -1 for a pair's first member, +1 for its second
  bool chunk_rotated;  // some column of this chunk is rotated (uniform across the warp)
};

__device__ __forceinline__ int partner_lane_mask(const Rotary& rot) { return rot.interleaved ? 1 : kWarpSize / 2; }

__device__ __forceinline__ RotaryColumn rotary_column(const Rotary& rot, int D, int chunk, int lane) {
  const int rot_dim = rot.rot_dim;
  if (rot.interleaved) {
    const int d = chunk * kTileCols + lane;
    const bool chunk_rotated = chunk * kTileCols < rot_dim;
    if (d >= D) return {-1, -1, 0.f, chunk_rotated};
    if (d < rot_dim) return {d, d ^ 1, (d & 1) ? 1.f : -1.f, chunk_rotated};
    return {d, -1, 0.f, chunk_rotated};
  }
  const int half = rot_dim / 2, rotary_chunks = ceil_div(half, kHalfPairsPerChunk);
  if (chunk < rotary_chunks) {
    const int pair = chunk * kHalfPairsPerChunk + lane % kHalfPairsPerChunk;
    if (pair >= half) return {-1, -1, 0.f, true};
    return lane < kHalfPairsPerChunk ? RotaryColumn{pair, pair + half, -1.f, true}
                                     : RotaryColumn{pair + half, pair, 1.f, true};
  }
  const int d = rot_dim + (chunk - rotary_chunks) * kTileCols + lane;
  return {d < D ? d : -1, -1, 0.f, false};
}

// tile[i][lane] = x'[i, col.d] (rotated, file header) for the T rows of one problem, 0 where col.d == -1.
template <typename scalar_t>
__device__ __forceinline__ void load_rotated_tile(float* tile,           // [T][kTileLd]
                                                  const scalar_t* row0,  // x[b, 0, s, h, :]
                                                  int64_t frame_stride,  // element stride over t
                                                  int T, const Rotary& rot, const RotaryColumn& col, int lane) {
#pragma unroll 4
  for (int i = 0; i < T; ++i) {
    float x = 0.f;
    if (col.d >= 0) {
      const scalar_t* row = row0 + i * frame_stride;
      x = to_float(row[col.d]);
      if (col.partner >= 0) {
        const int64_t e = int64_t(i) * rot.rot_dim + col.d;
        x = rot.cos[e] * x + col.sign * rot.sin[e] * to_float(row[col.partner]);
      }
    }
    tile[i * kTileLd + lane] = x;
  }
}

// tile[i][c] = x[i, c0 + c] for the T rows of one problem, 0 where c0 + c >= D.
template <typename scalar_t>
__device__ __forceinline__ void load_tile(float* tile,                // [T][kTileLd]
                                          const scalar_t* row0,       // x[b, 0, s, h, :]
                                          int64_t frame_stride,       // element stride over t
                                          int T, int D, int c0, int lane) {
  const int d = c0 + lane;
  const bool in_range = d < D;
#pragma unroll 4
  for (int i = 0; i < T; ++i) {
    tile[i * kTileLd + lane] = in_range ? to_float(row0[i * frame_stride + d]) : 0.f;
  }
}

// acc[i][j] (= or +=) sum_c a[i][c] * b[j][c] over the 32 columns of one chunk, all T x T entries.
__device__ __forceinline__ void accumulate_abt(float* acc,      // [T][ld]
                                               int ld,
                                               const float* a,  // [T][kTileLd]
                                               const float* b,  // [T][kTileLd]
                                               int T, int lane, bool first_chunk) {
  for (int e = lane; e < T * T; e += kWarpSize) {
    const int i = e / T, j = e - i * T;
    float sum = first_chunk ? 0.f : acc[i * ld + j];
#pragma unroll
    for (int c = 0; c < kTileCols; ++c) sum += a[i * kTileLd + c] * b[j * kTileLd + c];
    acc[i * ld + j] = sum;
  }
}

// probs[i][j] = q_i . k_j (unscaled; q', k' under rotation), over the ceil(D / 32) column chunks (the rotary
// q/k chunks under rotation).
template <bool kRotary, typename scalar_t>
__device__ __forceinline__ void raw_scores(float* probs, int ld, float* tile_a, float* tile_b, const scalar_t* q_row0,
                                           int64_t q_frame_stride, const scalar_t* k_row0, int64_t k_frame_stride,
                                           int T, int D, const Rotary& rot, int lane) {
  if constexpr (kRotary) {
    const int chunks = rotary_qk_chunks(rot, D);
    for (int chunk = 0; chunk < chunks; ++chunk) {
      const RotaryColumn col = rotary_column(rot, D, chunk, lane);
      load_rotated_tile(tile_a, q_row0, q_frame_stride, T, rot, col, lane);
      load_rotated_tile(tile_b, k_row0, k_frame_stride, T, rot, col, lane);
      __syncwarp();
      accumulate_abt(probs, ld, tile_a, tile_b, T, lane, chunk == 0);
      __syncwarp();
    }
  } else {
    for (int c0 = 0; c0 < D; c0 += kTileCols) {
      load_tile(tile_a, q_row0, q_frame_stride, T, D, c0, lane);
      load_tile(tile_b, k_row0, k_frame_stride, T, D, c0, lane);
      __syncwarp();
      accumulate_abt(probs, ld, tile_a, tile_b, T, lane, c0 == 0);
      __syncwarp();
    }
  }
}

template <typename scalar_t, bool kRotary>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize)
    temporal_fwd_kernel(const scalar_t* __restrict__ q,  // (B, T, S, H, D), strides q_st
                        const scalar_t* __restrict__ k,  // (B, T, S, H, D), strides k_st
                        const scalar_t* __restrict__ v,  // (B, T, S, H, D), strides v_st
                        TokenStrides q_st, TokenStrides k_st, TokenStrides v_st,
                        const float* __restrict__ bias,           // (H, T, T) contiguous, or nullptr
                        const int64_t* __restrict__ segment_ids,  // (B, T) contiguous, or nullptr
                        bool causal, float scale, int64_t B, int T, int64_t S, int H, int D,
                        Rotary rot,                  // tables (T, rot_dim) when kRotary, else unused
                        scalar_t* __restrict__ out,  // (B, T, S, H, D) contiguous
                        float* __restrict__ lse) {   // (B, T, S, H) contiguous
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t problem = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (problem >= B * S * H) return;  // warps are independent: no block-wide synchronisation in this kernel
  const int64_t h = problem % H, bs = problem / H, s = bs % S, b = bs / S;
  const int ld = odd_stride(T);
  float* probs = smem + int64_t(warp) * forward_floats_per_warp(T);  // [T][ld]
  float* tile_a = probs + T * ld;                                    // [T][kTileLd]
  float* tile_b = tile_a + T * kTileLd;                              // [T][kTileLd]

  raw_scores<kRotary>(probs, ld, tile_a, tile_b, q + token_offset(q_st, b, 0, s, h), q_st.t,
                      k + token_offset(k_st, b, 0, s, h), k_st.t, T, D, rot, lane);

  // Softmax, one row per lane.
  const int64_t* segment_row = segment_ids == nullptr ? nullptr : segment_ids + b * T;
  for (int i = lane; i < T; i += kWarpSize) {
    float* row = probs + i * ld;
    const float* bias_row = bias == nullptr ? nullptr : bias + (h * T + i) * T;
    float row_max = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < T; ++j) {
      const float x = is_visible(i, j, causal, segment_row)
                          ? row[j] * scale + (bias_row == nullptr ? 0.f : bias_row[j])
                          : -std::numeric_limits<float>::infinity();
      row[j] = x;
      row_max = fmaxf(row_max, x);
    }
    // The diagonal is visible, so row_max is finite for finite inputs and masked entries give exp(-inf) = 0.
    float row_sum = 0.f;
    for (int j = 0; j < T; ++j) {
      const float p = expf(row[j] - row_max);
      row[j] = p;
      row_sum += p;
    }
    const float inv_sum = 1.f / row_sum;
    for (int j = 0; j < T; ++j) row[j] *= inv_sum;
    lse[row_index(b, i, s, h, T, S, H)] = row_max + logf(row_sum);
  }
  __syncwarp();

  // out[i, c0 + lane] = sum_j P[i, j] v[j, c0 + lane], chunk by chunk; causal rows stop at j = i.
  const scalar_t* v_row0 = v + token_offset(v_st, b, 0, s, h);
  for (int c0 = 0; c0 < D; c0 += kTileCols) {
    load_tile(tile_a, v_row0, v_st.t, T, D, c0, lane);
    __syncwarp();
    const int d = c0 + lane;
    for (int i = 0; i < T; ++i) {
      const int j_end = causal ? i + 1 : T;
      float acc = 0.f;
      for (int j = 0; j < j_end; ++j) acc += probs[i * ld + j] * tile_a[j * kTileLd + lane];
      if (d < D) out[row_index(b, i, s, h, T, S, H) * D + d] = from_float<scalar_t>(acc);
    }
    __syncwarp();
  }
}

template <typename scalar_t, bool kRotary>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize)
    temporal_bwd_kernel(const scalar_t* __restrict__ grad_out,  // (B, T, S, H, D), strides do_st
                        const scalar_t* __restrict__ q,         // (B, T, S, H, D), strides q_st
                        const scalar_t* __restrict__ k,         // (B, T, S, H, D), strides k_st
                        const scalar_t* __restrict__ v,         // (B, T, S, H, D), strides v_st
                        TokenStrides do_st, TokenStrides q_st, TokenStrides k_st, TokenStrides v_st,
                        const float* __restrict__ lse,            // (B, T, S, H) contiguous
                        const float* __restrict__ bias,           // (H, T, T) contiguous, or nullptr
                        const int64_t* __restrict__ segment_ids,  // (B, T) contiguous, or nullptr
                        bool causal, float scale, int64_t B, int T, int64_t S, int H, int D,
                        int64_t chunks_per_head,             // C: warps per head
                        Rotary rot,                          // tables (T, rot_dim) when kRotary, else unused
                        scalar_t* __restrict__ dq,           // (B, T, S, H, D) contiguous
                        scalar_t* __restrict__ dk,           // (B, T, S, H, D) contiguous
                        scalar_t* __restrict__ dv,           // (B, T, S, H, D) contiguous
                        float* __restrict__ dbias_partial) {  // (C, H, T, T) workspace, or nullptr: no dbias
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t global_warp = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (global_warp >= chunks_per_head * H) return;  // warps are independent: no block-wide synchronisation
  const int64_t h = global_warp % H, first_bs = global_warp / H;
  const int ld = odd_stride(T);
  float* probs = smem + int64_t(warp) * backward_floats_per_warp(T);  // [T][ld]: P, then dS
  float* dprobs = probs + T * ld;                                     // [T][ld]: dP
  float* tile_a = dprobs + T * ld;                                    // [T][kTileLd]
  float* tile_b = tile_a + T * kTileLd;                               // [T][kTileLd]
  float* dbias_slice = dbias_partial == nullptr ? nullptr : dbias_partial + global_warp * T * T;  // [T][T]
  if (dbias_slice != nullptr) {
    for (int e = lane; e < T * T; e += kWarpSize) dbias_slice[e] = 0.f;
  }

  for (int64_t bs = first_bs; bs < B * S; bs += chunks_per_head) {
    const int64_t s = bs % S, b = bs / S;
    const scalar_t* q_row0 = q + token_offset(q_st, b, 0, s, h);
    const scalar_t* k_row0 = k + token_offset(k_st, b, 0, s, h);
    raw_scores<kRotary>(probs, ld, tile_a, tile_b, q_row0, q_st.t, k_row0, k_st.t, T, D, rot, lane);

    // P from the forward's lse, one row per lane.
    const int64_t* segment_row = segment_ids == nullptr ? nullptr : segment_ids + b * T;
    for (int i = lane; i < T; i += kWarpSize) {
      float* row = probs + i * ld;
      const float* bias_row = bias == nullptr ? nullptr : bias + (h * T + i) * T;
      const float row_lse = lse[row_index(b, i, s, h, T, S, H)];
      for (int j = 0; j < T; ++j) {
        row[j] = is_visible(i, j, causal, segment_row)
                     ? expf(row[j] * scale + (bias_row == nullptr ? 0.f : bias_row[j]) - row_lse)
                     : 0.f;
      }
    }
    __syncwarp();

    // dP = dO v^T and dv = P^T dO, chunk by chunk over the head dim.
    const scalar_t* do_row0 = grad_out + token_offset(do_st, b, 0, s, h);
    const scalar_t* v_row0 = v + token_offset(v_st, b, 0, s, h);
    for (int c0 = 0; c0 < D; c0 += kTileCols) {
      load_tile(tile_a, do_row0, do_st.t, T, D, c0, lane);
      load_tile(tile_b, v_row0, v_st.t, T, D, c0, lane);
      __syncwarp();
      accumulate_abt(dprobs, ld, tile_a, tile_b, T, lane, c0 == 0);
      const int d = c0 + lane;
      for (int j = 0; j < T; ++j) {
        float acc = 0.f;
        for (int i = causal ? j : 0; i < T; ++i) acc += probs[i * ld + j] * tile_a[i * kTileLd + lane];
        if (d < D) dv[row_index(b, j, s, h, T, S, H) * D + d] = from_float<scalar_t>(acc);
      }
      __syncwarp();
    }

    // dS = P o (dP - rowsum(P o dP)), written over P.
    for (int i = lane; i < T; i += kWarpSize) {
      float* p_row = probs + i * ld;
      const float* dp_row = dprobs + i * ld;
      float row_dot = 0.f;
      for (int j = 0; j < T; ++j) row_dot += p_row[j] * dp_row[j];
      for (int j = 0; j < T; ++j) p_row[j] = p_row[j] * (dp_row[j] - row_dot);
    }
    __syncwarp();
    if (dbias_slice != nullptr) {  // this warp's slice only: no other writer
      for (int e = lane; e < T * T; e += kWarpSize) {
        const int i = e / T, j = e - i * T;
        dbias_slice[e] += probs[i * ld + j];
      }
    }

    // dq = scale * dS k and dk = scale * dS^T q, chunk by chunk (under rotation: dq', dk' from k', q', then the
    // transpose map, the partner's dq', dk' taken from its lane).
    if constexpr (kRotary) {
      const int chunks = rotary_qk_chunks(rot, D), partner_mask = partner_lane_mask(rot);
      for (int chunk = 0; chunk < chunks; ++chunk) {
        const RotaryColumn col = rotary_column(rot, D, chunk, lane);
        load_rotated_tile(tile_a, k_row0, k_st.t, T, rot, col, lane);
        load_rotated_tile(tile_b, q_row0, q_st.t, T, rot, col, lane);
        __syncwarp();
        for (int i = 0; i < T; ++i) {
          float acc_q = 0.f, acc_k = 0.f;
          for (int j = 0; j < T; ++j) {
            acc_q += probs[i * ld + j] * tile_a[j * kTileLd + lane];  // dS[i, j] k'[j, d]
            acc_k += probs[j * ld + i] * tile_b[j * kTileLd + lane];  // dS[j, i] q'[j, d]
          }
          if (col.chunk_rotated) {  // uniform over the warp: every lane takes part in the shuffles
            const float partner_q = __shfl_xor_sync(kFullWarp, acc_q, partner_mask);
            const float partner_k = __shfl_xor_sync(kFullWarp, acc_k, partner_mask);
            if (col.partner >= 0) {  // dx_d = cos_d dx'_d - sign_d sin_partner dx'_partner
              const int64_t e = int64_t(i) * rot.rot_dim;
              const float c = rot.cos[e + col.d], s_partner = col.sign * rot.sin[e + col.partner];
              acc_q = c * acc_q - s_partner * partner_q;
              acc_k = c * acc_k - s_partner * partner_k;
            }
          }
          if (col.d >= 0) {
            const int64_t out_row = row_index(b, i, s, h, T, S, H) * D + col.d;
            dq[out_row] = from_float<scalar_t>(scale * acc_q);
            dk[out_row] = from_float<scalar_t>(scale * acc_k);
          }
        }
        __syncwarp();
      }
    } else {
      for (int c0 = 0; c0 < D; c0 += kTileCols) {
        load_tile(tile_a, k_row0, k_st.t, T, D, c0, lane);
        load_tile(tile_b, q_row0, q_st.t, T, D, c0, lane);
        __syncwarp();
        const int d = c0 + lane;
        for (int i = 0; i < T; ++i) {
          float acc_q = 0.f, acc_k = 0.f;
          for (int j = 0; j < T; ++j) {
            acc_q += probs[i * ld + j] * tile_a[j * kTileLd + lane];  // dS[i, j] k[j, d]
            acc_k += probs[j * ld + i] * tile_b[j * kTileLd + lane];  // dS[j, i] q[j, d]
          }
          if (d < D) {
            const int64_t out_row = row_index(b, i, s, h, T, S, H) * D + d;
            dq[out_row] = from_float<scalar_t>(scale * acc_q);
            dk[out_row] = from_float<scalar_t>(scale * acc_k);
          }
        }
        __syncwarp();
      }
    }
  }
}

// dbias[h, e] = sum_{c < C} partial[c, h, e] in increasing c: a fixed order, so bit-identical across runs.
__global__ void __launch_bounds__(kReduceThreads)
    temporal_dbias_reduce_kernel(const float* __restrict__ partial,  // (C, H, T * T)
                                 int64_t chunks, int64_t head_elems,  // C, H * T * T
                                 float* __restrict__ dbias) {          // (H, T, T) contiguous
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= head_elems) return;
  float sum = 0.f;
  for (int64_t c = 0; c < chunks; ++c) sum += partial[c * head_elems + idx];
  dbias[idx] = sum;
}

struct TemporalArgs {
  int64_t B, S;
  int T, H, D;
};

TemporalArgs check_temporal(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& segment_ids) {
  check_like_q(op, "q", q, q);
  check_like_q(op, "k", k, q);
  check_like_q(op, "v", v, q);
  const int64_t T = q.size(1), H = q.size(3);
  TORCH_CHECK(T >= 1 && T <= kMaxFrames, op, ": the CUDA kernels support T (frames, dim 1 of q) in 1..", kMaxFrames,
              ", got ", T);
  TORCH_CHECK(H <= std::numeric_limits<int32_t>::max(), op, ": too many heads, got ", H);
  if (bias.has_value()) {
    const at::Tensor& bb = *bias;
    TORCH_CHECK(bb.dim() == 3 && bb.size(0) == H && bb.size(1) == T && bb.size(2) == T, op,
                ": bias must have shape (H, T, T) = (", H, ", ", T, ", ", T, "), got ", bb.sizes());
    TORCH_CHECK(bb.scalar_type() == at::kFloat, op, ": bias must be float32 (the accumulation dtype of ",
                q.scalar_type(), " inputs), got ", bb.scalar_type());
    TORCH_CHECK(bb.device() == q.device(), op, ": bias must be on q's device ", q.device(), ", got ", bb.device());
    TORCH_CHECK(bb.is_contiguous(), op, ": bias must be contiguous, got strides ", bb.strides());
  }
  if (segment_ids.has_value()) {
    const at::Tensor& seg = *segment_ids;
    TORCH_CHECK(seg.dim() == 2 && seg.size(0) == q.size(0) && seg.size(1) == T, op,
                ": segment_ids must have shape (B, T) = (", q.size(0), ", ", T, "), got ", seg.sizes());
    TORCH_CHECK(seg.scalar_type() == at::kLong, op, ": segment_ids must be int64, got ", seg.scalar_type());
    TORCH_CHECK(seg.device() == q.device(), op, ": segment_ids must be on q's device ", q.device(), ", got ",
                seg.device());
    TORCH_CHECK(seg.is_contiguous(), op, ": segment_ids must be contiguous, got strides ", seg.strides());
  }
  return {q.size(0), q.size(2), static_cast<int>(T), static_cast<int>(H), static_cast<int>(q.size(4))};
}

// Largest warps per block (<= kMaxWarpsPerBlock) whose shared memory fits the device; checks one warp fits.
int warps_per_block(const char* op, int64_t floats_per_warp, int T) {
  const int64_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const int64_t bytes = floats_per_warp * int64_t(sizeof(float));
  TORCH_CHECK(bytes <= limit, op, ": T = ", T, " frames need ", bytes,
              " bytes of shared memory per warp, this device allows ", limit,
              " per block (use the triton or cpp backend for this T)");
  return static_cast<int>(std::min<int64_t>(kMaxWarpsPerBlock, limit / bytes));
}

// The rotary tables of the *_rotary ops, as the other backends accept them for float32/float16/bfloat16 q (the
// accumulation dtype float32; csrc/cpu/spacetime_temporal_cpu.cpp check_rotary) and on q's device.
Rotary checked_rotary(const char* op, const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin,
                      bool interleaved) {
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == q.size(1) && cos.size(1) % 2 == 0 && cos.size(1) >= 2 &&
                  cos.size(1) <= q.size(4),
              op, ": rotary_cos must have shape (T, rot_dim) with T = ", q.size(1),
              ", rot_dim even, 2 <= rot_dim <= D = ", q.size(4), ", got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": rotary_sin must have rotary_cos's shape ", cos.sizes(), ", got ",
              sin.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"rotary_cos", &cos}, {"rotary_sin", &sin}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32 (the accumulation dtype of ",
                q.scalar_type(), " inputs), got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t->strides());
  }
  return {cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), static_cast<int>(cos.size(1)), interleaved};
}

// Forward of both temporal ops; rotary: the tables of the *_rotary op, or nullopt.
std::tuple<at::Tensor, at::Tensor> temporal_forward(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& segment_ids, bool causal,
                                                    double scale, const std::optional<Rotary>& rotary) {
  const TemporalArgs a = check_temporal(op, q, k, v, bias, segment_ids);
  const at::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  const int64_t problems = a.B * a.S * a.H;
  if (problems == 0) return {out, lse};

  const int64_t floats_per_warp = forward_floats_per_warp(a.T);
  const int warps = warps_per_block(op, floats_per_warp, a.T);
  const int64_t smem_bytes = warps * floats_per_warp * int64_t(sizeof(float));
  const unsigned blocks = checked_grid(op, (problems + warps - 1) / warps);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Rotary rot = rotary.value_or(Rotary{nullptr, nullptr, 0, false});
  TORCHNOVA_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "temporal_attention_fwd_cuda", [&] {
    auto kernel = rotary.has_value() ? temporal_fwd_kernel<scalar_t, true> : temporal_fwd_kernel<scalar_t, false>;
    cuda_smem::prepare_launch(op, kernel, smem_bytes, kMaxForwardSmemBytes, "the temporal forward kernel");
    TORCHNOVA_LAUNCH_KERNEL(blocks, warps * kWarpSize, smem_bytes, stream, kernel)(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), token_strides(q),
        token_strides(k), token_strides(v), bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
        segment_ids.has_value() ? segment_ids->const_data_ptr<int64_t>() : nullptr, causal,
        static_cast<float>(scale), a.B, a.T, a.S, a.H, a.D, rot, out.mutable_data_ptr<scalar_t>(),
        lse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v,
                                                               const std::optional<at::Tensor>& bias,
                                                               const std::optional<at::Tensor>& segment_ids,
                                                               bool causal, double scale) {
  return temporal_forward("temporal_attention_fwd", q, k, v, bias, segment_ids, causal, scale, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_rotary_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& segment_ids, bool causal, double scale, const at::Tensor& rotary_cos,
    const at::Tensor& rotary_sin, bool rotary_interleaved) {
  constexpr const char* op = "temporal_attention_rotary_fwd";
  check_like_q(op, "q", q, q);
  const Rotary rot = checked_rotary(op, q, rotary_cos, rotary_sin, rotary_interleaved);
  return temporal_forward(op, q, k, v, bias, segment_ids, causal, scale, rot);
}

// Backward of both temporal ops; rotary: the tables of the *_rotary op, or nullopt.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> temporal_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& segment_ids, bool causal, double scale, bool needs_bias_grad,
    bool deterministic, const std::optional<Rotary>& rotary) {
  // dbias is always reduced in a fixed order, so `deterministic` needs no separate path (see the file header).
  (void)deterministic;
  const TemporalArgs a = check_temporal(op, q, k, v, bias, segment_ids);
  const at::Tensor grad_out_u = with_unit_head_stride(op, "grad_out", grad_out, q);
  // `out` is not read (rowsum(dO o out) is recomputed as rowsum(P o dP)) but must still match the schema.
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(), op,
              ": out must have q's shape ", q.sizes(), ", dtype ", q.scalar_type(), " and device ", q.device(),
              ", got ", out.sizes(), ", ", out.scalar_type(), ", ", out.device());
  const at::Tensor lse_c = checked_lse(op, lse, q);
  const at::cuda::CUDAGuard guard(q.device());
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous), dk = at::empty(q.sizes(), contiguous),
             dv = at::empty(q.sizes(), contiguous);
  const auto acc_options = q.options().dtype(at::kFloat);
  at::Tensor dbias = needs_bias_grad ? at::zeros({a.H, a.T, a.T}, acc_options) : at::empty({0}, acc_options);
  const int64_t pairs = a.B * a.S;  // (b, s) problems per head
  if (pairs * a.H == 0) return {dq, dk, dv, dbias};

  const int64_t floats_per_warp = backward_floats_per_warp(a.T);
  const int warps = warps_per_block(op, floats_per_warp, a.T);
  const int64_t smem_bytes = warps * floats_per_warp * int64_t(sizeof(float));
  // About 32 warps per SM in total (enough to hide latency at the occupancy the shared memory allows) and at
  // most one warp per (b, s) pair; every head gets the same number C of warps.
  const int64_t target_warps = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  // With dbias, the (C, H, T, T) fp32 workspace is capped at 2^24 floats (64 MiB; large T has few resident warps).
  int64_t chunks_per_head = std::min<int64_t>(pairs, (target_warps + a.H - 1) / a.H);
  if (needs_bias_grad) {
    chunks_per_head = std::min<int64_t>(chunks_per_head, kMaxWorkspaceFloats / (int64_t(a.H) * a.T * a.T));
  }
  chunks_per_head = std::max<int64_t>(1, chunks_per_head);
  const int64_t total_warps = chunks_per_head * a.H;
  const unsigned blocks = checked_grid(op, (total_warps + warps - 1) / warps);
  at::Tensor partial = needs_bias_grad ? at::empty({chunks_per_head, a.H, a.T, a.T}, acc_options) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Rotary rot = rotary.value_or(Rotary{nullptr, nullptr, 0, false});
  TORCHNOVA_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "temporal_attention_bwd_cuda", [&] {
    auto kernel = rotary.has_value() ? temporal_bwd_kernel<scalar_t, true> : temporal_bwd_kernel<scalar_t, false>;
    cuda_smem::prepare_launch(op, kernel, smem_bytes, kMaxBackwardSmemBytes, "the temporal backward kernel");
    TORCHNOVA_LAUNCH_KERNEL(blocks, warps * kWarpSize, smem_bytes, stream, kernel)(
        grad_out_u.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        v.const_data_ptr<scalar_t>(), token_strides(grad_out_u), token_strides(q), token_strides(k), token_strides(v),
        lse_c.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
        segment_ids.has_value() ? segment_ids->const_data_ptr<int64_t>() : nullptr, causal,
        static_cast<float>(scale), a.B, a.T, a.S, a.H, a.D, chunks_per_head, rot, dq.mutable_data_ptr<scalar_t>(),
        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
        needs_bias_grad ? partial.mutable_data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (needs_bias_grad) {
    const int64_t head_elems = int64_t(a.H) * a.T * a.T;
    TORCHNOVA_LAUNCH_KERNEL(checked_grid(op, (head_elems + kReduceThreads - 1) / kReduceThreads), kReduceThreads, 0,
                            stream, temporal_dbias_reduce_kernel)(partial.const_data_ptr<float>(), chunks_per_head,
                                                                head_elems, dbias.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dq, dk, dv, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> temporal_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& segment_ids,
    bool causal, double scale, bool needs_bias_grad, bool deterministic) {
  return temporal_backward("temporal_attention_bwd", grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale,
                           needs_bias_grad, deterministic, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> temporal_attention_rotary_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& segment_ids,
    bool causal, double scale, const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, bool rotary_interleaved,
    bool needs_bias_grad, bool deterministic) {
  constexpr const char* op = "temporal_attention_rotary_bwd";
  check_like_q(op, "q", q, q);
  const Rotary rot = checked_rotary(op, q, rotary_cos, rotary_sin, rotary_interleaved);
  return temporal_backward(op, grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, needs_bias_grad,
                           deterministic, rot);
}

}  // namespace

// The qkv-packed ops (plain and rotary) run these on views of qkv (csrc/spacetime_ops.cpp).
TORCH_LIBRARY_IMPL(torchnova, CUDA, m) {
  m.impl("temporal_attention_fwd", &temporal_attention_fwd_cuda);
  m.impl("temporal_attention_bwd", &temporal_attention_bwd_cuda);
  m.impl("temporal_attention_rotary_fwd", &temporal_attention_rotary_fwd_cuda);
  m.impl("temporal_attention_rotary_bwd", &temporal_attention_rotary_bwd_cuda);
}

}  // namespace torchnova
