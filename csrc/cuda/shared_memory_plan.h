// Dynamic shared memory per block that the CUDA launchers request, as a function of the shape.
//
// One header for the launchers (csrc/cuda/*.cu, which size their launches with these functions) and for
// torchnova._C.cuda_shared_memory_bytes (csrc/torchnova.cpp), which the Python backend reasons compare with the
// device's sharedMemPerBlockOptin before picking the cuda backend: the numbers cannot drift apart. Plain C++ (no
// CUDA headers), so a CPU-only build exports the same numbers. Every SIMT tile is float32 whatever the input
// dtype, so no SIMT size depends on the dtype; the tensor-core tiles keep the input's element size.
//
//   kernel         size (bytes) of the smallest launch the launcher makes
//   temporal_fwd   one warp: 4 * (T * (T | 1) + 2 * T * 33)           (1 <= T <= 128; up to 4 warps per block)
//   temporal_bwd   one warp: 4 * (2 * T * (T | 1) + 2 * T * 33)
//   spatial_fwd    4 * (32 + 2 * 32) * (D | 1)
//   spatial_dkdv   4 * (2 * BK + 2 * 32) * (D | 1),   BK = 32 for D <= 128, else 16
//   spatial_dq     4 * (2 * BQ + 2 * 32) * (D | 1),   BQ = 4 warps * (8 rows for D <= 128, else 4)
//   cogvideo_fwd   Tiling<bucket(D)>::kFwdSmemBytes (csrc/cuda/dual_channel_attention.cu), bucket 64 / 128 / 256
//   cogvideo_bwd   Tiling<bucket(D)>::kBwdSmemBytes
//   tc_bwd_dkdv    2 * (2 * 64 + 4 * R) * P + 4 * 4 * R   (tensor-core backward, attention_tc_bwd.cu; D <= 128)
//   tc_bwd_dq      2 * (2 * 64 + 4 * R) * P               P = padded D 32 / 64 / 128, R = 64 (P <= 64) or 32
//   attention_tc_fwd  2 * (64 + 2 * 2 * 64) * P,  P = 64 for D <= 64, else 128 (D <= 128 only): 16-bit Q tile and
//                  double-buffered K, V tiles of the tensor-core forward (attention_tc_fwd.cu), spatial and cogvideo
//   attention_tc_fwd_tf32  4 * (64 + 2 * 2 * 64) * 64: the same with fp32 tiles (fp32 inputs, TF32 mma), D <= 64
// The temporal launchers then put as many warps in a block (at most 4) as the device's limit allows.
// The rotary temporal launches (temporal_attention_rotary_*) request the same bytes: q and k are rotated in
// registers as their tiles load, and the backward's transpose rotation takes the partner column by a shuffle.
#pragma once

#include <cstdint>
#include <string_view>

