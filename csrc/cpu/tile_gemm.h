// Small dense matrix products for the CPU attention kernels: register-blocked, no packing, inlined into every
// ISA copy of cpu_dispatch.h. W is the vector width in bytes of the copy (IsaX::kVectorBytes): 16 (4 floats,
// SSE2), 32 (8 floats / 4 doubles, AVX2) or 64 (16 floats / 8 doubles, AVX-512).
//
//   C[M x N] = alpha * op(A)[M x K] . B[K x N]   (+ C when accumulate)
//   op(A) = A, stored M x K with row stride lda, or (kTransA) the transpose of A stored K x M with row stride lda
//   B stored K x N with row stride ldb (rows must be contiguous: the kernel loads vectors along N)
//   C stored M x N with row stride ldc
//
// The tiles of attention are small (T x T x D for temporal attention, a 64-row query block against a few
// hundred keys for spatial), far below the sizes where BLAS packing pays off, and a BLAS call per tile costs
// more than the tile. So: an MR x (2 vectors) register tile, B read straight from its rows, A broadcast one
// element at a time. MR = 6 for 16- and 32-byte vectors (12 accumulators + 2 B vectors + 1 broadcast fit the 16
// SSE/AVX2 registers, the BLIS Haswell shape) and 12 for 64-byte ones (24 + 2 + 1 of AVX-512's 32, the BLIS SKX
// shape). Edges: fewer rows use tiles of 8/4/2/1 rows; a one-vector column strip, then (W = 64) a 32-byte
// strip, then scalar columns.
//
// transpose(): dst[c * ldd + r] = src[r * lds + c], 8 x 8 float blocks through vector shuffles (the B operand of
// Q K^T needs the keys along its rows).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_dispatch.h"

namespace torchnova {
namespace cpu {

template <typename T, int W>
struct Vec {
  typedef T type __attribute__((vector_size(W)));
};

// Padding unit of the kernels' staged layouts (key columns, transposed rows): one 32-byte vector, which keeps
// the layouts the same in every ISA copy (the 64-byte copy covers a trailing half vector with a 32-byte strip).
template <typename T>
constexpr int64_t kVectorLanes = 32 / sizeof(T);

TORCHNOVA_INLINE int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Leading dimension for a transposed (D, n) operand: n rounded to whole vectors plus one vector, so that the D
// rows do not all fall into the same cache sets when n is a power of two.
template <typename T>
TORCHNOVA_INLINE int64_t transposed_ld(int64_t n) {
  return round_up(n, kVectorLanes<T>) + kVectorLanes<T>;
}

// dst[0, n) = src[0, n) converted (fp16/bf16 -> float staging of the attention kernels).
template <typename S, typename T>
TORCHNOVA_INLINE void convert_row(const S* src, int64_t n, T* dst) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d]);
}

// Rows of the full register tile for W-byte vectors.
template <int W>
constexpr int kTileRows = W == 64 ? 12 : 6;

// One MR x (NV vectors of W bytes) tile of C over the whole K.
template <typename T, int W, int MR, int NV, bool kTransA>
TORCHNOVA_INLINE void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                                T alpha, bool accumulate) {
  using V = typename Vec<T, W>::type;
  constexpr int L = W / sizeof(T);
  V acc[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + k * ldb + v * L, sizeof(V));
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const T a = kTransA ? A[k * lda + r] : A[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      T* dst = C + r * ldc + v * L;
      V c = acc[r][v] * alpha;
      if (accumulate) {
        V old;
        std::memcpy(&old, dst, sizeof(V));
        c += old;
      }
      std::memcpy(dst, &c, sizeof(V));
    }
  }
}

// All rows of one column strip of NV vectors of W bytes.
template <typename T, int W, int NV, bool kTransA>
TORCHNOVA_INLINE void gemm_strip(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                                 int64_t ldc, T alpha, bool accumulate) {
  constexpr int MR = kTileRows<W>;
  const auto a_at = [&](int64_t m) { return kTransA ? A + m : A + m * lda; };
  int64_t m0 = 0;
  for (; m0 + MR <= M; m0 += MR) {
    gemm_tile<T, W, MR, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate);
  }
  // The last M % MR rows as 8 (only below a 12-row tile: 16 accumulators do not fit 16 AVX2 registers), 4, 2, 1.
  if constexpr (MR > 8) {
    if (M - m0 >= 8) {
      gemm_tile<T, W, 8, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate);
      m0 += 8;
    }
  }
  if (M - m0 >= 4) {
    gemm_tile<T, W, 4, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate);
    m0 += 4;
  }
  if (M - m0 >= 2) {
    gemm_tile<T, W, 2, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate);
    m0 += 2;
  }
  if (M - m0 >= 1) gemm_tile<T, W, 1, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate);
}

