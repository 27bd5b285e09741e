// Tensor-core building blocks for sm_80+: mma.sync, ldmatrix and cp.async, one small device function each.
//
// Under nvcc each function is one inline-PTX instruction. Under the CUDA emulation layer (TORCHNOVA_CUDA_EMULATION,
// csrc/emulation) each has an emulated twin in the layer's runtime that implements the PTX ISA's definition as a
// warp collective of the block's fibers: the same fragment layouts, the full-warp `.sync.aligned` requirement, the
// 16-byte alignment and shared-memory range of ldmatrix rows, and cp.async as a checked copy that lands in shared
// memory only at the matching cp_async_wait (so a kernel that reads a tile before waiting reads the stale tile
// there too). Kernels use only these functions for tensor-core work, never inline PTX of their own.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" / "mma.m16n8k8"), per lane of the warp with
// group = lane / 4 and quad = lane % 4; a b32 register holds two 16-bit elements, the lower column (or k) in the
// low half:
//   m16n8k16 (f16 / bf16 inputs, fp32 accumulate)          D(16x8) = A(16x16) * B(16x8) + C(16x8)
//     A, row major, 4 x b32: a[0] = A[group][2quad, 2quad+1]      a[1] = A[group+8][2quad, 2quad+1]
//                            a[2] = A[group][2quad+8, 2quad+9]    a[3] = A[group+8][2quad+8, 2quad+9]
//     B, "col" (k-major per column), 2 x b32: b[0] = B[2quad, 2quad+1][group]   b[1] = B[2quad+8, 2quad+9][group]
//     C, D fp32, 4 x f32: c[0], c[1] = C[group][2quad, 2quad+1]    c[2], c[3] = C[group+8][2quad, 2quad+1]
//   m16n8k8 (tf32 inputs in b32 registers, fp32 accumulate)  D(16x8) = A(16x8) * B(8x8) + C(16x8)
//     A: a[0] = A[group][quad]  a[1] = A[group+8][quad]  a[2] = A[group][quad+4]  a[3] = A[group+8][quad+4]
//     B: b[0] = B[quad][group]  b[1] = B[quad+4][group]          C, D: as m16n8k16
//   ldmatrix .m8n8 .b16, .x1/.x2/.x4: matrix j (of 1/2/4) has its 8 rows of 16 bytes at the shared addresses given
//     by lanes 8j..8j+7 (row r by lane 8j+r; every row address 16-byte aligned). Each lane receives, for matrix j,
//     r[j] = M_j[lane/4][2(lane%4), 2(lane%4)+1]; with .trans, r[j] = M_j[2(lane%4), 2(lane%4)+1][lane/4].
//     So ldmatrix_x4 of a row-major 16x16 tile (matrices: rows 0-7 / 8-15 x cols 0-7 / 8-15 in the order
//     (0,0), (8,0), (0,8), (8,8)) is exactly the A fragment, and ldmatrix .trans of a row-major k x n tile gives B.
//   cp.async.cg 16 bytes: copies `src_bytes` (0..16) bytes from global memory and zero-fills the rest of the 16
//     shared bytes; both addresses 16-byte aligned. Completes at cp_async_wait<N>() once at most N newer committed
//     groups are pending. With src_bytes == 0 nothing is read, but `global` must still be a valid address.
#pragma once

#include <cstdint>

#if defined(TORCHNOVA_CUDA_EMULATION)
// The emulated twins (csrc/emulation/cuda_emulation.h declares torchnova_emu::tensor_core_*).
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace torchnova {
namespace tc {

#if defined(TORCHNOVA_CUDA_EMULATION)

__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
  ::torchnova_emu::tensor_core_mma(::torchnova_emu::MmaKind::kM16N8K16F16, d, a, b, c);
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
  ::torchnova_emu::tensor_core_mma(::torchnova_emu::MmaKind::kM16N8K16BF16, d, a, b, c);
}
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
  ::torchnova_emu::tensor_core_mma(::torchnova_emu::MmaKind::kM16N8K8TF32, d, a, b, c);
}
template <int kMatrices, bool kTranspose>
__device__ __forceinline__ void ldmatrix(uint32_t r[kMatrices], const void* shared_row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix loads 1, 2 or 4 matrices");
  ::torchnova_emu::tensor_core_ldmatrix(kMatrices, kTranspose, r, shared_row);
}
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, int src_bytes) {
  ::torchnova_emu::cp_async(shared, global, 16, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::torchnova_emu::cp_async_commit(); }
template <int kNewerGroupsAllowed>
__device__ __forceinline__ void cp_async_wait() {
  ::torchnova_emu::cp_async_wait(kNewerGroupsAllowed);
}
// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (the low 13 bits become 0).
__device__ __forceinline__ uint32_t float_to_tf32(float x) { return ::torchnova_emu::float_to_tf32_bits(x); }

#else  // nvcc

// Tensor cores need sm_80; the builds for older targets (none in the default list) get a trap, not a wrong result.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define TORCHNOVA_TC_UNSUPPORTED_ARCH 1
#endif

__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
#if defined(TORCHNOVA_TC_UNSUPPORTED_ARCH)
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
#if defined(TORCHNOVA_TC_UNSUPPORTED_ARCH)
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
#if defined(TORCHNOVA_TC_UNSUPPORTED_ARCH)
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

template <int kMatrices, bool kTranspose>
__device__ __forceinline__ void ldmatrix(uint32_t r[kMatrices], const void* shared_row) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(TORCHNOVA_TC_UNSUPPORTED_ARCH)
  __trap();
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared_row));
  if constexpr (kMatrices == 1 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  } else if constexpr (kMatrices == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
  } else if constexpr (kMatrices == 2 && !kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  } else if constexpr (kMatrices == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
  } else if constexpr (!kTranspose) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

__device__ __forceinline__ void cp_async_16(void* shared, const void* global, int src_bytes) {
#if defined(TORCHNOVA_TC_UNSUPPORTED_ARCH)
  __trap();
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(TORCHNOVA_TC_UNSUPPORTED_ARCH)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kNewerGroupsAllowed>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(TORCHNOVA_TC_UNSUPPORTED_ARCH)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kNewerGroupsAllowed));
#endif
}

__device__ __forceinline__ uint32_t float_to_tf32(float x) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(bits) : "f"(x));
  return bits;
}

#endif  // TORCHNOVA_CUDA_EMULATION

// Two floats rounded (nearest even) to 16-bit values and packed into one b32 register, `low` in the low half: the
// layout of every A/B fragment register above (e.g. P converted for the P*V product).
template <typename Half2>
__device__ __forceinline__ uint32_t pack_two(float low, float high);
template <>
__device__ __forceinline__ uint32_t pack_two<__half2>(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}
template <>
__device__ __forceinline__ uint32_t pack_two<__nv_bfloat162>(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

}  // namespace tc
}  // namespace torchnova
