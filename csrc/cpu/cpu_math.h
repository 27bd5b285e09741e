// Vectorizable math for the CPU kernels (inlined into both ISA copies of csrc/cpu/cpu_dispatch.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_dispatch.h"

namespace torchnova {
namespace cpu {

// exp(x) for x <= 0 (all our arguments are logit - running max), in a form GCC vectorizes.
// Returns exactly 0 for x < -87 (below float's normal range) and for x = -inf.
TORCHNOVA_INLINE float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // k = round(x / ln 2) by the 1.5 * 2^23 trick (vectorizes without SSE4.1 round instructions).
  const float shifter = 12582912.0f;
  const float kf = (xc * 1.44269504088896341f + shifter) - shifter;
  // r = x - k ln2, ln2 split in two so the reduction is exact for |k| <= 127.
  float r = xc - kf * 0.693359375f;
  r = r + kf * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : y * scale;
}

TORCHNOVA_INLINE double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace torchnova
