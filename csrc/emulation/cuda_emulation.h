// CUDA emulation layer (test-only): the device-side API that lets the CUDA kernel sources (csrc/cuda/*.cu,
// spacetime_common.cuh, dual_channel_visibility.h) compile as host C++ and run on CPU tensors.
// See docs/cuda_emulation.md for the design, what is checked and what cannot be.
//
// Compiled only into torchnova._C_cuda_emu (setup.py, TORCHNOVA_CUDA_EMULATION=1). Each csrc/emulation/emu_*.cpp
// includes this header, then one .cu file: the kernel source is the same text nvcc compiles, never a copy.
//
// How a launch runs (cuda_emulation.cpp): blocks one after another; the threads of a block are fibers
// (POSIX ucontext: no dependency, in glibc; Boost.Context would be faster per switch but adds a library for a
// test layer), run in order until each blocks at __syncthreads, at a warp collective (__shfl_*_sync, votes,
// __syncwarp) or exits. A collective completes when every lane its mask names has arrived at it; a barrier when
// every thread of the block has. When no fiber can run and the block is not finished, the launch fails with an
// error naming the kernel, block and thread (an exited thread the barrier waits for, a mask naming a lane that
// exited or waits elsewhere), instead of hanging.
//
// Memory: static __shared__ variables are block-scope thread_local (one copy per OS thread; the fibers of a
// block share their OS thread and blocks of one OS thread run one after another, so each running block has its
// own copy, as on a GPU). Dynamic shared memory (`extern __shared__ float smem[]`) is a thread_local buffer of
// the device's opt-in size, defined by the emu_*.cpp wrapper; it is filled with 0xFF bytes (NaN in every float
// format) before each block so reads of unwritten shared memory show up as NaN, and the bytes past the
// launch's dynamic size are checked after the block (a write past the end is an error).
#pragma once

// Every header the kernel sources include comes first, before the keyword macros below, so that the macros
// touch only the kernel source (the later #includes of the .cu files are then no-ops).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef TORCHNOVA_CUDA_EMULATION
#define TORCHNOVA_CUDA_EMULATION 1
#endif

// ---------------------------------------------------------------------------------------------------------------
// Built-in vector types and indices.

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) float2 {
  float x, y;
};

namespace torchnova_emu {
// Set by the scheduler before it switches to a fiber (threadIdx) or starts a block (the others).
extern __thread uint3 tl_thread_idx;
extern __thread uint3 tl_block_idx;
extern __thread dim3 tl_block_dim;
extern __thread dim3 tl_grid_dim;
}  // namespace torchnova_emu

#define threadIdx (static_cast<const uint3&>(::torchnova_emu::tl_thread_idx))
#define blockIdx (static_cast<const uint3&>(::torchnova_emu::tl_block_idx))
#define blockDim (static_cast<const dim3&>(::torchnova_emu::tl_block_dim))
#define gridDim (static_cast<const dim3&>(::torchnova_emu::tl_grid_dim))
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------------------
// Runtime entry points (cuda_emulation.cpp).

