// Host interface of the tensor-core attention backward (csrc/cuda/attention_tc_bwd.cu), called by the backward
// host functions of spatial_attention (spacetime_spatial.cu) and cogvideo_attention (dual_channel_attention.cu)
// after their delta kernel. Plain ATen (no CUDA types), so both .cu files and their emulated twins include it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dual_channel_visibility.h"

namespace torchnova {
namespace attention_tc {

// Largest head dim the tensor-core backward handles (padded widths 32 / 64 / 128); larger D stays SIMT.
constexpr int64_t kMaxHeadDim = 128;

// Which backward kernels a call runs, from TORCHNOVA_CUDA_ATTENTION_KERNEL (read on every call):
//   "auto" (or unset)  tensor cores when tensor_core_backward_supports() holds, else SIMT;
//   "tensor_core"      tensor cores; a call they cannot run raises (the message says why);
//   "simt"             the SIMT kernels.
// `op` names the caller in errors.
bool use_tensor_core_backward(const char* op, const at::Tensor& q);

// Whether the tensor-core backward can run q's dtype / head dim on q's device, and if not why (for the error).
bool tensor_core_backward_supports(const at::Tensor& q, const char** why_not);

// CogVideo visibility of one call (nullptr in attention_bwd for the dense spatial case).
struct CogVideoVisibility {
  dual_channel::Layout layout;
  const bool* text_pad_mask;  // (B, text_len) contiguous, or nullptr
  int64_t text_len;
};

// dq, dk, dv of softmax attention over the S tokens of every (b, t, h) problem of (B, T, S, H, D) tensors, from
// the forward's saved lse and delta = rowsum(dO o out) (both (B, T, S, H) float32 contiguous; lse = +inf on rows
// with no visible key). q, k, v, grad_out: any strides with stride(-1) == 1, float16 or bfloat16. dq, dk, dv:
// (B, T, S, H, D) contiguous, written completely. CogVideo passes its (B, L, H, D) tensors as (B, 1, L, H, D).
void attention_bwd(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, double scale,
                   const CogVideoVisibility* cogvideo, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace attention_tc
}  // namespace torchnova
