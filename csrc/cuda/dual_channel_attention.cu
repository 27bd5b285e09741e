// CogVideo dual-channel attention (DESIGN.md section 2), CUDA kernels.
//
// Math, per batch b and head h, over the L = text_len + frames * grid_h * grid_w tokens (text first, frames in
// (frame, row, col) raster order), scale s = 1 / sqrt(D), visible(i, j) = key_visible of
// csrc/dual_channel_visibility.h (the rule of pyext/torchnova/dual_channel/masks.py) and not (j < text_len and
// text_pad_mask[b, j] is false):
//   S_ij = s * q_i . k_j  for visible pairs, -inf otherwise
//   lse_i = log sum_j exp(S_ij),   P_ij = exp(S_ij - lse_i),   out_i = sum_j P_ij v_j
// A row with no visible key gets out_i = 0 and lse_i = +inf, so P_ij = exp(S_ij - inf) = 0 in the backward.
// Backward, with dO = grad_out and delta_i = sum_d dO_id O_id:
//   dV_j = sum_i P_ij dO_i,   dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - delta_i)
//   dQ_i = s * sum_j dS_ij k_j,   dK_j = s * sum_i dS_ij q_i
//
// Shapes: q, k, v (B, L, H, D), any strides with stride(-1) == 1, float32 / float16 / bfloat16, 1 <= D <= 256;
// out, dq, dk, dv (B, L, H, D) q.dtype contiguous; lse (B, L, H) float32 contiguous; text_pad_mask (B, text_len)
// bool contiguous or absent. Accumulation is float32 throughout.
//
// Tiling (flash-attention-2 style, SIMT): a head-dim bucket kHeadDimMax in {64, 128, 256} (the smallest >= D)
// fixes the tile of kBlock = 4096 / kHeadDimMax tokens (64, 32, 16) and kThreads = 4 * kBlock threads. A thread
// owns one token of its block's tile (tid / 4) and a quarter of the other tile's tokens (tid % 4 + 4 j) for the
// score tile, and the head-dim slice d = tid % 4 + 4 i of its token's accumulator. Tiles live in shared memory as
// float32 rows of kHeadDimMax + 1 floats (odd stride: the strided-by-row reads of a warp hit distinct banks).
// Tile pairs that hold no visible pair are skipped (block_may_see of the visibility header, uniform over a
// block), so the cost follows the visible pairs: a program runs through the ceil(L / kBlock) candidate tiles with
// one cheap test each and computes only those that may hold a visible pair, masking per element there. No atomics:
// each output element is written by exactly one thread, so results are bitwise deterministic.
//   forward: one block per (b, h, query tile), streaming the key tiles with an online softmax.
//   backward: delta kernel (one warp per (b, l, h) row); dK/dV kernel, one block per (b, h, key tile) looping over
//   the query tiles that can see it; dQ kernel, one block per (b, h, query tile) looping over key tiles.
// Blocks go in grid.x only ((b * H + h) * tiles + tile), so B * H may exceed 65,535.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "attention_tc_bwd.h"
#include "attention_tc_fwd.h"
#include "dual_channel_visibility.cuh"
#include "dynamic_smem.cuh"
#include "shared_memory_plan.h"
#include "spacetime_common.cuh"