namespace torchnova_emu {

enum class WarpOpKind : int {
  kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp,
  kMma, kLdmatrix  // the tensor-core twins below: `bits` points at the lane's operands, `arg` names the variant
};

// A warp collective of the calling fiber: waits until every lane of `mask` has arrived at the same collective,
// returns this lane's result (shuffled bits, or the vote). Throws on a bad mask.
uint64_t warp_collective(WarpOpKind kind, unsigned mask, uint64_t bits, int arg, int width);
// __syncthreads of the calling fiber.
void block_barrier();

// The emulated twins of the tensor-core instructions (csrc/cuda/tensor_core.cuh has their PTX and the fragment
// layouts): warp collectives of the full warp, computed when all 32 lanes have arrived.
enum class MmaKind : int { kM16N8K16F16, kM16N8K16BF16, kM16N8K8TF32 };
// D = A * B + C of one m16n8k16 / m16n8k8 tile; this lane's fragments.
void tensor_core_mma(MmaKind kind, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: `shared_row` is this lane's row address.
void tensor_core_ldmatrix(int matrices, bool transpose, uint32_t* r, const void* shared_row);
// cp.async of `bytes` (16) bytes, `src_bytes` of them read from `global`, the rest zero: queued on the calling
// thread and carried out at the cp_async_wait that waits for its group.
void cp_async(void* shared, const void* global, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int newer_groups_allowed);
// cvt.rna.tf32.f32 as bits.
uint32_t float_to_tf32_bits(float x);

// The race check: between synchronisation points the fibers of a block run one after another, in thread order
// (default) or in reverse thread order. A shared-memory race (a word written by one thread and read or written by
// another with no barrier between) gives results that depend on that order; tests run kernels both ways and compare.
void set_reverse_schedule(bool reverse);
bool reverse_schedule();
// Throws a c10::Error naming the current kernel, block and thread (or the host context), with `what`.
[[noreturn]] void device_error(const std::string& what);

// A launch: `body(ctx)` is run once per thread of every block.
struct LaunchSpec {
  const char* kernel_name;
  const void* kernel_address;  // for cudaFuncSetAttribute's opt-in
  dim3 grid, block;
  size_t dynamic_smem_bytes;
  void* (*dynamic_smem_base)();  // the calling OS thread's dynamic shared buffer
  size_t dynamic_smem_capacity;
  void (*body)(void* ctx);
  void* ctx;
};
void launch(const LaunchSpec& spec);

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize): recorded per kernel, checked at launch like the driver does.
void set_max_dynamic_smem(const void* kernel_address, int bytes);

struct DeviceProperties;
const DeviceProperties* device_properties();

template <typename... Params>
struct Launcher {
  const char* name;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  void* (*smem_base)();
  size_t smem_capacity;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    // The arguments converted once to the parameter types, as the launch copies them; each thread gets a copy.
    std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
    struct Ctx {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...>* params;
    } ctx{kernel, &params};
    LaunchSpec spec{name, reinterpret_cast<const void*>(kernel), grid, block, smem, smem_base, smem_capacity,
                    [](void* raw) {
                      auto* c = static_cast<Ctx*>(raw);
                      std::apply(c->kernel, *c->params);
                    },
                    &ctx};
    launch(spec);
  }
};

// The stream is accepted and ignored: launches run synchronously, in order.
template <typename... Params, typename Stream>
Launcher<Params...> make_launcher(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                  const Stream& /*stream*/, void* (*smem_base)(), size_t smem_capacity) {
  return {name, kernel, grid, block, smem, smem_base, smem_capacity};
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move at most 64-bit values");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Bit-exact reinterpretation (memcpy, no aliasing questions).
template <typename To, typename From>
To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

}  // namespace torchnova_emu

// ---------------------------------------------------------------------------------------------------------------
// Kernel launch: the .cu files write TORCHNOVA_LAUNCH_KERNEL(grid, block, smem, stream, kernel)(args...)
// (csrc/cuda/cuda_launch.cuh), which is kernel<<<grid, block, smem, stream>>>(args...) under nvcc.
// `torchnova_emu_dynamic_smem` / `kTorchnovaEmuDynamicSmemBytes` are defined by each emu_*.cpp wrapper.
#define TORCHNOVA_EMU_STR_(x) #x
#define TORCHNOVA_EMU_STR(x) TORCHNOVA_EMU_STR_(x)
#define TORCHNOVA_LAUNCH_KERNEL(grid, block, smem_bytes, stream, ...)                                            \
  ::torchnova_emu::make_launcher(#__VA_ARGS__ " (launched at " __FILE__ ":" TORCHNOVA_EMU_STR(__LINE__) ")",       \
                                 __VA_ARGS__, dim3(grid), dim3(block), size_t(smem_bytes), stream,                \
                                 &torchnova_emu_dynamic_smem, kTorchnovaEmuDynamicSmemBytes)

// ---------------------------------------------------------------------------------------------------------------
// Keywords.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __constant__ const
#define __align__(n) alignas(n)

// The host-side device checks of the kernel files (x.is_cuda()) accept CPU tensors: the emulated "device" is the
// CPU. Defined after the ATen headers, so only the kernel sources' calls are renamed.
#define is_cuda() is_cpu()

// ---------------------------------------------------------------------------------------------------------------
// Synchronisation, warp collectives.

