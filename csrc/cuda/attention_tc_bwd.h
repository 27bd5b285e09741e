// Host interface of the tensor-core attention backward (csrc/cuda/attention_tc_bwd.cu), called by the backward
// host functions of spatial_attention (spacetime_spatial.cu) and cogvideo_attention (dual_channel_attention.cu)
// after their delta kernel. The kernel choice (TORCHNOVA_CUDA_ATTENTION_KERNEL) is the forward's
// (attention_tc_fwd.h, kernel_choice_from_env).
//
// Hidden visibility, as in attention_tc_fwd.h: torchnova._C and the emulation module both define these functions
// and neither exports them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dual_channel_visibility.cuh"

namespace torchnova {
namespace attention_tc __attribute__((visibility("hidden"))) {

// Whether the backward of `op` on q runs the tensor-core kernels: auto picks them for float16 / bfloat16,
// D <= 128, compute capability >= 8.0 and shared memory within the device's opt-in limit; simt never;
// tensor_core requires them and raises a ValueError naming the reason when q is not eligible.
bool use_tensor_core_backward(const char* op, const at::Tensor& q);

// The CogVideo visibility of one call (attention_bwd takes nullptr for the dense spatial case).
struct CogVideoVisibility {
  dual_channel::Layout layout;
  const bool* text_pad_mask;  // (B, text_len) contiguous, or nullptr
  dual_channel_cuda::AttentionShape shape;
};

// dq, dk, dv of softmax attention over the S tokens of every (b, t, h) problem of (B, T, S, H, D) tensors, from
// the forward's saved lse and delta = rowsum(dO o out) (both (B, T, S, H) float32 contiguous; lse = +inf on rows
// with no visible key). q, k, v, grad_out: any strides with stride(-1) == 1, float16 or bfloat16. dq, dk, dv:
// (B, T, S, H, D) contiguous, written completely. CogVideo passes its (B, L, H, D) tensors as (B, 1, L, H, D).
void attention_bwd(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, double scale,
                   const CogVideoVisibility* cogvideo, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

// Launches of the tensor-core backward kernel pair since the module was loaded (the emulation module exposes it,
// so tests can tell which kernels ran).
int64_t backward_launches();

}  // namespace attention_tc
}  // namespace torchnova
