// Host entry points of the tensor-core attention forward (attention_tc_fwd.cu), called from the forward host
// functions of spacetime_spatial.cu (spatial_attention) and dual_channel_attention.cu (cogvideo_attention), which
// decide per call between these kernels and their SIMT kernels (use_tensor_core_forward).
//
// Hidden visibility: torchnova._C and the emulation module torchnova._C_cuda_emu both define these functions
// (the same source, compiled for the GPU and for the CPU emulation); neither exports them, so one module's calls
// can never bind to the other's definitions.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "dual_channel_visibility.cuh"
#include "spacetime_common.cuh"

namespace torchnova {
namespace attention_tc __attribute__((visibility("hidden"))) {

// TORCHNOVA_CUDA_ATTENTION_KERNEL=auto|tensor_core|simt (read at every call; unset = auto).
enum class KernelChoice { kAuto, kTensorCore, kSimt };
KernelChoice kernel_choice_from_env();

// Whether the forward of `op` on q (spatial (B, T, S, H, D) or cogvideo (B, L, H, D)) runs on the tensor-core
// kernel: auto picks it for float16 / bfloat16 (and float32 when at::globalContext().allowTF32CuBLAS(), i.e.
// torch.backends.cuda.matmul.allow_tf32 or a float32 matmul precision below "highest": TF32, D <= 64), D <= 128
// (kMaxHeadDim), compute capability >= 8.0 and a shared memory need within the device's opt-in limit; simt
// never; tensor_core requires it and raises a ValueError naming the reason when q is not eligible.
bool use_tensor_core_forward(const char* op, const at::Tensor& q, int64_t head_dim);

constexpr int kMaxHeadDim = smem_plan::kTcMaxHeadDim;

// spatial_attention forward on the tensor cores: q, k, v (B, T, S, H, D) checked by the caller; writes out
// (B, T, S, H, D) contiguous q.dtype and lse (B, T, S, H) float32 contiguous.
void spatial_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                           at::Tensor& out, at::Tensor& lse);

// cogvideo_attention forward on the tensor cores: q, k, v (B, L, H, D) checked by the caller, text_pad_mask
// (B, text_len) bool contiguous or nullptr; writes out (B, L, H, D) contiguous and lse (B, L, H) float32.
void cogvideo_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const bool* text_pad_mask, const dual_channel::Layout& layout,
                            const dual_channel_cuda::AttentionShape& shape, at::Tensor& out, at::Tensor& lse);

// Launches of the tensor-core forward kernel since the module was loaded (the emulation module exposes it, so
// tests can tell which kernel ran).
int64_t forward_launches();

}  // namespace attention_tc
}  // namespace torchnova
