// Opting CUDA kernels into more than 48 KiB of dynamic shared memory, once per (device, kernel).
//
// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes) is per-kernel state of the current device's
// context. Setting it before every launch to the size of that launch lets two host threads launching the same
// kernel with different shapes race (one sets a smaller limit between the other's set and launch, which then fails
// with "invalid argument"). So each (device, kernel) is opted in once, under a mutex, to the largest size any
// launch of that kernel can request on that device; each launch only checks its own size against the device's
// sharedMemPerBlockOptin. Launch sizes come from shared_memory_plan.h.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

namespace torchnova {
namespace cuda_smem {

constexpr int64_t kDefaultDynamicSmemBytes = 48 * 1024;  // what a kernel may use without opting in

// Opts `kernel` (a __global__ function) into `max_bytes` on the current device, the first time only.
inline void opt_in_once(const void* kernel, int64_t max_bytes) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> opted_in;  // (kernel, device) pairs already set
  const int device = static_cast<int>(c10::cuda::current_device());
  const std::lock_guard<std::mutex> lock(mutex);
  if (opted_in.count({kernel, device}) != 0) return;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_bytes)));
  opted_in.emplace(kernel, device);
}

// Checks that a launch of `bytes` fits the current device, and opts `kernel` in (once per device) to
// min(max_bytes, device limit), where max_bytes is the most any launch of this kernel can request.
template <typename Kernel>
void prepare_launch(const char* op, Kernel kernel, int64_t bytes, int64_t max_bytes, const char* what) {
  const int64_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, op, ": ", what, " needs ", bytes, " bytes of shared memory per block, this device ",
              "allows ", limit, " (use the triton or cpp backend for this shape)");
  const int64_t opt_in = std::min(std::max(max_bytes, bytes), limit);
  if (opt_in > kDefaultDynamicSmemBytes) opt_in_once(reinterpret_cast<const void*>(kernel), opt_in);
}

}  // namespace cuda_smem
}  // namespace torchnova