// C = alpha * op(A) . B (+ C) with W-byte vectors: see the file header for the shapes and strides.
template <int W, bool kTransA = false, typename T>
TORCHNOVA_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                           int64_t ldc, T alpha = T(1), bool accumulate = false) {
  static_assert(W == 16 || W == 32 || W == 64, "vector width: 16, 32 or 64 bytes");
  constexpr int L = W / sizeof(T);
  int64_t n0 = 0;
  for (; n0 + 2 * L <= N; n0 += 2 * L) {
    gemm_strip<T, W, 2, kTransA>(M, K, A, lda, B + n0, ldb, C + n0, ldc, alpha, accumulate);
  }
  for (; n0 + L <= N; n0 += L) {
    gemm_strip<T, W, 1, kTransA>(M, K, A, lda, B + n0, ldb, C + n0, ldc, alpha, accumulate);
  }
  if constexpr (W == 64) {  // a trailing half vector
    constexpr int L32 = 32 / sizeof(T);
    if (n0 + L32 <= N) {
      gemm_strip<T, 32, 1, kTransA>(M, K, A, lda, B + n0, ldb, C + n0, ldc, alpha, accumulate);
      n0 += L32;
    }
  }
  if (n0 == N) return;
  for (int64_t m = 0; m < M; ++m) {  // the last N % (min(W, 32) bytes) columns
    for (int64_t n = n0; n < N; ++n) {
      T sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += (kTransA ? A[k * lda + m] : A[m * lda + k]) * B[k * ldb + n];
      C[m * ldc + n] = alpha * sum + (accumulate ? C[m * ldc + n] : T(0));
    }
  }
}

// dst (cols x rows, row stride ldd) = transpose of src (rows x cols, row stride lds).
template <typename T>
TORCHNOVA_INLINE void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  int64_t r0 = 0, c0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    typedef float V __attribute__((vector_size(32)));
    typedef int32_t M __attribute__((vector_size(32)));
    typedef float H4 __attribute__((vector_size(16)));
    for (r0 = 0; r0 + 8 <= rows; r0 += 8) {
      for (c0 = 0; c0 + 8 <= cols; c0 += 8) {
        // x[i] = (row i, cols c0..c0+3 | row i+4, same cols), x[i+4] the same for cols c0+4..c0+7: the half-row
        // loads (vinsertf128 from memory, a load port) do the cross-lane step, so only two stages of in-lane
        // shuffles remain (16 instead of 24 per block; shuffles share one port on Intel cores).
        V x[8], y[8];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const T* top = src + (r0 + i) * lds + c0;
          const T* bottom = src + (r0 + i + 4) * lds + c0;
          H4 top_lo, top_hi, bottom_lo, bottom_hi;
          std::memcpy(&top_lo, top, sizeof(H4));
          std::memcpy(&top_hi, top + 4, sizeof(H4));
          std::memcpy(&bottom_lo, bottom, sizeof(H4));
          std::memcpy(&bottom_hi, bottom + 4, sizeof(H4));
          x[i] = __builtin_shufflevector(top_lo, bottom_lo, 0, 1, 2, 3, 4, 5, 6, 7);
          x[i + 4] = __builtin_shufflevector(top_hi, bottom_hi, 0, 1, 2, 3, 4, 5, 6, 7);
        }
        // In-lane 4 x 4 transposes: unpacklo/hi, then movelh/movehl; x[c] ends up as column c0 + c.
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          y[2 * i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
          y[2 * i + 1] = __builtin_shuffle(x[2 * i], x[2 * i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
        }
#pragma GCC unroll 2
        for (int i = 0; i < 2; ++i) {
          x[4 * i + 0] = __builtin_shuffle(y[4 * i], y[4 * i + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
          x[4 * i + 1] = __builtin_shuffle(y[4 * i], y[4 * i + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
          x[4 * i + 2] = __builtin_shuffle(y[4 * i + 1], y[4 * i + 3], M{0, 1, 8, 9, 4, 5, 12, 13});
          x[4 * i + 3] = __builtin_shuffle(y[4 * i + 1], y[4 * i + 3], M{2, 3, 10, 11, 6, 7, 14, 15});
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) std::memcpy(dst + (c0 + i) * ldd + r0, &x[i], sizeof(V));
      }
    }
  }
  // What the 8 x 8 blocks left: the columns right of c0 for the block rows, then the rows below r0.
  for (int64_t r = 0; r < r0; ++r) {
    for (int64_t c = c0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
  for (int64_t r = r0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

}  // namespace cpu
}  // namespace torchnova
