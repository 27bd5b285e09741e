// Tile primitives of the tensor-core (mma.sync m16n8k16) attention kernels, forward (attention_tc_fwd.cu) and
// backward (attention_tc_bwd.cu): a swizzled shared-memory layout for 16-bit tiles, a global -> shared tile loader
// (cp.async with zero-fill, or plain loads), and the ldmatrix fragment loaders for the three operand shapes of
// FlashAttention (A = row-major Q / dO tile, B = K for Q K^T, B = V for P V). Tensor-core work goes only through
// tensor_core.cuh (each function there has an emulated twin), never inline PTX.
//
// Swizzled tile. A tile is [kRows x kCols] 16-bit elements, kCols in {32, 64, 128} (the padded head dim), stored
// row after row (kCols * 2 bytes per row) in kChunks = kCols / 8 chunks of 16 bytes. Logical chunk c of row r sits
// at physical chunk
//     c ^ f(r),   f(r) = (r / kRowsPerLine) % kSwizzleWidth,
//     kRowsPerLine = max(1, 8 / kChunks) (rows sharing one 128-byte line of the 32 banks),
//     kSwizzleWidth = min(kChunks, 8).
// Shared memory serves 128 bytes (32 banks x 4 bytes = 8 chunks) per wavefront; a 16-byte access touches the 4
// banks of its chunk slot (physical chunk index mod 8). No bank conflicts:
//   * ldmatrix reads, per 8-lane phase, 8 rows r0 .. r0 + 7 (r0 a multiple of 8: every loader below starts its
//     matrices at multiples of 8) at one logical chunk c. Slot = (r * kChunks + (c ^ f(r))) mod 8.
//       kChunks >= 8: slot = (c ^ (r % 8)) mod 8, and c -> c ^ x is a bijection, so the 8 rows take 8 slots.
//       kChunks == 4: r = r0 + 2m + p (m < 4, p < 2): slot = 4p + (c ^ m), again 8 distinct slots.
//   * cp.async / plain 16-byte stores: consecutive threads take consecutive chunks of a row (chunk fastest), so
//     an 8-lane phase stores 8 consecutive logical chunks (one row for kChunks = 8, half a row for 16, two rows
//     for 4); XOR with f(r) < 8 permutes chunks inside their aligned group of 8, so the slots are again distinct.
// Without the swizzle (f = 0) the 8 rows of an ldmatrix phase with kChunks >= 8 all sit in the same slot: an
// 8-way conflict.
//
// Loading. Rows past the sequence and columns past the head dim D are zero in the tile (padding feeds the
// products: a zero column adds 0 to q.k; a zero V row times P = 0 adds 0; never NaN from stale bytes).
//   * async path (load_tile_async): every chunk is one tc::cp_async_16 with src_bytes = the bytes of real data
//     in it (16, a partial tail when D % 8 != 0, or 0 = zero-fill). Needs 16-byte aligned global chunks: the base
//     pointer 16-byte aligned and every stride a multiple of 8 elements (can_load_async on the host).
//   * plain path (load_tile_plain), for everything else (e.g. D = 33 contiguous: rows start at odd elements):
//     element loads, consecutive threads on consecutive columns (coalesced), zeros written in the padding.
//
// Fragments (layouts in tensor_core.cuh). Lane l = 8j + i supplies the row address of row i of matrix j:
//   load_a:          A (16 x 16) from a row-major [m][k] tile at (row0, k0): matrices (rows +0/+8) x (k +0/+8)
//                    in the order (0,0), (8,0), (0,8), (8,8) -> a[0..3], the m16n8k16 A fragment.
//   load_b_nk:       B for X * Y^T where the tile holds Y as [n][k] (K for Q K^T): two n-tiles of 8 at n0, n0 + 8,
//                    k0 .. k0 + 15: b[0..1] = fragment of n-tile n0, b[2..3] = of n0 + 8 (ldmatrix, no .trans).
//   load_b_kn:       B for X * Y where the tile holds Y as [k][n] (V for P V): k0 .. k0 + 15, n-tiles n0, n0 + 8:
//                    b[0..1] = fragment of n-tile n0, b[2..3] = of n0 + 8 (ldmatrix .trans).
// fp32 tiles (the TF32 m16n8k8 path): a 16-byte ldmatrix row is 4 floats and each lane receives one 32-bit element
// per matrix (M_j[lane / 4][lane % 4]), which is the m16n8k8 tf32 layout: load_a then yields the A fragment of
// the 16 x 8 block at (row0, k0) (matrices at k0 and k0 + 4) and load_b_nk the B fragments over k0 .. k0 + 7 of
// n-tiles n0 and n0 + 8; the caller rounds them with tc::float_to_tf32. load_b_kn has no fp32 form (.trans
// moves 16-bit halves): the TF32 kernel reads V's fragments with plain shared loads.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "tensor_core.cuh"