namespace torchnova {
namespace {

namespace vis = ::torchnova::dual_channel;
using Layout = vis::Layout;
using dual_channel_cuda::AttentionShape;
using dual_channel_cuda::pair_visible;
using dual_channel_cuda::tiles_interact;

constexpr int kMaxHeadDim = 256;
constexpr int kPacketBytes = 16;
constexpr int kWarpSize = 32;
constexpr int kDeltaThreads = 256;  // 8 rows (one per warp) per block of the delta kernel

template <int kHeadDimMax>
struct Tiling {
  static constexpr int kBlock = 4096 / kHeadDimMax;      // tokens per tile
  static constexpr int kThreads = 4 * kBlock;            // 4 threads per token of the block's own tile
  static constexpr int kStride = kHeadDimMax + 1;        // floats per token row in shared memory
  static constexpr int kTileFloats = kBlock * kStride;   // one (kBlock, kHeadDimMax) tile
  static constexpr int kScoreStride = kBlock + 1;        // floats per row of a (kBlock, kBlock) score tile
  static constexpr int kScoreFloats = kBlock * kScoreStride;
  static constexpr int kSlices = kHeadDimMax / 4;        // accumulator registers per thread
  static constexpr int kScoresPerThread = kBlock / 4;
  // Forward: q, k, v tiles + P. Backward (both kernels): four token tiles + one score tile + lse, delta.
  static constexpr size_t kFwdSmemBytes = sizeof(float) * (3 * kTileFloats + kScoreFloats);
  static constexpr size_t kBwdSmemBytes = sizeof(float) * (4 * kTileFloats + kScoreFloats + 2 * kBlock);
  // The backend reasons read these sizes from shared_memory_plan.h.
  static_assert(kFwdSmemBytes == smem_plan::dual_fwd_bytes_of_bucket(kHeadDimMax) &&
                    kBwdSmemBytes == smem_plan::dual_bwd_bytes_of_bucket(kHeadDimMax),
                "shared_memory_plan.h must match the dual-channel tiling");
};


// Strides of B, L and H of one (B, L, H, D) tensor (the stride of D is 1).
struct TokenStrides {
  int64_t batch, seq, head;
};

// Where one head of one batch element lives: element (l, d) of (b, h) is at base[l * row_stride + d].
template <typename scalar_t>
struct HeadView {
  const scalar_t* base;
  int64_t row_stride;  // stride of L
};

template <typename scalar_t>
__device__ __forceinline__ HeadView<scalar_t> head_view(const scalar_t* ptr, TokenStrides strides, int64_t b,
                                                        int64_t h) {
  return {ptr + b * strides.batch + h * strides.head, strides.seq};
}

// Loads tokens [first, first + kBlock) of a head into a float tile (rows of kStride floats); tokens >= seq_len
// read as zeros so that masked (zero-probability) products with them stay 0 instead of 0 * garbage = NaN.
// Columns d >= head_dim are left untouched: only the per-d accumulators of unused d ever read them.
// vectorized: the caller checked that head_dim, the strides and the base are multiples of a 16-byte packet.
template <typename scalar_t, int kHeadDimMax>
__device__ __forceinline__ void load_tile(float* __restrict__ tile,  // (kBlock, kStride) shared
                                          HeadView<scalar_t> view, int64_t first, int64_t seq_len, int head_dim,
                                          bool vectorized) {
  using T = Tiling<kHeadDimMax>;
  constexpr int kVec = kPacketBytes / int(sizeof(scalar_t));
  if (vectorized) {
    struct alignas(kPacketBytes) Packet {
      scalar_t v[kVec];
    };
    const int packets_per_row = head_dim / kVec;
    for (int index = threadIdx.x; index < T::kBlock * packets_per_row; index += T::kThreads) {
      const int row = index / packets_per_row, d = (index % packets_per_row) * kVec;
      float* dst = tile + row * T::kStride + d;
      if (first + row < seq_len) {
        const Packet packet = *reinterpret_cast<const Packet*>(view.base + (first + row) * view.row_stride + d);
#pragma unroll
        for (int i = 0; i < kVec; ++i) dst[i] = static_cast<float>(packet.v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) dst[i] = 0.f;
      }
    }
  } else {
    for (int index = threadIdx.x; index < T::kBlock * head_dim; index += T::kThreads) {
      const int row = index / head_dim, d = index % head_dim;
      tile[row * T::kStride + d] =
          first + row < seq_len ? static_cast<float>(view.base[(first + row) * view.row_stride + d]) : 0.f;
    }
  }
}

// Stores rows [first, first + kBlock) ∩ [0, seq_len) of a float tile to a contiguous (B, L, H, D) output of
// head (b, h): row l at out + ((b * L + l) * H + h) * D. Consecutive threads write consecutive d (coalesced).
template <typename scalar_t, int kHeadDimMax>
__device__ __forceinline__ void store_tile(scalar_t* __restrict__ out,       // (B, L, H, D) contiguous
                                           const float* __restrict__ tile,  // (kBlock, kStride) shared
                                           int64_t b, int64_t h, int64_t first, const AttentionShape& shape) {
  using T = Tiling<kHeadDimMax>;
  const int head_dim = shape.head_dim;
  for (int index = threadIdx.x; index < T::kBlock * head_dim; index += T::kThreads) {
    const int row = index / head_dim, d = index % head_dim;
    if (first + row < shape.seq_len) {
      out[((b * shape.seq_len + first + row) * shape.heads + h) * head_dim + d] =
          static_cast<scalar_t>(tile[row * T::kStride + d]);
    }
  }
}

// Sum and max over the 4 lanes (tid % 4) that share a token (spacetime_common.cuh).
using spacetime_cuda::quad_max;
using spacetime_cuda::quad_sum;

// scores[j] = own_row . other_tile[tid % 4 + 4 j] over d < head_dim.
template <int kHeadDimMax>
__device__ __forceinline__ void row_dots(float (&scores)[Tiling<kHeadDimMax>::kScoresPerThread],
                                         const float* __restrict__ own_row,     // (kStride,) shared
                                         const float* __restrict__ other_tile,  // (kBlock, kStride) shared
                                         int quad, int head_dim) {
  using T = Tiling<kHeadDimMax>;
#pragma unroll
  for (int j = 0; j < T::kScoresPerThread; ++j) scores[j] = 0.f;
#pragma unroll 4
  for (int d = 0; d < head_dim; ++d) {
    const float x = own_row[d];
#pragma unroll
    for (int j = 0; j < T::kScoresPerThread; ++j) scores[j] += x * other_tile[(quad + 4 * j) * T::kStride + d];
  }
}

// acc[i] += sum_c weights[c] * tile[c][quad + 4 i]: weights is the thread's row of a score tile.
template <int kHeadDimMax>
__device__ __forceinline__ void accumulate_rows(float (&acc)[Tiling<kHeadDimMax>::kSlices],
                                                const float* __restrict__ weights,  // (kBlock,) shared, stride 1
                                                const float* __restrict__ tile,     // (kBlock, kStride) shared
                                                int quad) {
  using T = Tiling<kHeadDimMax>;
#pragma unroll 2
  for (int c = 0; c < T::kBlock; ++c) {
    const float w = weights[c];
#pragma unroll
    for (int i = 0; i < T::kSlices; ++i) acc[i] += w * tile[c * T::kStride + quad + 4 * i];
  }
}

// Same, with the weights in a column of a score tile: weights[c * kScoreStride].
template <int kHeadDimMax>
__device__ __forceinline__ void accumulate_columns(float (&acc)[Tiling<kHeadDimMax>::kSlices],
                                                   const float* __restrict__ weights,  // shared, stride kScoreStride
                                                   const float* __restrict__ tile,     // (kBlock, kStride) shared
                                                   int quad) {
  using T = Tiling<kHeadDimMax>;
#pragma unroll 2
  for (int r = 0; r < T::kBlock; ++r) {
    const float w = weights[r * T::kScoreStride];
#pragma unroll
    for (int i = 0; i < T::kSlices; ++i) acc[i] += w * tile[r * T::kStride + quad + 4 * i];
  }
}



// Decodes blockIdx.x = (b * H + h) * tiles + tile, the tile index reversed so that the late (most visible keys
// under causal rules) tiles start first.
struct BlockCoords {
  int64_t b, h, tile;
};
__device__ __forceinline__ BlockCoords block_coords(const AttentionShape& shape) {
  const int64_t index = blockIdx.x;
  const int64_t head_index = index / shape.tiles;
  return {head_index / shape.heads, head_index % shape.heads, shape.tiles - 1 - index % shape.tiles};
}

template <typename scalar_t, int kHeadDimMax>
__global__ void __launch_bounds__(Tiling<kHeadDimMax>::kThreads)
    cogvideo_attention_fwd_kernel(const scalar_t* __restrict__ q,  // (B, L, H, D), strides (q_strides, 1)
                                  const scalar_t* __restrict__ k,  // (B, L, H, D), strides (k_strides, 1)
                                  const scalar_t* __restrict__ v,  // (B, L, H, D), strides (v_strides, 1)
                                  TokenStrides q_strides, TokenStrides k_strides, TokenStrides v_strides,
                                  bool vectorized,
                                  const bool* __restrict__ text_pad_mask,  // (B, text_len) contiguous or nullptr
                                  Layout layout, AttentionShape shape,
                                  scalar_t* __restrict__ out,  // (B, L, H, D) contiguous
                                  float* __restrict__ lse) {   // (B, L, H) contiguous
  using T = Tiling<kHeadDimMax>;
  extern __shared__ float smem[];
  float* q_tile = smem;
  float* k_tile = q_tile + T::kTileFloats;
  float* v_tile = k_tile + T::kTileFloats;
  float* p_tile = v_tile + T::kTileFloats;  // (kBlock, kScoreStride): P of (own query, key)

  const BlockCoords coords = block_coords(shape);
  const int row = threadIdx.x / 4, quad = threadIdx.x % 4;
  const int64_t q_first = coords.tile * T::kBlock, query = q_first + row;
  load_tile<scalar_t, kHeadDimMax>(q_tile, head_view(q, q_strides, coords.b, coords.h), q_first, shape.seq_len,
                                   shape.head_dim, vectorized);
  const HeadView<scalar_t> k_view = head_view(k, k_strides, coords.b, coords.h);
  const HeadView<scalar_t> v_view = head_view(v, v_strides, coords.b, coords.h);

  float row_max = -INFINITY, row_sum = 0.f, acc[T::kSlices];
#pragma unroll
  for (int i = 0; i < T::kSlices; ++i) acc[i] = 0.f;

  for (int64_t k_first = 0; k_first < shape.seq_len; k_first += T::kBlock) {
    if (!tiles_interact(layout, q_first, T::kBlock, k_first, T::kBlock, shape.seq_len)) continue;
    __syncthreads();  // the previous iteration is done with k_tile, v_tile, p_tile (and q_tile is loaded)
    load_tile<scalar_t, kHeadDimMax>(k_tile, k_view, k_first, shape.seq_len, shape.head_dim, vectorized);
    load_tile<scalar_t, kHeadDimMax>(v_tile, v_view, k_first, shape.seq_len, shape.head_dim, vectorized);
    __syncthreads();

    float scores[T::kScoresPerThread];
    row_dots<kHeadDimMax>(scores, q_tile + row * T::kStride, k_tile, quad, shape.head_dim);
    bool visible[T::kScoresPerThread];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < T::kScoresPerThread; ++j) {
      visible[j] = pair_visible(layout, text_pad_mask, coords.b, query, k_first + quad + 4 * j, shape);
      scores[j] *= shape.scale;
      if (visible[j]) tile_max = fmaxf(tile_max, scores[j]);
    }
    const float new_max = fmaxf(row_max, quad_max(tile_max));
    // -inf means "no visible key yet": shift by 0 then, so exp(-inf - shift) = 0 instead of NaN.
    const float shift = new_max == -INFINITY ? 0.f : new_max;
    const float carry = __expf(row_max - shift);
    float tile_sum = 0.f;
#pragma unroll
    for (int j = 0; j < T::kScoresPerThread; ++j) {
      const float p = visible[j] ? __expf(scores[j] - shift) : 0.f;
      tile_sum += p;
      p_tile[row * T::kScoreStride + quad + 4 * j] = p;
    }
    row_sum = row_sum * carry + quad_sum(tile_sum);
    row_max = new_max;
#pragma unroll
    for (int i = 0; i < T::kSlices; ++i) acc[i] *= carry;
    __syncwarp();  // row `row` of p_tile is written and read only by its 4 lanes, all in this warp
    accumulate_rows<kHeadDimMax>(acc, p_tile + row * T::kScoreStride, v_tile, quad);
  }

