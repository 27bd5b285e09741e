// Vectorizable math for the CPU kernels (inlined into every ISA copy of csrc/cpu/cpu_dispatch.h).
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

// log(x) for a finite normal x > 0 (softmax denominators, >= 1), in a form GCC vectorizes (std::log is a call
// per element). Cephes logf: x = 2^e m with m in [sqrt(1/2), sqrt(2)), a degree-9 polynomial in m - 1;
// relative error ~1e-7.
TORCHNOVA_INLINE float log_positive(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;      // x = 2^e m, m in [1/2, 1)
  bits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool below = m < 0.707106781186547524f;  // move m into [sqrt(1/2), sqrt(2))
  e = below ? e - 1 : e;
  m = below ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

TORCHNOVA_INLINE double log_positive(double x) { return std::log(x); }

}  // namespace cpu
}  // namespace torchnova
