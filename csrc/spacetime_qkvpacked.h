// The q, k, v of a packed (B, T, S, 3, H, D) qkv: shared by the device-generic *_qkvpacked kernels
// (csrc/spacetime_ops.cpp) and the CPU ones (csrc/cpu/spacetime_*_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace torchnova {
namespace spacetime {

// q, k, v = the three (B, T, S, H, D) slices of a packed (B, T, S, 3, H, D) qkv (views, no copy).
inline std::array<at::Tensor, 3> unpack_qkv(const char* op, const at::Tensor& qkv) {
  TORCH_CHECK(qkv.dim() == 6 && qkv.size(3) == 3, op, ": qkv must have shape (B, T, S, 3, H, D), got ", qkv.sizes());
  return {qkv.select(3, 0), qkv.select(3, 1), qkv.select(3, 2)};
}

}  // namespace spacetime
}  // namespace torchnova