  // Normalize into q_tile (no longer needed) and store coalesced; empty rows: out = 0, lse = +inf.
  const float inv_sum = row_sum > 0.f ? 1.f / row_sum : 0.f;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < T::kSlices; ++i) {
    if (quad + 4 * i < shape.head_dim) q_tile[row * T::kStride + quad + 4 * i] = acc[i] * inv_sum;
  }
  if (quad == 0 && query < shape.seq_len) {
    lse[(coords.b * shape.seq_len + query) * shape.heads + coords.h] =
        row_sum > 0.f ? row_max + ::logf(row_sum) : INFINITY;
  }
  __syncthreads();
  store_tile<scalar_t, kHeadDimMax>(out, q_tile, coords.b, coords.h, q_first, shape);
}

// delta[row] = sum_d grad_out[row, d] * out[row, d] in float32, row = (b * L + l) * H + h; one warp per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kDeltaThreads)
    cogvideo_attention_delta_kernel(const scalar_t* __restrict__ grad_out,  // (B, L, H, D), strides go_strides, 1
                                    const scalar_t* __restrict__ out,       // (B, L, H, D) contiguous
                                    TokenStrides go_strides,
                                    AttentionShape shape,
                                    float* __restrict__ delta) {            // (B, L, H) contiguous
  const int64_t row = int64_t(blockIdx.x) * (kDeltaThreads / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t rows = shape.batch * shape.seq_len * shape.heads;
  if (row >= rows) return;  // whole warps leave together: no shuffle partner is missing
  const int64_t h = row % shape.heads, l = (row / shape.heads) % shape.seq_len,
                b = row / (shape.heads * shape.seq_len);
  const scalar_t* go = grad_out + b * go_strides.batch + l * go_strides.seq + h * go_strides.head;
  const scalar_t* o = out + row * shape.head_dim;
  float sum = 0.f;
  for (int d = lane; d < shape.head_dim; d += kWarpSize) sum += static_cast<float>(go[d]) * static_cast<float>(o[d]);
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) delta[row] = sum;
}

