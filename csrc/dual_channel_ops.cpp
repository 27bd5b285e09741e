// Schemas of CogVideo's dual-channel attention ops. Kernels: csrc/cpu/dual_channel_*.cpp (CPU, the "cpp"
// backend) and csrc/cuda/dual_channel_*.cu (CUDA); the Triton kernels register their own ops from Python
// (pyext/torchnova/dual_channel/triton_kernels.py). Which key a query sees is the rule of
// pyext/torchnova/dual_channel/masks.py (DESIGN.md section 2), computed from token indices in the kernels.
//
// Layout (B, L, H, D), L = text_len + frames * grid_h * grid_w, text first, frames in (frame, row, col) order.
// q, k, v share shape and dtype; any strides with stride(-1) == 1. "acc" = float64 for float64 inputs, float32
// otherwise. channel: "base" | "plus"; attention: "full" | "window"; stage: "sequential" | "interpolation".
// text_pad_mask: optional (B, text_len) bool, contiguous, true = real token; padded text keys are invisible.
//
// cogvideo_attention_fwd -> out (B, L, H, D) q.dtype contiguous, lse (B, L, H) acc.
//   A row with no visible key (plus-channel text rows, rows whose only keys are padded text) gives out = 0 and
//   lse = +inf, so the backward's exp(score - lse) is exactly 0 there and no NaN appears.
// cogvideo_attention_bwd -> dq, dk, dv (B, L, H, D) q.dtype contiguous.
//
// dual_channel_mix: o_base, o_plus (B, L, hidden), alpha_logit (hidden,); a = sigmoid(alpha_logit)
//   y[:, :text_len] = o_base[:, :text_len];  y[:, text_len:] = a * o_base + (1 - a) * o_plus
// dual_channel_mix_fwd -> y (B, L, hidden) o_base.dtype contiguous
// dual_channel_mix_bwd -> d_base, d_plus (B, L, hidden) o_base.dtype; d_alpha_logit (hidden,) acc
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torchnova, m) {
  m.def(
      "cogvideo_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? text_pad_mask, int text_len, int frames, "
      "int grid_h, int grid_w, str channel, str attention, int window, bool shifted, str stage) -> (Tensor, Tensor)");
  m.def(
      "cogvideo_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? text_pad_mask, int text_len, int frames, int grid_h, int grid_w, str channel, str attention, "
      "int window, bool shifted, str stage) -> (Tensor, Tensor, Tensor)");
  m.def("dual_channel_mix_fwd(Tensor o_base, Tensor o_plus, Tensor alpha_logit, int text_len) -> Tensor");
  m.def(
      "dual_channel_mix_bwd(Tensor grad_y, Tensor o_base, Tensor o_plus, Tensor alpha_logit, int text_len) "
      "-> (Tensor, Tensor, Tensor)");
}