namespace torchnova {
namespace flash_tc {

constexpr int kChunkBytes = 16;
constexpr int kChunkElements = 8;  // 16-bit elements per 16-byte chunk

// kElementBytes = 2 (fp16 / bf16, the tiles described above) or 4 (fp32 tiles of the TF32 path: 4 elements per
// chunk, kChunks = kCols / 4 >= 16, so the kChunks >= 8 case of the proof applies unchanged).
template <int kCols, int kElementBytes = 2>
struct Swizzle {
  static_assert(kCols == 32 || kCols == 64 || kCols == 128, "swizzled tiles are 32, 64 or 128 columns wide");
  static_assert(kElementBytes == 2 || kElementBytes == 4, "tiles hold 16-bit or 32-bit elements");
  static constexpr int kElementsPerChunk = kChunkBytes / kElementBytes;
  static constexpr int kChunks = kCols / kElementsPerChunk;
  static constexpr int kRowsPerLine = kChunks >= 8 ? 1 : 8 / kChunks;
  static constexpr int kSwizzleWidth = kChunks >= 8 ? 8 : kChunks;

  // Element offset of logical chunk `chunk` of row `row`.
  __device__ __forceinline__ static int chunk_offset(int row, int chunk) {
    return row * kCols + ((chunk ^ ((row / kRowsPerLine) % kSwizzleWidth)) * kElementsPerChunk);
  }
  // Element offset of element (row, col).
  __device__ __forceinline__ static int offset(int row, int col) {
    return chunk_offset(row, col / kElementsPerChunk) + col % kElementsPerChunk;
  }
};
template <int kCols, typename scalar_t>
using SwizzleOf = Swizzle<kCols, int(sizeof(scalar_t))>;

// The mma.sync flavour and the packed pair type of a 16-bit element type.
template <typename scalar_t>
struct MmaType;
template <>
struct MmaType<c10::Half> {
  using Pair = __half2;
  __device__ __forceinline__ static void mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    tc::mma_m16n8k16_f16(d, a, b, c);
  }
};
template <>
struct MmaType<c10::BFloat16> {
  using Pair = __nv_bfloat162;
  __device__ __forceinline__ static void mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    tc::mma_m16n8k16_bf16(d, a, b, c);
  }
};

// acc (16 x 8, fp32) += A (16 x 16) * B (16 x 8) in place.
template <typename scalar_t>
__device__ __forceinline__ void mma_accumulate(float acc[4], const uint32_t a[4], const uint32_t b[2]) {
  MmaType<scalar_t>::mma(acc, a, b, acc);
}

// Rows [row0, row0 + kRows) of a (seq_len x head_dim) matrix, element (s, d) at base[s * row_stride + d], into a
// swizzled [kRows x kCols] tile by cp.async (one 16-byte chunk per call, zero-filled past seq_len / head_dim).
// All kThreads threads of the block call it; the caller commits the group and waits before reading the tile.
// Requires: base 16-byte aligned and row_stride a whole number of 16-byte chunks (8 16-bit or 4 fp32 elements),
// so every chunk start is 16-byte aligned.
template <int kRows, int kCols, int kThreads, typename scalar_t>
__device__ __forceinline__ void load_tile_async(scalar_t* __restrict__ tile,        // [kRows][kCols] swizzled
                                                const scalar_t* __restrict__ base,  // row 0 of the matrix
                                                int64_t row_stride, int64_t row0, int64_t seq_len, int head_dim) {
  using Sw = SwizzleOf<kCols, scalar_t>;
  for (int index = threadIdx.x; index < kRows * Sw::kChunks; index += kThreads) {
    const int r = index / Sw::kChunks, chunk = index % Sw::kChunks;
    const int64_t row = row0 + r;
    const int col = chunk * Sw::kElementsPerChunk;
    const int real = row < seq_len ? (head_dim - col) * int(sizeof(scalar_t)) : 0;  // bytes of data in the chunk
    const int src_bytes = real <= 0 ? 0 : (real < kChunkBytes ? real : kChunkBytes);
    // With src_bytes == 0 nothing is read, but the address must still be valid: the matrix's first element.
    const scalar_t* src = src_bytes > 0 ? base + row * row_stride + col : base;
    tc::cp_async_16(tile + Sw::chunk_offset(r, chunk), src, src_bytes);
  }
}

