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
#include <torch/library.h>

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
}