// Loads lse and delta of tokens [first, first + kBlock) of head (b, h); tokens >= L get lse = +inf (P = 0).
template <int kHeadDimMax>
__device__ __forceinline__ void load_row_stats(float* __restrict__ lse_tile, float* __restrict__ delta_tile,
                                               const float* __restrict__ lse,    // (B, L, H) contiguous
                                               const float* __restrict__ delta,  // (B, L, H) contiguous
                                               int64_t b, int64_t h, int64_t first, const AttentionShape& shape) {
  using T = Tiling<kHeadDimMax>;
  for (int r = threadIdx.x; r < T::kBlock; r += T::kThreads) {
    const int64_t token = first + r;
    const bool valid = token < shape.seq_len;
    const int64_t index = (b * shape.seq_len + token) * shape.heads + h;
    lse_tile[r] = valid ? lse[index] : INFINITY;
    delta_tile[r] = valid ? delta[index] : 0.f;
  }
}

template <typename scalar_t, int kHeadDimMax>
__global__ void __launch_bounds__(Tiling<kHeadDimMax>::kThreads)
    cogvideo_attention_bwd_dkdv_kernel(const scalar_t* __restrict__ grad_out,  // (B, L, H, D), (go_strides, 1)
                                       const scalar_t* __restrict__ q,  // (B, L, H, D), strides (q_strides, 1)
                                       const scalar_t* __restrict__ k,  // (B, L, H, D), strides (k_strides, 1)
                                       const scalar_t* __restrict__ v,  // (B, L, H, D), strides (v_strides, 1)
                                       TokenStrides go_strides, TokenStrides q_strides, TokenStrides k_strides,
                                       TokenStrides v_strides, bool vectorized,
                                       const float* __restrict__ lse,    // (B, L, H) contiguous
                                       const float* __restrict__ delta,  // (B, L, H) contiguous
                                       const bool* __restrict__ text_pad_mask,  // (B, text_len) or nullptr
                                       Layout layout, AttentionShape shape,
                                       scalar_t* __restrict__ dk,   // (B, L, H, D) contiguous
                                       scalar_t* __restrict__ dv) {  // (B, L, H, D) contiguous
  using T = Tiling<kHeadDimMax>;
  extern __shared__ float smem[];
  float* k_tile = smem;
  float* v_tile = k_tile + T::kTileFloats;
  float* q_tile = v_tile + T::kTileFloats;
  float* do_tile = q_tile + T::kTileFloats;
  float* s_tile = do_tile + T::kTileFloats;  // (kBlock query, kScoreStride): P, then dS, of (query, own key)
  float* lse_tile = s_tile + T::kScoreFloats;
  float* delta_tile = lse_tile + T::kBlock;

  const BlockCoords coords = block_coords(shape);
  const int own = threadIdx.x / 4, quad = threadIdx.x % 4;  // own: the thread's key in this block's tile
  const int64_t k_first = coords.tile * T::kBlock, key = k_first + own;
  load_tile<scalar_t, kHeadDimMax>(k_tile, head_view(k, k_strides, coords.b, coords.h),
                                   k_first, shape.seq_len, shape.head_dim, vectorized);
  load_tile<scalar_t, kHeadDimMax>(v_tile, head_view(v, v_strides, coords.b, coords.h),
                                   k_first, shape.seq_len, shape.head_dim, vectorized);
  const HeadView<scalar_t> q_view = head_view(q, q_strides, coords.b, coords.h);
  const HeadView<scalar_t> go_view = head_view(grad_out, go_strides, coords.b, coords.h);

  float dk_acc[T::kSlices], dv_acc[T::kSlices];
#pragma unroll
  for (int i = 0; i < T::kSlices; ++i) dk_acc[i] = dv_acc[i] = 0.f;

  for (int64_t q_first = 0; q_first < shape.seq_len; q_first += T::kBlock) {
    if (!tiles_interact(layout, q_first, T::kBlock, k_first, T::kBlock, shape.seq_len)) continue;
    __syncthreads();  // the previous iteration is done with q_tile, do_tile, s_tile
    load_tile<scalar_t, kHeadDimMax>(q_tile, q_view, q_first, shape.seq_len, shape.head_dim, vectorized);
    load_tile<scalar_t, kHeadDimMax>(do_tile, go_view, q_first, shape.seq_len, shape.head_dim, vectorized);
    load_row_stats<kHeadDimMax>(lse_tile, delta_tile, lse, delta, coords.b, coords.h, q_first, shape);
    __syncthreads();

    // Thread (own key, quad) handles queries quad + 4 j: S, P, dP, dS for those pairs.
    float probs[T::kScoresPerThread], dprobs[T::kScoresPerThread];
    row_dots<kHeadDimMax>(probs, k_tile + own * T::kStride, q_tile, quad, shape.head_dim);
    row_dots<kHeadDimMax>(dprobs, v_tile + own * T::kStride, do_tile, quad, shape.head_dim);
#pragma unroll
    for (int j = 0; j < T::kScoresPerThread; ++j) {
      const int r = quad + 4 * j;
      const bool visible = pair_visible(layout, text_pad_mask, coords.b, q_first + r, key, shape);
      probs[j] = visible ? __expf(probs[j] * shape.scale - lse_tile[r]) : 0.f;
      s_tile[r * T::kScoreStride + own] = probs[j];
    }
    // Column `own` of s_tile is written and read only by the 4 lanes of key `own`, all in one warp.
    __syncwarp();
    accumulate_columns<kHeadDimMax>(dv_acc, s_tile + own, do_tile, quad);
    __syncwarp();  // P is read before it is overwritten with dS
#pragma unroll
    for (int j = 0; j < T::kScoresPerThread; ++j) {
      const int r = quad + 4 * j;
      s_tile[r * T::kScoreStride + own] = probs[j] * (dprobs[j] - delta_tile[r]);
    }
    __syncwarp();
    accumulate_columns<kHeadDimMax>(dk_acc, s_tile + own, q_tile, quad);
  }

  // Stage through k_tile / v_tile (no longer needed) for coalesced stores.
  __syncthreads();
#pragma unroll
  for (int i = 0; i < T::kSlices; ++i) {
    if (quad + 4 * i < shape.head_dim) {
      k_tile[own * T::kStride + quad + 4 * i] = dk_acc[i] * shape.scale;
      v_tile[own * T::kStride + quad + 4 * i] = dv_acc[i];
    }
  }
  __syncthreads();
  store_tile<scalar_t, kHeadDimMax>(dk, k_tile, coords.b, coords.h, k_first, shape);
  store_tile<scalar_t, kHeadDimMax>(dv, v_tile, coords.b, coords.h, k_first, shape);
}