// The same tile by plain loads (any alignment, any stride), zeros in the padding. The caller synchronizes
// (__syncthreads) before reading the tile.
template <int kRows, int kCols, int kThreads, typename scalar_t>
__device__ __forceinline__ void load_tile_plain(scalar_t* __restrict__ tile,        // [kRows][kCols] swizzled
                                                const scalar_t* __restrict__ base,  // row 0 of the matrix
                                                int64_t row_stride, int64_t row0, int64_t seq_len, int head_dim) {
  using Sw = SwizzleOf<kCols, scalar_t>;
  for (int index = threadIdx.x; index < kRows * kCols; index += kThreads) {
    const int r = index / kCols, col = index % kCols;
    const int64_t row = row0 + r;
    tile[Sw::offset(r, col)] = (row < seq_len && col < head_dim) ? base[row * row_stride + col] : scalar_t(0.f);
  }
}

// Either of the two loaders; `async` must be the same in every thread of the block.
template <int kRows, int kCols, int kThreads, typename scalar_t>
__device__ __forceinline__ void load_tile(bool async, scalar_t* __restrict__ tile, const scalar_t* __restrict__ base,
                                          int64_t row_stride, int64_t row0, int64_t seq_len, int head_dim) {
  if (async) {
    load_tile_async<kRows, kCols, kThreads>(tile, base, row_stride, row0, seq_len, head_dim);
  } else {
    load_tile_plain<kRows, kCols, kThreads>(tile, base, row_stride, row0, seq_len, head_dim);
  }
}

// A fragment of the 16 x 16 block at (row0, k0) of a row-major swizzled [m][kCols] tile (row0 % 16 == 0,
// k0 % 16 == 0). Whole warp.
template <int kCols, typename scalar_t>
__device__ __forceinline__ void load_a(uint32_t a[4], const scalar_t* tile, int row0, int k0) {
  const int lane = threadIdx.x % 32, matrix = lane / 8, row_in_matrix = lane % 8;
  const int row = row0 + row_in_matrix + 8 * (matrix & 1);
  const int chunk = k0 / SwizzleOf<kCols, scalar_t>::kElementsPerChunk + (matrix >> 1);
  tc::ldmatrix<4, false>(a, tile + SwizzleOf<kCols, scalar_t>::chunk_offset(row, chunk));
}

// B fragments of n-tiles n0 and n0 + 8 (b[0..1], b[2..3]) over k0 .. k0 + 15, for X * Y^T with Y stored as a
// swizzled [n][kCols] tile (rows = n, e.g. keys of K; columns = k, e.g. head dim). n0 % 8 == 0, k0 % 16 == 0.
template <int kCols, typename scalar_t>
__device__ __forceinline__ void load_b_nk(uint32_t b[4], const scalar_t* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32, matrix = lane / 8, row_in_matrix = lane % 8;
  const int row = n0 + row_in_matrix + 8 * (matrix >> 1);
  const int chunk = k0 / SwizzleOf<kCols, scalar_t>::kElementsPerChunk + (matrix & 1);
  tc::ldmatrix<4, false>(b, tile + SwizzleOf<kCols, scalar_t>::chunk_offset(row, chunk));
}

// B fragments of n-tiles n0 and n0 + 8 (b[0..1], b[2..3]) over k0 .. k0 + 15, for X * Y with Y stored as a
// swizzled [k][kCols] tile (rows = k, e.g. keys of V; columns = n, e.g. head dim). k0 % 16 == 0, n0 % 16 == 0.
template <int kCols, typename scalar_t>
__device__ __forceinline__ void load_b_kn(uint32_t b[4], const scalar_t* tile, int k0, int n0) {
  const int lane = threadIdx.x % 32, matrix = lane / 8, row_in_matrix = lane % 8;
  const int row = k0 + row_in_matrix + 8 * (matrix & 1);
  static_assert(sizeof(scalar_t) == 2, "ldmatrix .trans moves 16-bit elements: fp32 tiles are read plainly");
  const int chunk = n0 / kChunkElements + (matrix >> 1);
  tc::ldmatrix<4, true>(b, tile + Swizzle<kCols>::chunk_offset(row, chunk));
}

// Host side: whether a (.., D) tensor can use load_tile_async: data pointer 16-byte aligned and every stride over
// a dim of size > 1 (except the unit head-dim stride) a whole number of 16-byte chunks.
template <typename Tensor>
inline bool can_load_async(const Tensor& x) {
  if (reinterpret_cast<uintptr_t>(x.const_data_ptr()) % kChunkBytes != 0) return false;
  const int64_t elements_per_chunk = kChunkBytes / x.element_size();
  for (int64_t dim = 0; dim + 1 < x.dim(); ++dim) {
    if (x.size(dim) > 1 && x.stride(dim) % elements_per_chunk != 0) return false;
  }
  return true;
}

}  // namespace flash_tc
}  // namespace torchnova