inline void __syncthreads() { ::torchnova_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::torchnova_emu::warp_collective(::torchnova_emu::WarpOpKind::kSyncWarp, mask, 0, 0, 32);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::torchnova_emu::from_bits<T>(::torchnova_emu::warp_collective(
      ::torchnova_emu::WarpOpKind::kShflIdx, mask, ::torchnova_emu::to_bits(var), src_lane, width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::torchnova_emu::from_bits<T>(::torchnova_emu::warp_collective(
      ::torchnova_emu::WarpOpKind::kShflXor, mask, ::torchnova_emu::to_bits(var), lane_mask, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::torchnova_emu::from_bits<T>(::torchnova_emu::warp_collective(
      ::torchnova_emu::WarpOpKind::kShflUp, mask, ::torchnova_emu::to_bits(var), int(delta), width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::torchnova_emu::from_bits<T>(::torchnova_emu::warp_collective(
      ::torchnova_emu::WarpOpKind::kShflDown, mask, ::torchnova_emu::to_bits(var), int(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return unsigned(
      ::torchnova_emu::warp_collective(::torchnova_emu::WarpOpKind::kBallot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  return int(::torchnova_emu::warp_collective(::torchnova_emu::WarpOpKind::kAny, mask, predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  return int(::torchnova_emu::warp_collective(::torchnova_emu::WarpOpKind::kAll, mask, predicate != 0, 0, 32));
}

// ---------------------------------------------------------------------------------------------------------------
// Atomics: real atomics (std::atomic_ref), so they stay correct if blocks ever run on several OS threads.

template <typename T>
inline T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return std::atomic_ref<T>(*address).fetch_add(value);
  } else {
    std::atomic_ref<T> ref(*address);
    T old = ref.load();
    while (!ref.compare_exchange_weak(old, old + value)) {
    }
    return old;
  }
}
template <typename T>
inline T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (value < old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}

// ---------------------------------------------------------------------------------------------------------------
// Cache-hinted loads / stores: plain accesses (the alignment of the pointed-to type is checked by
// -fsanitize=alignment in the emulation build).

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldlu(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwt(T* p, T v) {
  *p = v;
}

// ---------------------------------------------------------------------------------------------------------------
// Math. The fast-math intrinsics are computed exactly (libm), not with the device's error bound
// (__expf: 2 + 1.16 |x| ulp on the GPU): the emulation checks indexing and logic, not the last ulps.

inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float exp2f_device(float x) { return std::exp2(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

inline float __uint_as_float(unsigned x) { return torchnova_emu::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return torchnova_emu::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return torchnova_emu::bit_cast<float>(x); }
inline int __float_as_int(float x) { return torchnova_emu::bit_cast<int>(x); }
inline double __longlong_as_double(long long x) { return torchnova_emu::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return torchnova_emu::bit_cast<long long>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's min / max overloads for mixed integer and floating types.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}

// ---------------------------------------------------------------------------------------------------------------
// 16-bit floating point (cuda_fp16.h, cuda_bf16.h): the bit layouts of the CUDA types, conversions
// round-to-nearest-even through c10's (bit-exact) conversions.

struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(c10::Half(f).x) {}
  operator float() const { return float(c10::Half(__x, c10::Half::from_bits())); }
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(c10::BFloat16(f).x) {}
  operator float() const { return float(c10::BFloat16(__x, c10::BFloat16::from_bits())); }
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using half = __half;
using half2 = __half2;

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }

namespace torchnova_emu {
// __hmax semantics: a NaN operand yields the other operand (two NaNs: canonical NaN); +0 > -0. The max of two
// values of the format is one of them, so computing in float is exact.
inline float hmax_float(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  if (std::isnan(a)) return b;
  if (std::isnan(b)) return a;
  if (a == b) return std::signbit(a) ? b : a;
  return a > b ? a : b;
}
inline float hmin_float(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  if (std::isnan(a)) return b;
  if (std::isnan(b)) return a;
  if (a == b) return std::signbit(a) ? a : b;
  return a < b ? a : b;
}
}  // namespace torchnova_emu

inline __half __hmax(__half a, __half b) { return __half(torchnova_emu::hmax_float(float(a), float(b))); }
inline __half __hmin(__half a, __half b) { return __half(torchnova_emu::hmin_float(float(a), float(b))); }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat16(torchnova_emu::hmax_float(float(a), float(b)));
}
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat16(torchnova_emu::hmin_float(float(a), float(b)));
}
inline __half2 __hmax2(__half2 a, __half2 b) { return {__hmax(a.x, b.x), __hmax(a.y, b.y)}; }
inline __half2 __hmin2(__half2 a, __half2 b) { return {__hmin(a.x, b.x), __hmin(a.y, b.y)}; }
inline __nv_bfloat162 __hmax2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmax(a.x, b.x), __hmax(a.y, b.y)}; }
inline __nv_bfloat162 __hmin2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmin(a.x, b.x), __hmin(a.y, b.y)}; }

// ---------------------------------------------------------------------------------------------------------------
// Host-side runtime API the kernel files use (ATen/cuda/CUDAContext.h, c10/cuda/*.h are shimmed to this header
// by csrc/emulation/shim).

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }

// The emulated device: an sm_90 (H100 SXM) by default; tests may change it (set_device_properties).
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int maxThreadsPerBlock;
  int warpSize;
};
namespace torchnova_emu {
struct DeviceProperties : cudaDeviceProp {};
}  // namespace torchnova_emu

template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    ::torchnova_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}

namespace at {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() {
  return const_cast<::torchnova_emu::DeviceProperties*>(::torchnova_emu::device_properties());
}
inline cudaDeviceProp* getDeviceProperties(int) { return getCurrentDeviceProperties(); }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace cuda
}  // namespace at
namespace c10 {
namespace cuda {
using at::cuda::CUDAGuard;
using at::cuda::OptionalCUDAGuard;
inline c10::DeviceIndex current_device() { return 0; }  // the one emulated device
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(EXPR)                                                                          \
  do {                                                                                                \
    const cudaError_t torchnova_emu_err = (EXPR);                                                     \
    TORCH_CHECK(torchnova_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(torchnova_emu_err)); \
  } while (0)
// Launch errors are thrown by the emulated launch itself.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

// ---------------------------------------------------------------------------------------------------------------
// Registration: the kernel files' TORCH_LIBRARY_IMPL(torchnova, CUDA, m) blocks register their host functions as
// the CPU kernels of torchnova::<op>_cuda_emu instead (schemas: cuda_emulation_module.cpp), so this module never
// touches the real ops, and the Python layer picks the _cuda_emu ops only inside testing.cuda_emulation().
namespace torchnova_emu {
// A copy of `t` in memory from the guarded allocator (its last byte against a guard page, same sizes and
// strides), so the kernels' out-of-bounds reads of inputs fault too, wherever the caller allocated them (outside
// cuda_emulation(), or a view into a larger buffer). Tensors whose elements overlap (expanded, stride 0) are passed
// as they are.
void set_guarded_allocation(bool enabled, bool exact_ends);
at::Tensor guarded_copy(const at::Tensor& t);
inline std::optional<at::Tensor> guarded_copy(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return guarded_copy(*t);
}
template <typename T>
decltype(auto) guarded_copy(T&& value) {
  return std::forward<T>(value);
}

class SuffixedImpl {
 public:
  // Registers `fn` (a host function of a .cu file) as the CPU kernel of torchnova::<name>_cuda_emu, its tensor
  // arguments first copied to guarded memory (guarded_copy).
  template <typename R, typename... Args>
  SuffixedImpl& impl(const char* name, R (*fn)(Args...)) {
    library().impl((std::string(name) + "_cuda_emu").c_str(),
                   [fn](Args... args) -> R { return fn(guarded_copy(args)...); });
    return *this;
  }

 private:
  static torch::Library& library();
};
}  // namespace torchnova_emu

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m)                                                                   \
  static void torchnova_emu_register(::torchnova_emu::SuffixedImpl&);                                  \
  static const int torchnova_emu_registered = [] {                                                     \
    ::torchnova_emu::SuffixedImpl lib;                                                                 \
    torchnova_emu_register(lib);                                                                       \
    return 0;                                                                                          \
  }();                                                                                                 \
  static void torchnova_emu_register(::torchnova_emu::SuffixedImpl& m)