template <typename scalar_t, int kHeadDimMax>
__global__ void __launch_bounds__(Tiling<kHeadDimMax>::kThreads)
    cogvideo_attention_bwd_dq_kernel(const scalar_t* __restrict__ grad_out,  // (B, L, H, D), (go_strides, 1)
                                     const scalar_t* __restrict__ q,  // (B, L, H, D), strides (q_strides, 1)
                                     const scalar_t* __restrict__ k,  // (B, L, H, D), strides (k_strides, 1)
                                     const scalar_t* __restrict__ v,  // (B, L, H, D), strides (v_strides, 1)
                                     TokenStrides go_strides, TokenStrides q_strides, TokenStrides k_strides,
                                     TokenStrides v_strides, bool vectorized,
                                     const float* __restrict__ lse,    // (B, L, H) contiguous
                                     const float* __restrict__ delta,  // (B, L, H) contiguous
                                     const bool* __restrict__ text_pad_mask,  // (B, text_len) or nullptr
                                     Layout layout, AttentionShape shape,
                                     scalar_t* __restrict__ dq) {  // (B, L, H, D) contiguous
  using T = Tiling<kHeadDimMax>;
  extern __shared__ float smem[];
  float* q_tile = smem;
  float* do_tile = q_tile + T::kTileFloats;
  float* k_tile = do_tile + T::kTileFloats;
  float* v_tile = k_tile + T::kTileFloats;
  float* s_tile = v_tile + T::kTileFloats;  // (kBlock own query, kScoreStride): dS of (query, key)
  float* lse_tile = s_tile + T::kScoreFloats;
  float* delta_tile = lse_tile + T::kBlock;

  const BlockCoords coords = block_coords(shape);
  const int row = threadIdx.x / 4, quad = threadIdx.x % 4;
  const int64_t q_first = coords.tile * T::kBlock, query = q_first + row;
  load_tile<scalar_t, kHeadDimMax>(q_tile, head_view(q, q_strides, coords.b, coords.h),
                                   q_first, shape.seq_len, shape.head_dim, vectorized);
  load_tile<scalar_t, kHeadDimMax>(do_tile, head_view(grad_out, go_strides, coords.b, coords.h), q_first,
                                   shape.seq_len, shape.head_dim, vectorized);
  load_row_stats<kHeadDimMax>(lse_tile, delta_tile, lse, delta, coords.b, coords.h, q_first, shape);
  const HeadView<scalar_t> k_view = head_view(k, k_strides, coords.b, coords.h);
  const HeadView<scalar_t> v_view = head_view(v, v_strides, coords.b, coords.h);

  float dq_acc[T::kSlices];
#pragma unroll
  for (int i = 0; i < T::kSlices; ++i) dq_acc[i] = 0.f;

  for (int64_t k_first = 0; k_first < shape.seq_len; k_first += T::kBlock) {
    if (!tiles_interact(layout, q_first, T::kBlock, k_first, T::kBlock, shape.seq_len)) continue;
    __syncthreads();  // the previous iteration is done with k_tile, v_tile, s_tile (and the own tiles are loaded)
    load_tile<scalar_t, kHeadDimMax>(k_tile, k_view, k_first, shape.seq_len, shape.head_dim, vectorized);
    load_tile<scalar_t, kHeadDimMax>(v_tile, v_view, k_first, shape.seq_len, shape.head_dim, vectorized);
    __syncthreads();

    float scores[T::kScoresPerThread], dprobs[T::kScoresPerThread];
    row_dots<kHeadDimMax>(scores, q_tile + row * T::kStride, k_tile, quad, shape.head_dim);
    row_dots<kHeadDimMax>(dprobs, do_tile + row * T::kStride, v_tile, quad, shape.head_dim);
    const float row_lse = lse_tile[row], row_delta = delta_tile[row];
#pragma unroll
    for (int j = 0; j < T::kScoresPerThread; ++j) {
      const int c = quad + 4 * j;
      const bool visible = pair_visible(layout, text_pad_mask, coords.b, query, k_first + c, shape);
      const float p = visible ? __expf(scores[j] * shape.scale - row_lse) : 0.f;
      s_tile[row * T::kScoreStride + c] = p * (dprobs[j] - row_delta);
    }
    __syncwarp();  // row `row` of s_tile is written and read only by its 4 lanes, all in this warp
    accumulate_rows<kHeadDimMax>(dq_acc, s_tile + row * T::kScoreStride, k_tile, quad);
  }

  __syncthreads();
#pragma unroll
  for (int i = 0; i < T::kSlices; ++i) {
    if (quad + 4 * i < shape.head_dim) q_tile[row * T::kStride + quad + 4 * i] = dq_acc[i] * shape.scale;
  }
  __syncthreads();
  store_tile<scalar_t, kHeadDimMax>(dq, q_tile, coords.b, coords.h, q_first, shape);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

struct AttentionArgs {
  Layout layout;
  AttentionShape shape;
};

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, L, H, D), got ", q.dim(), "-D with shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), op, ": v must have q's shape ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16 on CUDA, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k dtype must equal q dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), op, ": v dtype must equal q dtype ", q.scalar_type(), ", got ",
              v.scalar_type());
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on q's device ", q.device(), ", got ", k.device());
  TORCH_CHECK(v.device() == q.device(), op, ": v must be on q's device ", q.device(), ", got ", v.device());
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": head dim D must be in [1, ", kMaxHeadDim,
              "], got ", q.size(3));
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    // (an empty tensor, e.g. B = 0, has no element to read: its strides do not matter)
    TORCH_CHECK(x->stride(3) == 1 || x->size(3) == 1 || x->numel() == 0, op, ": ", name,
                " must have stride(-1) == 1, got strides ", x->strides());
  }
}

