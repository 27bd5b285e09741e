// Shared pieces of the attention CUDA kernels (spacetime_temporal.cu, spacetime_spatial.cu; the warp and quad
// reductions also attention_tc_fwd.cu and dual_channel_attention.cu):
// argument checks of the fixed op schemas (csrc/spacetime_ops.cpp), element conversion, warp reductions and the
// addressing of (B, T, S, H, D) tensors with arbitrary strides over B, T, S, H and unit stride over D.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

#include "dynamic_smem.cuh"
#include "shared_memory_plan.h"

namespace torchnova {
namespace spacetime_cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kMaxHeadDim = 256;

// Element strides of a (B, T, S, H, D) tensor over its first four dims; the D stride is 1 (checked on the host).
struct TokenStrides {
  int64_t b, t, s, h;
};

inline TokenStrides token_strides(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

// Offset of the head-dim vector x[b, t, s, h, :].
__device__ __forceinline__ int64_t token_offset(const TokenStrides& st, int64_t b, int64_t t, int64_t s,
                                                int64_t h) {
  return b * st.b + t * st.t + s * st.s + h * st.h;
}

// Row index of lse (B, T, S, H) contiguous, which is also the row of a contiguous (B, T, S, H, D) output.
__device__ __forceinline__ int64_t row_index(int64_t b, int64_t t, int64_t s, int64_t h, int64_t T, int64_t S,
                                             int64_t H) {
  return ((b * T + t) * S + s) * H + h;
}

template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t x) {
  return static_cast<float>(x);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, mask));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) x += __shfl_xor_sync(kFullWarp, x, mask);
  return x;
}

// Max / sum over the 4 lanes of a quad (lanes 4g .. 4g + 3): the lanes that share a row of an mma accumulator
// fragment, or a token in the CogVideo SIMT kernel's 4-lanes-per-token layout. Every lane of the warp calls it.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullWarp, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullWarp, x, 1);
  return x + __shfl_xor_sync(kFullWarp, x, 2);
}

// Row stride (in floats) of a shared-memory tile with `width` used columns: odd, so that the 32 lanes of a warp
// reading one column of 32 different rows hit 32 different banks.
__host__ __device__ __forceinline__ int odd_stride(int width) { return width | 1; }

// Checks q, k, v (or any tensor that must match q) against the schema: (B, T, S, H, D), D in 1..256, the dtype
// and device of q, float32/float16/bfloat16 on CUDA, stride(-1) == 1.
inline void check_like_q(const char* op, const char* name, const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK(x.dim() == 5, op, ": ", name, " must be 5-D (B, T, S, H, D), got ", x.dim(), "-D with shape ",
              x.sizes());
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
              x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype != at::kDouble, op, ": ", name,
              " is float64, which the CUDA kernels do not support (expected float32, float16 or bfloat16; use the "
              "cpp or reference backend for float64)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(dtype == q.scalar_type(), op, ": ", name, " dtype must equal q's dtype ", q.scalar_type(), ", got ",
              dtype);
  TORCH_CHECK(x.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.stride(4) == 1 || x.size(4) == 1 || x.numel() == 0, op, ": ", name,
              " must have unit stride over the head dim (stride(-1) == 1), got strides ", x.strides());
  const int64_t head_dim = x.size(4);
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, op, ": head dim D of ", name, " must be in 1..", kMaxHeadDim,
              ", got ", head_dim);
}

// lse (B, T, S, H) float32 on q's device; returned contiguous.
inline at::Tensor checked_lse(const char* op, const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.dim() == 4 && lse.sizes() == q.sizes().slice(0, 4), op, ": lse must have shape (B, T, S, H) = ",
              q.sizes().slice(0, 4), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32 (the accumulation dtype of ",
              q.scalar_type(), " inputs), got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse must be on q's device ", q.device(), ", got ", lse.device());
  return lse.contiguous();
}

// A tensor of q's shape, dtype and device with unit head-dim stride: grad_out and out come from autograd and may
// be expanded or transposed; those (rare) cases are copied rather than rejected.
inline at::Tensor with_unit_head_stride(const char* op, const char* name, const at::Tensor& x,
                                        const at::Tensor& q) {
  TORCH_CHECK(x.dim() == 5 && x.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ",
              x.sizes());
  at::Tensor unit = (x.stride(4) == 1 || x.size(4) == 1 || x.numel() == 0) ? x : x.contiguous();
  check_like_q(op, name, unit, q);
  return unit;
}

// AT_DISPATCH over the three dtypes the kernels support (float64 is rejected by check_like_q, so it gets no
// instantiation).
#define TORCHNOVA_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                        \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                     \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline unsigned checked_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks,
              " thread blocks exceed the grid.x limit of 2^31 - 1; split the batch");
  return static_cast<unsigned>(blocks);
}

}  // namespace spacetime_cuda
}  // namespace torchnova
