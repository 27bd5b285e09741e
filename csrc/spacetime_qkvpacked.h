// The q, k, v of a packed (B, T, S, 3, H, D) qkv (plain and rotary packed ops): shared by the device-generic *_qkvpacked kernels
// (csrc/spacetime_ops.cpp), the CUDA emulation layer's (csrc/emulation/cuda_emulation_module.cpp) and the CPU ones
// (csrc/cpu/spacetime_*_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchnova {
namespace spacetime {

// q, k, v = the three (B, T, S, H, D) slices of a packed (B, T, S, 3, H, D) qkv (views, no copy).
inline std::array<at::Tensor, 3> unpack_qkv(const char* op, const at::Tensor& qkv) {
  TORCH_CHECK(qkv.dim() == 6 && qkv.size(3) == 3, op, ": qkv must have shape (B, T, S, 3, H, D), got ", qkv.sizes());
  return {qkv.select(3, 0), qkv.select(3, 1), qkv.select(3, 2)};
}

// The packed ops of a device whose kernels take q, k, v only: the forwards run the unpacked ops named by the
// template arguments (e.g. "torchnova::temporal_attention_fwd") on the three views; the backwards stack their
// gradients into one (B, T, S, 3, H, D) dqkv.
template <const char* TemporalFwd, const char* TemporalBwd, const char* SpatialFwd, const char* SpatialBwd>
struct PackedViaUnpacked {
  using OptTensor = std::optional<at::Tensor>;

  template <typename Signature>
  static c10::TypedOperatorHandle<Signature> op(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  }

  static std::tuple<at::Tensor, at::Tensor> temporal_fwd(const at::Tensor& qkv, const OptTensor& bias,
                                                         const OptTensor& segment_ids, bool causal, double scale) {
    const auto [q, k, v] = unpack_qkv("temporal_attention_qkvpacked_fwd", qkv);
    static const auto fwd = op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, bool, double)>(
        TemporalFwd);
    return fwd.call(q, k, v, bias, segment_ids, causal, scale);
  }

  static std::tuple<at::Tensor, at::Tensor> temporal_bwd(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         const OptTensor& bias, const OptTensor& segment_ids,
                                                         bool causal, double scale, bool needs_bias_grad,
                                                         bool deterministic) {
    const auto [q, k, v] = unpack_qkv("temporal_attention_qkvpacked_bwd", qkv);
    static const auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const OptTensor&, const OptTensor&, bool, double, bool, bool)>(TemporalBwd);
    auto [dq, dk, dv, dbias] =
        bwd.call(grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, needs_bias_grad, deterministic);
    return {at::stack({dq, dk, dv}, 3), dbias};
  }

  static std::tuple<at::Tensor, at::Tensor> spatial_fwd(const at::Tensor& qkv, double scale) {
    const auto [q, k, v] = unpack_qkv("spatial_attention_qkvpacked_fwd", qkv);
    static const auto fwd =
        op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
            SpatialFwd);
    return fwd.call(q, k, v, scale);
  }

  static at::Tensor spatial_bwd(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                const at::Tensor& lse, double scale) {
    const auto [q, k, v] = unpack_qkv("spatial_attention_qkvpacked_bwd", qkv);
    static const auto bwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, double)>(SpatialBwd);
    auto [dq, dk, dv] = bwd.call(grad_out, q, k, v, out, lse, scale);
    return at::stack({dq, dk, dv}, 3);
  }
};

// The rotary packed ops (temporal_attention_rotary_qkvpacked_*) of a device whose kernels take q, k, v only, the
// same way: the forward runs the unpacked rotary op named by RotaryFwd on the views, the backward stacks.
template <const char* RotaryFwd, const char* RotaryBwd>
struct RotaryPackedViaUnpacked {
  using OptTensor = std::optional<at::Tensor>;

  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& qkv, const OptTensor& bias,
                                                const OptTensor& segment_ids, bool causal, double scale,
                                                const at::Tensor& rotary_cos, const at::Tensor& rotary_sin,
                                                bool rotary_interleaved) {
    const auto [q, k, v] = unpack_qkv("temporal_attention_rotary_qkvpacked_fwd", qkv);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(RotaryFwd, "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                   const OptTensor&, bool, double, const at::Tensor&, const at::Tensor&, bool)>();
    return op.call(q, k, v, bias, segment_ids, causal, scale, rotary_cos, rotary_sin, rotary_interleaved);
  }

  static std::tuple<at::Tensor, at::Tensor> bwd(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                const at::Tensor& out, const at::Tensor& lse, const OptTensor& bias,
                                                const OptTensor& segment_ids, bool causal, double scale,
                                                const at::Tensor& rotary_cos, const at::Tensor& rotary_sin,
                                                bool rotary_interleaved, bool needs_bias_grad, bool deterministic) {
    const auto [q, k, v] = unpack_qkv("temporal_attention_rotary_qkvpacked_bwd", qkv);
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(RotaryBwd, "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const OptTensor&, const OptTensor&, bool, double, const at::Tensor&,
                const at::Tensor&, bool, bool, bool)>();
    auto [dq, dk, dv, dbias] = op.call(grad_out, q, k, v, out, lse, bias, segment_ids, causal, scale, rotary_cos,
                                       rotary_sin, rotary_interleaved, needs_bias_grad, deterministic);
    return {at::stack({dq, dk, dv}, 3), dbias};
  }
};

}  // namespace spacetime
}  // namespace torchnova