// Validates the layout arguments against q (B, L, H, D) and the text padding mask; builds the kernel arguments.
AttentionArgs make_args(const char* op, const at::Tensor& q, const std::optional<at::Tensor>& text_pad_mask,
                        int64_t text_len, int64_t frames, int64_t grid_h, int64_t grid_w, const std::string& channel,
                        const std::string& attention, int64_t window, bool shifted, const std::string& stage) {
  TORCH_CHECK(channel == "base" || channel == "plus", op, ": channel must be \"base\" or \"plus\", got \"", channel,
              "\"");
  TORCH_CHECK(attention == "full" || attention == "window", op, ": attention must be \"full\" or \"window\", got \"",
              attention, "\"");
  TORCH_CHECK(stage == "sequential" || stage == "interpolation", op,
              ": stage must be \"sequential\" or \"interpolation\", got \"", stage, "\"");
  TORCH_CHECK(text_len >= 0, op, ": text_len must be >= 0, got ", text_len);
  TORCH_CHECK(frames >= 1 && grid_h >= 1 && grid_w >= 1, op, ": frames, grid_h, grid_w must be >= 1, got ", frames,
              ", ", grid_h, ", ", grid_w);
  const int64_t seq_len = q.size(1);
  TORCH_CHECK(seq_len < std::numeric_limits<int32_t>::max() && window < std::numeric_limits<int32_t>::max(), op,
              ": L and window must be < 2^31 (the visibility rule indexes tokens with int), got L = ", seq_len,
              ", window = ", window);
  TORCH_CHECK(seq_len == text_len + frames * grid_h * grid_w, op,
              ": L must equal text_len + frames * grid_h * grid_w = ", text_len, " + ", frames, " * ", grid_h, " * ",
              grid_w, " = ", text_len + frames * grid_h * grid_w, ", got L = ", seq_len);
  // The window only shapes the plus channel (the base channel is frame-local whatever `attention` says), so a
  // base-channel call takes any window, as the cpp and triton backends do.
  if (attention == "window" && channel == "plus") {
    TORCH_CHECK(window >= 1 && grid_h % window == 0 && grid_w % window == 0, op,
                ": window must be >= 1 and divide grid_h and grid_w for channel=\"plus\", attention=\"window\", got "
                "window = ", window, " for a ", grid_h, " x ", grid_w, " grid");
  }
  if (text_pad_mask.has_value()) {
    const at::Tensor& mask = *text_pad_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": text_pad_mask must be bool, got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == text_len, op,
                ": text_pad_mask must have shape (B, text_len) = (", q.size(0), ", ", text_len, "), got ",
                mask.sizes());
    TORCH_CHECK(mask.is_contiguous(), op, ": text_pad_mask must be contiguous, got strides ", mask.strides());
    TORCH_CHECK(mask.device() == q.device(), op, ": text_pad_mask must be on q's device ", q.device(), ", got ",
                mask.device());
  }
  AttentionArgs args;
  args.layout = vis::make_layout(static_cast<int>(text_len), static_cast<int>(frames), static_cast<int>(grid_h),
                                 static_cast<int>(grid_w), channel == "plus" ? vis::kPlus : vis::kBase,
                                 attention == "window" ? vis::kWindow : vis::kFull, static_cast<int>(window), shifted,
                                 stage == "interpolation" ? vis::kInterpolation : vis::kSequential);
  args.shape.batch = q.size(0);
  args.shape.seq_len = seq_len;
  args.shape.heads = q.size(2);
  args.shape.text_len = text_len;
  args.shape.head_dim = static_cast<int>(q.size(3));
  args.shape.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  return args;
}

