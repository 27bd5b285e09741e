// Runtime ISA dispatch for the CPU kernels: the hot loops are force-inlined into three copies, one compiled for
// AVX-512 (F/VL/BW/DQ, 512-bit vectors preferred), one for AVX2+FMA and one for the baseline ISA (SSE2 on
// x86-64), so a wheel built for generic x86-64 still runs 16-wide on CPUs that have AVX-512. The best copy the
// CPU supports is taken, capped by TORCHNOVA_CPU_ISA=avx512|avx2|baseline at load time or set_active_isa()
// (tests run every copy). Inlining a baseline function into an AVX2/AVX-512 function is allowed, the reverse
// is not: everything the loops call is TORCHNOVA_INLINE, and the loop bodies are lambdas marked
// TORCHNOVA_LAMBDA_INLINE.
//
// A body is called as body(begin, end, isa) when it takes the ISA tag (IsaBaseline / IsaAvx2 / IsaAvx512,
// whose kVectorBytes sizes the register tiles of tile_gemm.h), else as body(begin, end).
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#define TORCHNOVA_INLINE __attribute__((always_inline)) inline
#define TORCHNOVA_LAMBDA_INLINE __attribute__((always_inline))

namespace torchnova {
namespace cpu {

struct IsaBaseline {
  static constexpr int kVectorBytes = 16;  // SSE2's registers: wider generic vectors would spill the tiles
};
struct IsaAvx2 {
  static constexpr int kVectorBytes = 32;
};
struct IsaAvx512 {
  static constexpr int kVectorBytes = 64;
};

enum Isa : int { kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
inline constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

inline int supported_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int best = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
      return int(kIsaAvx512);
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int(kIsaAvx2);
    return int(kIsaBaseline);
  }();
  return best;
#else
  return kIsaBaseline;
#endif
}

// -1 for an unknown name.
inline int isa_from_name(const char* name) {
  for (int i = 0; i <= kIsaAvx512; ++i) {
    if (std::strcmp(name, kIsaNames[i]) == 0) return i;
  }
  return -1;
}

inline std::atomic<int>& active_isa_slot() {
  static std::atomic<int> slot{[] {
    int isa = supported_isa();
    if (const char* cap = std::getenv("TORCHNOVA_CPU_ISA")) {
      const int wanted = isa_from_name(cap);
      if (wanted >= 0 && wanted < isa) isa = wanted;
    }
    return isa;
  }()};
  return slot;
}

inline int active_isa() { return active_isa_slot().load(std::memory_order_relaxed); }

// Returns false (and changes nothing) when the CPU lacks `isa`.
inline bool set_active_isa(int isa) {
  if (isa < 0 || isa > supported_isa()) return false;
  active_isa_slot().store(isa, std::memory_order_relaxed);
  return true;
}

template <typename Tag, typename Body>
TORCHNOVA_INLINE void invoke_body(const Body& body, int64_t begin, int64_t end) {
  if constexpr (std::is_invocable_v<const Body&, int64_t, int64_t, Tag>) {
    body(begin, end, Tag{});
  } else {
    body(begin, end);
  }
}

template <typename Body>
void run_baseline(const Body& body, int64_t begin, int64_t end) {
  invoke_body<IsaBaseline>(body, begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Body>
__attribute__((target("avx2,fma"))) void run_avx2(const Body& body, int64_t begin, int64_t end) {
  invoke_body<IsaAvx2>(body, begin, end);
}
template <typename Body>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512"))) void run_avx512(
    const Body& body, int64_t begin, int64_t end) {
  invoke_body<IsaAvx512>(body, begin, end);
}
#endif

// at::parallel_for (OpenMP in PyTorch's builds) over [0, n) in chunks of at least ``grain``, each chunk run by
// the active compiled copy of ``body``.
template <typename Body>
void parallel_for_isa(int64_t n, int64_t grain, const Body& body) {
  const int isa = active_isa();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == kIsaAvx512) return run_avx512(body, begin, end);
    if (isa == kIsaAvx2) return run_avx2(body, begin, end);
#endif
    run_baseline(body, begin, end);
  });
}

}  // namespace cpu
}  // namespace torchnova
