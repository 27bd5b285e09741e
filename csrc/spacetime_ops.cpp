// Schemas of the factorized space-time attention ops (Video Diffusion Models). Kernels: csrc/cpu/spacetime_*.cpp
// (CPU, the "cpp" backend) and csrc/cuda/spacetime_*.cu (CUDA); the Triton kernels register their own ops
// from Python (pyext/torchnova/spacetime/triton_kernels.py).
//
// Layout (B, T, S, H, D) = batch, frames, spatial tokens (h*w), heads, head dim. q, k, v share shape and dtype;
// any strides with stride(-1) == 1 (the Python layer copies otherwise). "acc" = float64 for float64 inputs,
// float32 otherwise. Outputs are contiguous.
//
// temporal: one problem per (b, s, h), a sequence over the T frames.
//   scores[i, j] = scale * q[b,i,s,h,:] . k[b,j,s,h,:] + bias[h, i, j]           (bias optional, (H, T, T) acc)
//   key j visible to query i iff segment_ids[b,i] == segment_ids[b,j] (optional, (B, T) int64 contiguous)
//                               and (not causal or j <= i); the diagonal is always visible.
// temporal_attention_fwd -> out (B, T, S, H, D) q.dtype, lse (B, T, S, H) acc  (row log-sum-exp of the scores)
// temporal_attention_bwd -> dq, dk, dv (B, T, S, H, D) q.dtype; dbias (H, T, T) acc = sum over (b, s) of dscores
//   when needs_bias_grad, else shape (0,). deterministic=true: dbias reduced in a fixed order (bit-identical runs).
//
// spatial: one problem per (b, t, h), a sequence over the S tokens of a frame, no mask, no bias.
// spatial_attention_fwd -> out (B, T, S, H, D) q.dtype, lse (B, T, S, H) acc
// spatial_attention_bwd -> dq, dk, dv (B, T, S, H, D) q.dtype
//
// qkv-packed variants (flash-attn's *_qkvpacked_func): qkv (B, T, S, 3, H, D), e.g. the output of one fused qkv
// projection viewed so; q, k, v = qkv[:, :, :, 0/1/2]. The forwards return what the unpacked ones do; the
// backwards return one contiguous dqkv (B, T, S, 3, H, D) instead of dq, dk, dv, so autograd needs no
// torch.stack of the three gradients (a copy of 3 x the input plus a fresh allocation).
// temporal_attention_qkvpacked_fwd -> out, lse;  temporal_attention_qkvpacked_bwd -> dqkv, dbias
// spatial_attention_qkvpacked_fwd -> out, lse;   spatial_attention_qkvpacked_bwd -> dqkv
//
// Rotary position embedding (temporal_attention_rotary_*: the temporal ops plus three arguments): q and k are
// rotated before the scores, x' = cos[t] o x + sin[t] o rotate_half(x) on the first rot_dim head dims, with
// rotary_cos, rotary_sin (T, rot_dim) acc contiguous (rot_dim even, <= D) and pairs (2i, 2i+1) when
// rotary_interleaved (rotary-embedding-torch), else (i, i + rot_dim/2) (GPT-NeoX / HF). The backwards return
// the gradients of the unrotated q, k (no gradient for the tables). CPU kernels (csrc/cpu/
// spacetime_temporal_cpu.cpp), CUDA kernels (csrc/cuda/spacetime_temporal.cu: the unpacked ops; the packed ones
// run them on views, below) and Triton (*_triton, from Python).
// temporal_attention_rotary_fwd -> out, lse;            temporal_attention_rotary_bwd -> dq, dk, dv, dbias
// temporal_attention_rotary_qkvpacked_fwd -> out, lse;  temporal_attention_rotary_qkvpacked_bwd -> dqkv, dbias
//
// The CPU kernels write dqkv directly; on other devices (CUDA) the CompositeExplicitAutograd kernels below call
// the unpacked ops and stack their gradients (the CUDA kernels write contiguous dq, dk, dv).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "spacetime_qkvpacked.h"

TORCH_LIBRARY_FRAGMENT(torchnova, m) {
  m.def(
      "temporal_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? segment_ids, bool causal, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "temporal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, "
      "Tensor? segment_ids, bool causal, float scale, bool needs_bias_grad, bool deterministic) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("spatial_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def(
      "spatial_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "temporal_attention_qkvpacked_fwd(Tensor qkv, Tensor? bias, Tensor? segment_ids, bool causal, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "temporal_attention_qkvpacked_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor? bias, "
      "Tensor? segment_ids, bool causal, float scale, bool needs_bias_grad, bool deterministic) -> (Tensor, Tensor)");
  m.def(
      "temporal_attention_rotary_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? segment_ids, bool causal, "
      "float scale, Tensor rotary_cos, Tensor rotary_sin, bool rotary_interleaved) -> (Tensor, Tensor)");
  m.def(
      "temporal_attention_rotary_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? bias, Tensor? segment_ids, bool causal, float scale, Tensor rotary_cos, Tensor rotary_sin, "
      "bool rotary_interleaved, bool needs_bias_grad, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "temporal_attention_rotary_qkvpacked_fwd(Tensor qkv, Tensor? bias, Tensor? segment_ids, bool causal, "
      "float scale, Tensor rotary_cos, Tensor rotary_sin, bool rotary_interleaved) -> (Tensor, Tensor)");
  m.def(
      "temporal_attention_rotary_qkvpacked_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor? bias, "
      "Tensor? segment_ids, bool causal, float scale, Tensor rotary_cos, Tensor rotary_sin, bool rotary_interleaved, "
      "bool needs_bias_grad, bool deterministic) -> (Tensor, Tensor)");
  m.def("spatial_attention_qkvpacked_fwd(Tensor qkv, float scale) -> (Tensor, Tensor)");
  m.def(
      "spatial_attention_qkvpacked_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, float scale) -> Tensor");
}

namespace {

constexpr char kTemporalFwd[] = "torchnova::temporal_attention_fwd";
constexpr char kTemporalBwd[] = "torchnova::temporal_attention_bwd";
constexpr char kSpatialFwd[] = "torchnova::spatial_attention_fwd";
constexpr char kSpatialBwd[] = "torchnova::spatial_attention_bwd";
using Packed = torchnova::spacetime::PackedViaUnpacked<kTemporalFwd, kTemporalBwd, kSpatialFwd, kSpatialBwd>;
constexpr char kRotaryFwd[] = "torchnova::temporal_attention_rotary_fwd";
constexpr char kRotaryBwd[] = "torchnova::temporal_attention_rotary_bwd";
using RotaryPacked = torchnova::spacetime::RotaryPackedViaUnpacked<kRotaryFwd, kRotaryBwd>;

}  // namespace

// Every device: the forwards run the unpacked kernels on views; the backwards stack (CPU overrides them with
// kernels that write dqkv directly, csrc/cpu/spacetime_*_cpu.cpp).
TORCH_LIBRARY_IMPL(torchnova, CompositeExplicitAutograd, m) {
  m.impl("temporal_attention_qkvpacked_fwd", &Packed::temporal_fwd);
  m.impl("temporal_attention_qkvpacked_bwd", &Packed::temporal_bwd);
  m.impl("spatial_attention_qkvpacked_fwd", &Packed::spatial_fwd);
  m.impl("spatial_attention_qkvpacked_bwd", &Packed::spatial_bwd);
  m.impl("temporal_attention_rotary_qkvpacked_fwd", &RotaryPacked::fwd);
  m.impl("temporal_attention_rotary_qkvpacked_bwd", &RotaryPacked::bwd);
}