bool is_aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// 16-byte packet loads need D, the B / L / H strides and the base pointer to be whole packets.
bool can_vectorize(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* x : tensors) {
    const int64_t vec = kPacketBytes / x->element_size();
    if (x->size(3) % vec != 0 || !is_aligned(x->const_data_ptr(), kPacketBytes)) return false;
    for (int dim = 0; dim < 3; ++dim) {
      if (x->size(dim) > 1 && x->stride(dim) % vec != 0) return false;
    }
  }
  return true;
}

TokenStrides strides_of(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2)}; }

// Grid of one block per (b, h, tile), all in grid.x.
unsigned tile_blocks(const char* op, AttentionShape& shape, int block) {
  shape.tiles = (shape.seq_len + block - 1) / block;
  const int64_t blocks = shape.batch * shape.heads * shape.tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": B * H * ceil(L / ", block, ") = ", blocks,
              " blocks exceed one launch's grid.x (2^31 - 1)");
  return static_cast<unsigned>(blocks);
}

// Checks the device has the kernel's (fixed) shared memory and opts the kernel in once per device.
template <typename Kernel>
void prepare_smem(const char* op, Kernel kernel, size_t bytes) {
  cuda_smem::prepare_launch(op, kernel, static_cast<int64_t>(bytes), static_cast<int64_t>(bytes),
                            "the cogvideo attention kernel");
}

// Calls body(scalar_t{}) for the three supported dtypes (check_qkv rejects the others first).
template <typename Body>
void dispatch_dtype(at::ScalarType dtype, Body&& body) {
  switch (dtype) {
    case at::kFloat:
      body(float{});
      break;
    case at::kHalf:
      body(at::Half{});
      break;
    case at::kBFloat16:
      body(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "cogvideo_attention: unsupported dtype ", dtype);
  }
}

// Calls body(std::integral_constant<int, kHeadDimMax>) for the smallest bucket holding D.
template <typename Body>
void dispatch_head_dim(int head_dim, Body&& body) {
  if (head_dim <= 64) {
    body(std::integral_constant<int, 64>{});
  } else if (head_dim <= 128) {
    body(std::integral_constant<int, 128>{});
  } else {
    body(std::integral_constant<int, 256>{});
  }
}

