// Runtime ISA dispatch for the CPU kernels: the hot loops are force-inlined into two copies, one compiled for
// AVX2+FMA (taken when the CPU has them) and one for the baseline ISA (SSE2 on x86-64), so a wheel built for
// generic x86-64 still runs 8-wide on modern CPUs. Inlining a baseline function into an AVX2 function is
// allowed, the reverse is not: everything the loops call is TORCHNOVA_INLINE, and the loop bodies are
// lambdas marked TORCHNOVA_LAMBDA_INLINE.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#define TORCHNOVA_INLINE __attribute__((always_inline)) inline
#define TORCHNOVA_LAMBDA_INLINE __attribute__((always_inline))

namespace torchnova {
namespace cpu {

template <typename Body>
void run_baseline(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Body>
__attribute__((target("avx2,fma"))) void run_avx2(const Body& body, int64_t begin, int64_t end) {
  body(begin, end);
}
inline const bool kCpuHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

// at::parallel_for (OpenMP in PyTorch's builds) over [0, n) in chunks of at least ``grain``, each chunk run by
// the best compiled copy of ``body(begin, end)``.
template <typename Body>
void parallel_for_isa(int64_t n, int64_t grain, const Body& body) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (kCpuHasAvx2) return run_avx2(body, begin, end);
#endif
    run_baseline(body, begin, end);
  });
}

}  // namespace cpu
}  // namespace torchnova
