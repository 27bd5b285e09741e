// CUDA emulation build only: small kernels, compiled only into torchnova._C_cuda_emu, that test the emulation
// layer itself (tests/test_cuda_emulation.py, tests/test_tensor_core_twins.py): warp collectives against their
// definitions, the tensor-core twins (mma.sync fed by ldmatrix and cp.async, the way the attention kernels use
// them, against a matrix product), a shared-memory race the two schedules disagree on, and deliberately
// broken kernels proving that a barrier some thread never reaches, a shuffle mask naming a lane that did not
// arrive, out-of-bounds shared / register-array indices and misaligned 16-byte loads are errors, not hangs or
// silent garbage.
#include <torch/extension.h>

#include "emulation/cuda_emulation.h"
#include "emulation/dynamic_smem.h"
// After the emulation header, as in the emu_*.cpp wrappers: the tensor-core functions call its twins.
#include "cuda/tensor_core.cuh"

#include <string>

namespace torchnova {
namespace {

// out[t] for thread t of one block: the results of every collective (see shuffle_results).
__global__ void warp_collectives_kernel(int* __restrict__ out,  // (threads, 6) contiguous
                                        int width) {
  const int t = threadIdx.x;
  const unsigned full = 0xffffffffu;
  int* row = out + t * 6;
  row[0] = __shfl_sync(full, t * 10, 3, width);
  row[1] = __shfl_xor_sync(full, t * 10, 1, width);
  row[2] = __shfl_up_sync(full, t * 10, 2, width);
  row[3] = __shfl_down_sync(full, t * 10, 2, width);
  row[4] = int(__ballot_sync(full, t % 3 == 0));
  row[5] = __all_sync(full, t < 1000) + 2 * __any_sync(full, t == 5);
  __syncwarp();
}

// One thread leaves before the barrier the others wait at.
__global__ void barrier_deadlock_kernel(float* __restrict__ out, int leaving_thread) {
  if (int(threadIdx.x) == leaving_thread) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// mode 0: the block has 48 threads, so the second warp has 16 lanes and the full mask names absent lanes;
// mode 1: lane 3 exits before the shuffle; mode 2: the mask leaves out the calling lane.
__global__ void bad_shuffle_kernel(float* __restrict__ out, int mode) {
  const int t = threadIdx.x;
  if (mode == 1 && t == 3) return;
  const unsigned mask = mode == 2 ? 0xfffffffeu : 0xffffffffu;
  out[t] = __shfl_xor_sync(mask, float(t), 1);
}

// Static shared memory indexed one past its end by the last thread.
__global__ void shared_out_of_bounds_kernel(float* __restrict__ out, int offset) {
  __shared__ float tile[32];
  tile[threadIdx.x + offset] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

// A 16-byte vector load from `in + offset` floats: misaligned unless offset % 4 == 0 (for an aligned `in`).
__global__ void vector_load_kernel(const float* __restrict__ in, float* __restrict__ out, int offset) {
  const uint4 bits = *reinterpret_cast<const uint4*>(in + offset + 4 * threadIdx.x);
  out[threadIdx.x] = __uint_as_float(bits.x);
}

// Dynamic shared memory written one float past the launch's size.
__global__ void dynamic_smem_overflow_kernel(float* __restrict__ out, int floats) {
  extern __shared__ float smem[];
  if (threadIdx.x == 0) smem[floats] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = 0.0f;
}

// Reads dynamic shared memory no thread wrote: NaN (the emulation fills it with 0xFF bytes).
__global__ void dynamic_smem_unwritten_kernel(float* __restrict__ out) {
  extern __shared__ float smem[];
  out[threadIdx.x] = smem[threadIdx.x];
}

// Thread i copies in[i + offset]: past the end of `in` for offset > 0 (a read into the guard page when `in` was
// allocated inside cuda_emulation()).
__global__ void shifted_copy_kernel(const float* __restrict__ in, float* __restrict__ out, int offset) {
  out[threadIdx.x] = in[int(threadIdx.x) + offset];
}

// ---- tensor-core twins -------------------------------------------------------------------------------------
// One warp computes, with the canonical addressing of FlashAttention-style kernels:
//   scores = A * K^T + C   (A 16x16 row major, K 8x16 row major: B operand from K rows, ldmatrix without .trans)
//   mixed  = A * V + C     (V 16x8 row major: B operand through ldmatrix .trans)
// Tiles are staged in dynamic shared memory by cp.async (16-byte chunks), rows padded to `row_halves` 16-bit
// elements. mode 1: A's row addresses shifted by 8 bytes (misaligned ldmatrix rows, an error); mode 2: lanes 16-31
// skip the mma (a divergent .sync.aligned instruction, an error).
template <typename Half2>
__global__ void ldmatrix_mma_kernel(const uint16_t* __restrict__ a,  // (16, 16) contiguous 16-bit bits
                                    const uint16_t* __restrict__ k,  // (8, 16)
                                    const uint16_t* __restrict__ v,  // (16, 8)
                                    const float* __restrict__ c,     // (16, 8)
                                    float* __restrict__ out,         // (2, 16, 8): scores, mixed
                                    int mode) {
  extern __shared__ float smem[];
  constexpr int kRow = 24;  // 16-bit elements per shared row: 48 bytes, a multiple of 16
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sk = sa + 16 * kRow;
  uint16_t* sv = sk + 8 * kRow;
  const int lane = threadIdx.x;
  // 16x16 A: 32 chunks of 8 elements; K 8x16: 16 chunks; V 16x8: 16 chunks.
  tc::cp_async_16(sa + (lane / 2) * kRow + (lane % 2) * 8, a + lane * 8, 16);
  if (lane < 16) tc::cp_async_16(sk + (lane / 2) * kRow + (lane % 2) * 8, k + lane * 8, 16);
  if (lane < 16) tc::cp_async_16(sv + lane * kRow, v + lane * 8, 16);
  tc::cp_async_commit();
  tc::cp_async_wait<0>();
  __syncwarp();
  uint32_t a_frag[4], k_frag[2], v_frag[2];
  const int misalign = mode == 1 ? 4 : 0;
  tc::ldmatrix<4, false>(a_frag, sa + (lane % 16) * kRow + (lane / 16) * 8 + misalign);
  tc::ldmatrix<2, false>(k_frag, sk + (lane % 8) * kRow + ((lane / 8) % 2) * 8);
  tc::ldmatrix<2, true>(v_frag, sv + (lane % 16) * kRow);
  const int group = lane / 4, quad = lane % 4;
  float c_frag[4], d[4];
  for (int reg = 0; reg < 4; ++reg) c_frag[reg] = c[(group + 8 * (reg / 2)) * 8 + 2 * quad + reg % 2];
  for (int product = 0; product < 2; ++product) {
    if (mode == 2 && lane >= 16) return;
    if constexpr (std::is_same_v<Half2, __half2>) {
      tc::mma_m16n8k16_f16(d, a_frag, product == 0 ? k_frag : v_frag, c_frag);
    } else {
      tc::mma_m16n8k16_bf16(d, a_frag, product == 0 ? k_frag : v_frag, c_frag);
    }
    for (int reg = 0; reg < 4; ++reg) out[product * 128 + (group + 8 * (reg / 2)) * 8 + 2 * quad + reg % 2] = d[reg];
  }
}

// D = A * B + C with m16n8k8 tf32, fragments read from global memory by the documented layout, the inputs
// converted by float_to_tf32 (cvt.rna).
__global__ void mma_tf32_kernel(const float* __restrict__ a,  // (16, 8)
                                const float* __restrict__ b,  // (8, 8)
                                const float* __restrict__ c,  // (16, 8)
                                float* __restrict__ out) {    // (16, 8)
  const int lane = threadIdx.x, group = lane / 4, quad = lane % 4;
  const uint32_t a_frag[4] = {tc::float_to_tf32(a[group * 8 + quad]), tc::float_to_tf32(a[(group + 8) * 8 + quad]),
                              tc::float_to_tf32(a[group * 8 + quad + 4]),
                              tc::float_to_tf32(a[(group + 8) * 8 + quad + 4])};
  const uint32_t b_frag[2] = {tc::float_to_tf32(b[quad * 8 + group]), tc::float_to_tf32(b[(quad + 4) * 8 + group])};
  float c_frag[4], d[4];
  for (int reg = 0; reg < 4; ++reg) c_frag[reg] = c[(group + 8 * (reg / 2)) * 8 + 2 * quad + reg % 2];
  tc::mma_m16n8k8_tf32(d, a_frag, b_frag, c_frag);
  for (int reg = 0; reg < 4; ++reg) out[(group + 8 * (reg / 2)) * 8 + 2 * quad + reg % 2] = d[reg];
}

// cp.async semantics: thread t copies 16 bytes (src_bytes of them from in + 4t, the rest zero) to shared memory.
// mode 0: reads the neighbour's shared copy after waiting and a barrier (the data); mode 1: its own copy without
// waiting (it has not landed: the 0xFF fill, NaN); mode 2: a misaligned global address (an error); mode 3: a destination past the launch's
// dynamic shared memory (an error).
__global__ void cp_async_kernel(const float* __restrict__ in,  // (4 * threads,)
                                float* __restrict__ out,       // (4 * threads,)
                                int src_bytes, int mode) {
  extern __shared__ float smem[];
  const int t = threadIdx.x;
  float* dst = smem + 4 * t + (mode == 3 ? 4 * blockDim.x : 0);
  tc::cp_async_16(dst, in + 4 * t + (mode == 2 ? 1 : 0), src_bytes);
  tc::cp_async_commit();
  if (mode != 1) tc::cp_async_wait<0>();
  __syncthreads();
  // Another thread's copy is visible after its wait and the barrier; mode 1 reads the thread's own copy.
  const int neighbour = mode == 1 ? t : (t + 1) % blockDim.x;
  for (int i = 0; i < 4; ++i) out[4 * t + i] = smem[4 * neighbour + i];
}

// ---- race check -------------------------------------------------------------------------------------------
// Thread t writes word t of shared memory and reads word t + 1, written by another thread: with the barrier
// (racy = 0) every schedule gives out[t] = t + 1; without it (racy = 1) the forward schedule reads the word before
// its writer ran (the 0xFF fill) and the reverse schedule after: the race check sees the two disagree.
__global__ void shared_race_kernel(int* __restrict__ out,  // (threads,)
                                   int racy) {
  extern __shared__ float smem[];
  int* words = reinterpret_cast<int*>(smem);
  const int t = threadIdx.x;
  words[t] = t + 1;
  if (!racy) __syncthreads();
  out[t] = words[(t + 1) % blockDim.x];
}

template <typename Half2>
at::Tensor ldmatrix_mma_impl(const at::Tensor& a, const at::Tensor& k, const at::Tensor& v, const at::Tensor& c,
                             int64_t mode) {
  at::Tensor out = at::zeros({2, 16, 8}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, 32, (16 + 8 + 16) * 24 * 2, nullptr, ldmatrix_mma_kernel<Half2>)(
      reinterpret_cast<const uint16_t*>(a.data_ptr()), reinterpret_cast<const uint16_t*>(k.data_ptr()),
      reinterpret_cast<const uint16_t*>(v.data_ptr()), c.data_ptr<float>(), out.data_ptr<float>(), int(mode));
  return out;
}

// a (16,16), k (8,16), v (16,8): float16 or bfloat16, contiguous; c (16,8) float32.
at::Tensor ldmatrix_mma(const at::Tensor& a, const at::Tensor& k, const at::Tensor& v, const at::Tensor& c,
                        int64_t mode) {
  TORCH_CHECK(a.is_contiguous() && k.is_contiguous() && v.is_contiguous() && c.is_contiguous() &&
                  c.scalar_type() == at::kFloat && a.scalar_type() == k.scalar_type() &&
                  a.scalar_type() == v.scalar_type(),
              "contiguous 16-bit a, k, v and float32 c");
  if (a.scalar_type() == at::kHalf) return ldmatrix_mma_impl<__half2>(a, k, v, c, mode);
  TORCH_CHECK(a.scalar_type() == at::kBFloat16, "float16 or bfloat16");
  return ldmatrix_mma_impl<__nv_bfloat162>(a, k, v, c, mode);
}

at::Tensor mma_tf32(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  at::Tensor out = at::zeros({16, 8}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, 32, 0, nullptr, mma_tf32_kernel)(a.data_ptr<float>(), b.data_ptr<float>(),
                                                             c.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor cp_async_copy(const at::Tensor& in, int64_t src_bytes, int64_t mode) {
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.is_contiguous() && in.numel() % 4 == 0, "float32 (4 * threads)");
  at::Tensor out = at::zeros_like(in);
  const int threads = int(in.numel() / 4);
  TORCHNOVA_LAUNCH_KERNEL(1, threads, in.numel() * 4, nullptr, cp_async_kernel)(
      in.data_ptr<float>(), out.data_ptr<float>(), int(src_bytes), int(mode));
  return out;
}

at::Tensor shared_race(int64_t threads, int64_t racy) {
  at::Tensor out = at::zeros({threads}, at::kInt);
  TORCHNOVA_LAUNCH_KERNEL(1, threads, threads * 4, nullptr, shared_race_kernel)(out.data_ptr<int>(), int(racy));
  return out;
}

at::Tensor shifted_copy(const at::Tensor& in, int64_t offset) {
  TORCH_CHECK(in.scalar_type() == at::kFloat && in.is_contiguous() && in.dim() == 1, "float32 1-D contiguous input");
  at::Tensor out = at::zeros_like(in);
  TORCHNOVA_LAUNCH_KERNEL(1, in.numel(), 0, nullptr, shifted_copy_kernel)(in.data_ptr<float>(), out.data_ptr<float>(),
                                                                         int(offset));
  return out;
}

at::Tensor warp_collectives(int64_t threads, int64_t width) {
  at::Tensor out = at::zeros({threads, 6}, at::kInt);
  TORCHNOVA_LAUNCH_KERNEL(1, threads, 0, nullptr, warp_collectives_kernel)(out.data_ptr<int>(), int(width));
  return out;
}

void barrier_deadlock(int64_t threads, int64_t leaving_thread) {
  at::Tensor out = at::zeros({threads}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, threads, 0, nullptr, barrier_deadlock_kernel)(out.data_ptr<float>(),
                                                                          int(leaving_thread));
}

void bad_shuffle(int64_t mode) {
  const int threads = mode == 0 ? 48 : 32;
  at::Tensor out = at::zeros({threads}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, threads, 0, nullptr, bad_shuffle_kernel)(out.data_ptr<float>(), int(mode));
}

at::Tensor shared_out_of_bounds(int64_t offset) {
  at::Tensor out = at::zeros({32}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, 32, 0, nullptr, shared_out_of_bounds_kernel)(out.data_ptr<float>(), int(offset));
  return out;
}

at::Tensor vector_load(int64_t offset) {
  at::Tensor in = at::arange(64 + 4, at::kFloat);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(in.data_ptr()) % 16 == 0, "test needs a 16-byte aligned buffer");
  at::Tensor out = at::zeros({8}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, 8, 0, nullptr, vector_load_kernel)(in.data_ptr<float>(), out.data_ptr<float>(),
                                                                int(offset));
  return out;
}

void dynamic_smem_overflow(int64_t floats) {
  at::Tensor out = at::zeros({32}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, 32, floats * 4, nullptr, dynamic_smem_overflow_kernel)(out.data_ptr<float>(),
                                                                                   int(floats));
}

at::Tensor dynamic_smem_unwritten() {
  at::Tensor out = at::zeros({32}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(1, 32, 32 * 4, nullptr, dynamic_smem_unwritten_kernel)(out.data_ptr<float>());
  return out;
}

void launch_config(int64_t grid, int64_t block, int64_t smem) {
  at::Tensor out = at::zeros({1024}, at::kFloat);
  TORCHNOVA_LAUNCH_KERNEL(unsigned(grid), unsigned(block), size_t(smem), nullptr, dynamic_smem_unwritten_kernel)(
      out.data_ptr<float>());
}

}  // namespace
}  // namespace torchnova

namespace torchnova_emu {
namespace testing {
void bind(pybind11::module& module) {
  using namespace torchnova;
  module.def("_test_warp_collectives", &warp_collectives);
  module.def("_test_barrier_deadlock", &barrier_deadlock);
  module.def("_test_bad_shuffle", &bad_shuffle);
  module.def("_test_shared_out_of_bounds", &shared_out_of_bounds);
  module.def("_test_vector_load", &vector_load);
  module.def("_test_dynamic_smem_overflow", &dynamic_smem_overflow);
  module.def("_test_dynamic_smem_unwritten", &dynamic_smem_unwritten);
  module.def("_test_launch_config", &launch_config);
  module.def("_test_shifted_copy", &shifted_copy);
  module.def("_test_ldmatrix_mma", &ldmatrix_mma);
  module.def("_test_mma_tf32", &mma_tf32);
  module.def("_test_cp_async", &cp_async_copy);
  module.def("_test_shared_race", &shared_race);
}
}  // namespace testing
}  // namespace torchnova_emu