namespace torchnova {
namespace smem_plan {

constexpr int64_t kFloatBytes = 4;

// Row stride of a float tile with `width` used columns: odd, so the 32 lanes reading one column of 32 rows hit 32
// different banks.
constexpr int odd_width(int width) { return width | 1; }

// ----- Temporal attention (spacetime_temporal.cu): per warp, probs [T][T | 1] (and dprobs in the backward) plus
// two [T][33] column tiles.
constexpr int kTemporalMaxFrames = 128;
constexpr int kTemporalMaxWarpsPerBlock = 4;
constexpr int kTemporalTileCols = 32;
constexpr int kTemporalTileLd = kTemporalTileCols + 1;

constexpr int64_t temporal_fwd_floats_per_warp(int T) {
  return int64_t(T) * odd_width(T) + 2 * int64_t(T) * kTemporalTileLd;
}
constexpr int64_t temporal_bwd_floats_per_warp(int T) {
  return 2 * int64_t(T) * odd_width(T) + 2 * int64_t(T) * kTemporalTileLd;
}

// ----- Spatial attention (spacetime_spatial.cu): head-dim buckets of 64, 128, 256 fix the template instance.
constexpr int kSpatialMaxHeadDim = 256;
constexpr int kSpatialFwdWarps = 4;
constexpr int kSpatialFwdRowsPerWarp = 8;
constexpr int kSpatialFwdBlockQ = kSpatialFwdWarps * kSpatialFwdRowsPerWarp;  // 32
constexpr int kSpatialKeyBlock = 32;        // keys per streamed block = lanes (fwd, dq)
constexpr int kSpatialDkDvQueryBlock = 32;  // queries per streamed block = lanes (dkdv)
constexpr int kSpatialDqWarps = 4;

constexpr int spatial_head_dim_bucket(int D) { return D <= 64 ? 64 : (D <= 128 ? 128 : kSpatialMaxHeadDim); }
constexpr int spatial_dkdv_block_k(int d_max) { return d_max <= 128 ? 32 : 16; }
constexpr int spatial_dq_rows_per_warp(int d_max) { return d_max <= 128 ? 8 : 4; }
constexpr int spatial_dq_block_q(int d_max) { return kSpatialDqWarps * spatial_dq_rows_per_warp(d_max); }

constexpr int64_t spatial_tile_bytes(int rows, int D) { return int64_t(rows) * odd_width(D) * kFloatBytes; }
constexpr int64_t spatial_fwd_bytes(int D) { return spatial_tile_bytes(kSpatialFwdBlockQ + 2 * kSpatialKeyBlock, D); }
constexpr int64_t spatial_dkdv_bytes(int D) {
  return spatial_tile_bytes(2 * spatial_dkdv_block_k(spatial_head_dim_bucket(D)) + 2 * kSpatialDkDvQueryBlock, D);
}
constexpr int64_t spatial_dq_bytes(int D) {
  return spatial_tile_bytes(2 * spatial_dq_block_q(spatial_head_dim_bucket(D)) + 2 * kSpatialKeyBlock, D);
}

// ----- CogVideo dual-channel attention (dual_channel_attention.cu): the head-dim bucket fixes the tile of
// 4096 / bucket tokens; q, k, v (and dO in the backward) tiles of bucket + 1 floats per token, a (block, block + 1)
// score tile, and (backward) lse and delta of the block's tokens.
constexpr int kDualMaxHeadDim = 256;
constexpr int dual_head_dim_bucket(int D) { return D <= 64 ? 64 : (D <= 128 ? 128 : kDualMaxHeadDim); }
constexpr int dual_block(int bucket) { return 4096 / bucket; }
constexpr int64_t dual_tile_floats(int bucket) { return int64_t(dual_block(bucket)) * (bucket + 1); }
constexpr int64_t dual_score_floats(int bucket) { return int64_t(dual_block(bucket)) * (dual_block(bucket) + 1); }
constexpr int64_t dual_fwd_bytes_of_bucket(int bucket) {
  return kFloatBytes * (3 * dual_tile_floats(bucket) + dual_score_floats(bucket));
}
constexpr int64_t dual_bwd_bytes_of_bucket(int bucket) {
  return kFloatBytes * (4 * dual_tile_floats(bucket) + dual_score_floats(bucket) + 2 * dual_block(bucket));
}

// ----- Tensor-core backward (attention_tc_bwd.cu), spatial and CogVideo alike: swizzled 16-bit tiles of P columns
// (flash_tc.cuh; P = D padded to 32 / 64 / 128). A block owns 64 rows (4 warps x 16) of two tensors and streams
// R rows of two others through two stages (R = 64, or 32 for P = 128 to bound the registers); the dK/dV kernel
// also keeps lse and delta of the streamed queries (two stages).
constexpr int kTcBwdMaxHeadDim = 128;
constexpr int kTcBwdOwnRows = 64;
constexpr int kTcBwdElementBytes = 2;
constexpr int tc_bwd_padded_dim(int D) { return D <= 32 ? 32 : (D <= 64 ? 64 : 128); }
constexpr int tc_bwd_stream_rows(int padded) { return padded <= 64 ? 64 : 32; }
constexpr int64_t tc_bwd_tiles_bytes(int padded) {
  const int rows = 2 * kTcBwdOwnRows + 2 * 2 * tc_bwd_stream_rows(padded);  // 2 own tensors, 2 streamed x 2 stages
  return int64_t(kTcBwdElementBytes) * rows * padded;
}
constexpr int64_t tc_bwd_dkdv_bytes_of_padded(int padded) {
  return tc_bwd_tiles_bytes(padded) + kFloatBytes * 2 * 2 * tc_bwd_stream_rows(padded);
}
constexpr int64_t tc_bwd_dq_bytes_of_padded(int padded) { return tc_bwd_tiles_bytes(padded); }
constexpr int64_t tc_bwd_max_bytes(int D) {  // the larger of the two kernels' launches
  return tc_bwd_dkdv_bytes_of_padded(tc_bwd_padded_dim(D));
}

// ----- Tensor-core attention forward (attention_tc_fwd.cu), float16 / bfloat16 only: a [64][P] Q tile and two
// stages of [64][P] K and V tiles, 16-bit elements, P = the padded head dim 64 or 128.
constexpr int kTcFwdWarps = 4;
constexpr int kTcFwdBlockM = 64;  // query rows per block: 4 warps x 16
constexpr int kTcFwdBlockN = 64;  // keys per streamed tile
constexpr int kTcMaxHeadDim = 128;
constexpr int kTcTf32MaxHeadDim = 64;  // fp32 (TF32) at P = 128 would spill registers (ptxas: 255 + spills)
constexpr int tc_fwd_padded_head_dim(int D) { return D <= 64 ? 64 : 128; }
// element_bytes: 2 (fp16 / bf16) or 4 (fp32 inputs on the TF32 path, tiles kept in fp32).
constexpr int64_t tc_fwd_bytes_of_padded(int padded, int element_bytes = 2) {
  return int64_t(element_bytes) * (kTcFwdBlockM + 2 * 2 * kTcFwdBlockN) * int64_t(padded);
}
constexpr int64_t tc_fwd_bytes(int D, int element_bytes = 2) {
  return tc_fwd_bytes_of_padded(tc_fwd_padded_head_dim(D), element_bytes);
}

// Bytes of the smallest launch of `kernel` (names in the table above) at frames T and head dim D; -1 for an
// unknown kernel name or a shape outside the kernel's limits.
inline int64_t launch_bytes(std::string_view kernel, int64_t T, int64_t D) {
  if (kernel == "temporal_fwd" || kernel == "temporal_bwd") {
    if (T < 1 || T > kTemporalMaxFrames) return -1;
    const int t = static_cast<int>(T);
    return kFloatBytes * (kernel == "temporal_fwd" ? temporal_fwd_floats_per_warp(t) : temporal_bwd_floats_per_warp(t));
  }
  if (D < 1 || D > kSpatialMaxHeadDim) return -1;
  const int d = static_cast<int>(D);
  if (kernel == "spatial_fwd") return spatial_fwd_bytes(d);
  if (kernel == "spatial_dkdv") return spatial_dkdv_bytes(d);
  if (kernel == "spatial_dq") return spatial_dq_bytes(d);
  if (kernel == "cogvideo_fwd") return dual_fwd_bytes_of_bucket(dual_head_dim_bucket(d));
  if (kernel == "cogvideo_bwd") return dual_bwd_bytes_of_bucket(dual_head_dim_bucket(d));
  if (kernel == "tc_bwd_dkdv" || kernel == "tc_bwd_dq") {
    if (d > kTcBwdMaxHeadDim) return -1;
    const int padded = tc_bwd_padded_dim(d);
    return kernel == "tc_bwd_dkdv" ? tc_bwd_dkdv_bytes_of_padded(padded) : tc_bwd_dq_bytes_of_padded(padded);
  }
  if (kernel == "attention_tc_fwd") return d <= kTcMaxHeadDim ? tc_fwd_bytes(d) : -1;
  if (kernel == "attention_tc_fwd_tf32") return d <= kTcTf32MaxHeadDim ? tc_fwd_bytes(d, 4) : -1;
  return -1;
}

}  // namespace smem_plan
}  // namespace torchnova