std::tuple<at::Tensor, at::Tensor> cogvideo_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& text_pad_mask,
    int64_t text_len, int64_t frames, int64_t grid_h, int64_t grid_w, std::string_view channel,
    std::string_view attention, int64_t window, bool shifted, std::string_view stage) {
  constexpr const char* op = "cogvideo_attention_fwd";
  check_qkv(op, q, k, v);
  AttentionArgs args = make_args(op, q, text_pad_mask, text_len, frames, grid_h, grid_w, std::string(channel),
                                 std::string(attention), window, shifted, std::string(stage));
  const at::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const bool* pad = text_pad_mask.has_value() ? text_pad_mask->const_data_ptr<bool>() : nullptr;
  // float16 / bfloat16 with D <= 128 on sm_80+: the tensor-core kernel (attention_tc_fwd.cu), unless
  // TORCHNOVA_CUDA_ATTENTION_KERNEL says otherwise.
  if (attention_tc::use_tensor_core_forward(op, q, args.shape.head_dim)) {
    attention_tc::cogvideo_attention_fwd(q, k, v, pad, args.layout, args.shape, out, lse);
    return {out, lse};
  }
  const bool vectorized = can_vectorize({&q, &k, &v});

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
      dispatch_head_dim(args.shape.head_dim, [&](auto bucket) {
        constexpr int kHeadDimMax = decltype(bucket)::value;
        using T = Tiling<kHeadDimMax>;
        auto kernel = cogvideo_attention_fwd_kernel<scalar_t, kHeadDimMax>;
        prepare_smem(op, kernel, T::kFwdSmemBytes);
        const unsigned blocks = tile_blocks(op, args.shape, T::kBlock);
        TORCHNOVA_LAUNCH_KERNEL(blocks, T::kThreads, T::kFwdSmemBytes, stream, kernel)(
            q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), strides_of(q),
            strides_of(k), strides_of(v), vectorized, pad, args.layout, args.shape, out.mutable_data_ptr<scalar_t>(),
            lse.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cogvideo_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& text_pad_mask, int64_t text_len, int64_t frames,
    int64_t grid_h, int64_t grid_w, std::string_view channel, std::string_view attention, int64_t window,
    bool shifted, std::string_view stage) {
  constexpr const char* op = "cogvideo_attention_bwd";
  check_qkv(op, q, k, v);
  AttentionArgs args = make_args(op, q, text_pad_mask, text_len, frames, grid_h, grid_w, std::string(channel),
                                 std::string(attention), window, shifted, std::string(stage));
  for (const auto& [name, x] :
       {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(x->sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", x->sizes());
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), op, ": ", name, " dtype must equal q dtype ", q.scalar_type(),
                ", got ", x->scalar_type());
    TORCH_CHECK(x->device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                x->device());
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2), op,
              ": lse must have shape (B, L, H) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse must be on q's device ", q.device(), ", got ", lse.device());

  const at::cuda::CUDAGuard guard(q.device());
  const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), options), dk = at::empty(q.sizes(), options), dv = at::empty(q.sizes(), options);
  if (q.numel() == 0) return {dq, dk, dv};
  // Autograd may hand an expanded (stride-0) or otherwise strided gradient: the kernels read grad_out with any
  // B / L / H strides but need unit stride over D; out is read as contiguous.
  const at::Tensor go = grad_out.stride(3) == 1 ? grad_out : grad_out.contiguous();
  const at::Tensor out_c = out.contiguous(), lse_c = lse.contiguous();
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const bool* pad = text_pad_mask.has_value() ? text_pad_mask->const_data_ptr<bool>() : nullptr;
  const bool vectorized = can_vectorize({&q, &k, &v, &go});
  // float16 / bfloat16 with D <= 128 on sm_80+: the tensor-core dq / dk / dv kernels (attention_tc_bwd.cu) after
  // the same delta kernel, with the CogVideo rule as their visibility policy; TORCHNOVA_CUDA_ATTENTION_KERNEL
  // overrides.
  const bool tensor_cores = attention_tc::use_tensor_core_backward(op, q);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
      const int64_t rows = args.shape.batch * args.shape.seq_len * args.shape.heads;
      const int64_t rows_per_block = kDeltaThreads / kWarpSize;
      const int64_t delta_blocks = (rows + rows_per_block - 1) / rows_per_block;
      TORCH_CHECK(delta_blocks <= std::numeric_limits<int32_t>::max(), op, ": B * L * H = ", rows,
                  " rows exceed one launch's grid.x");
      TORCHNOVA_LAUNCH_KERNEL(static_cast<unsigned>(delta_blocks), kDeltaThreads, 0, stream,
                              cogvideo_attention_delta_kernel<scalar_t>)(
          go.const_data_ptr<scalar_t>(), out_c.const_data_ptr<scalar_t>(), strides_of(go), args.shape,
          delta.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (tensor_cores) {
        // (B, L, H, D) as (B, 1, L, H, D): the spatial addressing with one frame.
        const attention_tc::CogVideoVisibility visibility{args.layout, pad, args.shape};
        at::Tensor dq5 = dq.unsqueeze(1), dk5 = dk.unsqueeze(1), dv5 = dv.unsqueeze(1);
        attention_tc::attention_bwd(op, go.unsqueeze(1), q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                    lse_c.unsqueeze(1), delta.unsqueeze(1), args.shape.scale, &visibility, dq5, dk5,
                                    dv5);
        return;
      }
      dispatch_head_dim(args.shape.head_dim, [&](auto bucket) {
        constexpr int kHeadDimMax = decltype(bucket)::value;
        using T = Tiling<kHeadDimMax>;
        const unsigned blocks = tile_blocks(op, args.shape, T::kBlock);
        auto dkdv_kernel = cogvideo_attention_bwd_dkdv_kernel<scalar_t, kHeadDimMax>;
        prepare_smem(op, dkdv_kernel, T::kBwdSmemBytes);
        TORCHNOVA_LAUNCH_KERNEL(blocks, T::kThreads, T::kBwdSmemBytes, stream, dkdv_kernel)(
            go.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), strides_of(go), strides_of(q), strides_of(k), strides_of(v), vectorized,
            lse_c.const_data_ptr<float>(),
            delta.const_data_ptr<float>(), pad, args.layout, args.shape, dk.mutable_data_ptr<scalar_t>(),
            dv.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        auto dq_kernel = cogvideo_attention_bwd_dq_kernel<scalar_t, kHeadDimMax>;
        prepare_smem(op, dq_kernel, T::kBwdSmemBytes);
        TORCHNOVA_LAUNCH_KERNEL(blocks, T::kThreads, T::kBwdSmemBytes, stream, dq_kernel)(
            go.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), strides_of(go), strides_of(q), strides_of(k), strides_of(v), vectorized,
            lse_c.const_data_ptr<float>(),
            delta.const_data_ptr<float>(), pad, args.layout, args.shape, dq.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CUDA, m) {
  m.impl("cogvideo_attention_fwd", &cogvideo_attention_fwd_cuda);
  m.impl("cogvideo_attention_bwd", &cogvideo_attention_bwd_cuda);
}

}  // namespace torchnova
