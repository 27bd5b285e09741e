// The softmax steps of FlashAttention-2 on one (query block x key block) tile, shared by the CPU attention
// kernels (spatial attention, dual-channel attention); the products around them are tile_gemm.h's.
//
//   forward tile: s (rows x cols) -> p = exp(s - m_new) in place, with m_new = max(m_old, max_j s), the running
//                 sum l = l exp(m_old - m_new) + sum_j p and the output rows o rescaled by exp(m_old - m_new).
//                 A row whose scores are all -inf so far (masked) stays empty: p = 0, m = -inf, l = 0.
//   backward tile: p = exp(s - lse) in place (masked -inf and empty rows with lse = +inf give 0) and
//                 ds = p (dp - delta) in place.
#pragma once

#include <cstdint>
#include <limits>

#include "cpu_dispatch.h"
#include "cpu_math.h"

namespace torchnova {
namespace cpu {

template <typename T>
TORCHNOVA_INLINE void online_softmax_tile(T* scores, int64_t ld, int64_t rows, int64_t cols, T* row_max, T* row_sum,
                                          T* out_rows, int64_t ld_out, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = scores + r * ld;
    T block_max = row_max[r];
#pragma omp simd reduction(max : block_max)
    for (int64_t j = 0; j < cols; ++j) block_max = row[j] > block_max ? row[j] : block_max;
    if (block_max == -std::numeric_limits<T>::infinity()) {  // nothing visible in this row yet
      for (int64_t j = 0; j < cols; ++j) row[j] = T(0);
      continue;
    }
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      row[j] = exp_nonpositive(row[j] - block_max);
      sum += row[j];
    }
    const T rescale = exp_nonpositive(row_max[r] - block_max);  // 0 on the row's first visible tile
    if (rescale != T(1)) {
      T* o = out_rows + r * ld_out;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] *= rescale;
    }
    row_sum[r] = row_sum[r] * rescale + sum;
    row_max[r] = block_max;
  }
}

template <typename T>
TORCHNOVA_INLINE void softmax_grad_tile(T* probs, T* dscores, int64_t ld, int64_t rows, int64_t cols,
                                        const T* row_lse, const T* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    T *p = probs + r * ld, *ds = dscores + r * ld;
    const T l = row_lse[r], dl = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      p[j] = exp_nonpositive(p[j] - l);
      ds[j] = p[j] * (ds[j] - dl);
    }
  }
}

}  // namespace cpu
}  // namespace torchnova
