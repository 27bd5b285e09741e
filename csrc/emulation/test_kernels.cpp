// CUDA emulation build only: small kernels, compiled only into torchnova._C_cuda_emu, that test the emulation
// layer itself (tests/test_cuda_emulation.py): warp collectives against their definitions, and deliberately
// broken kernels proving that a barrier some thread never reaches, a shuffle mask naming a lane that did not
// arrive, out-of-bounds shared / register-array indices and misaligned 16-byte loads are errors, not hangs or
// silent garbage.
#include <torch/extension.h>

#include "emulation/cuda_emulation.h"
#include "emulation/dynamic_smem.h"

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
}
}  // namespace testing
}  // namespace torchnova_emu
