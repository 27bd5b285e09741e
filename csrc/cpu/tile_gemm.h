// Small dense matrix products for the CPU attention kernels: register-blocked, no packing, inlined into both
// ISA copies of cpu_dispatch.h (8-wide float / 4-wide double vectors under AVX2+FMA).
//
//   C[M x N] = alpha * op(A)[M x K] . B[K x N]   (+ C when accumulate)
//   op(A) = A, stored M x K with row stride lda, or (kTransA) the transpose of A stored K x M with row stride lda
//   B stored K x N with row stride ldb (rows must be contiguous: the kernel loads vectors along N)
//   C stored M x N with row stride ldc
//
// The tiles of attention are small (T x T x D for temporal attention, a 64-row query block against a few
// hundred keys for spatial), far below the sizes where BLAS packing pays off, and a BLAS call per tile costs
// more than the tile. So: a 6 x (2 vectors) register tile (12 accumulators + 2 B vectors + 1 broadcast fit the
// 16 AVX2 registers, the BLIS Haswell shape), B read straight from its rows, A broadcast one element at a time.
// Edges: fewer rows use a smaller tile; a one-vector column strip, then scalar columns.
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

template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
};

constexpr int kGemmRows = 6;  // rows of the register tile

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

// One MR x (NV vectors) tile of C over the whole K.
template <typename T, int MR, int NV, bool kTransA>
TORCHNOVA_INLINE void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                                T alpha, bool accumulate) {
  using V = typename Vec32<T>::type;
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + k * ldb + v * L, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = kTransA ? A[k * lda + r] : A[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
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

// All rows of one column strip of NV vectors.
template <typename T, int NV, bool kTransA>
TORCHNOVA_INLINE void gemm_strip(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                                 int64_t ldc, T alpha, bool accumulate) {
  int64_t m0 = 0;
  const auto a_at = [&](int64_t m) { return kTransA ? A + m : A + m * lda; };
  for (; m0 + kGemmRows <= M; m0 += kGemmRows) {
    gemm_tile<T, kGemmRows, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate);
  }
  switch (M - m0) {
    case 5: gemm_tile<T, 5, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate); break;
    case 4: gemm_tile<T, 4, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate); break;
    case 3: gemm_tile<T, 3, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate); break;
    case 2: gemm_tile<T, 2, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate); break;
    case 1: gemm_tile<T, 1, NV, kTransA>(K, a_at(m0), lda, B, ldb, C + m0 * ldc, ldc, alpha, accumulate); break;
    default: break;
  }
}

// C = alpha * op(A) . B (+ C): see the file header for the shapes and strides.
template <typename T, bool kTransA = false>
TORCHNOVA_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                           int64_t ldc, T alpha = T(1), bool accumulate = false) {
  constexpr int L = 32 / sizeof(T);
  int64_t n0 = 0;
  for (; n0 + 2 * L <= N; n0 += 2 * L) {
    gemm_strip<T, 2, kTransA>(M, K, A, lda, B + n0, ldb, C + n0, ldc, alpha, accumulate);
  }
  for (; n0 + L <= N; n0 += L) gemm_strip<T, 1, kTransA>(M, K, A, lda, B + n0, ldb, C + n0, ldc, alpha, accumulate);
  if (n0 == N) return;
  for (int64_t m = 0; m < M; ++m) {  // the last N % L columns
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
    for (r0 = 0; r0 + 8 <= rows; r0 += 8) {
      for (c0 = 0; c0 + 8 <= cols; c0 += 8) {
        V x[8], y[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) std::memcpy(&x[i], src + (r0 + i) * lds + c0, sizeof(V));
        // unpacklo/hi, shuffle, permute2f128: the classic 8 x 8 AVX transpose.
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
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          y[i] = __builtin_shuffle(x[i], x[i + 4], M{0, 1, 2, 3, 8, 9, 10, 11});
          y[i + 4] = __builtin_shuffle(x[i], x[i + 4], M{4, 5, 6, 7, 12, 13, 14, 15});
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) std::memcpy(dst + (c0 + i) * ldd + r0, &y[i], sizeof(V));
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
