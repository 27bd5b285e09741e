// Shared by the CPU space-time attention kernels (spacetime_temporal_cpu.cpp, spacetime_spatial_cpu.cpp; two
// translation units so that the build compiles them in parallel): strided views of (B, T, S, H, D) tensors,
// the input checks, and where the gradients go.
//
// Gradient layouts: dq, dk, dv are either three contiguous (B, T, S, H, D) tensors (token stride H*D), or the
// three slices of one contiguous (B, T, S, 3, H, D) dqkv tensor (the *_qkvpacked_bwd ops: token stride 3*H*D,
// dk at +H*D, dv at +2*H*D), so a fused qkv projection gets its gradient without a torch.stack.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "cpu_dispatch.h"
#include "spacetime_qkvpacked.h"  // unpack_qkv

namespace torchnova {
namespace spacetime {

// Strided view of one (B, T, S, H, D) tensor: element (b, t, s, h, d) at b*sb + t*st + s*ss + h*sh + d.
template <typename scalar_t>
struct View5 {
  const scalar_t* data;
  int64_t sb, st, ss, sh;
  explicit View5(const at::Tensor& x)
      : data(x.data_ptr<scalar_t>()), sb(x.stride(0)), st(x.stride(1)), ss(x.stride(2)), sh(x.stride(3)) {}
  TORCHNOVA_INLINE const scalar_t* row(int64_t b, int64_t t, int64_t s, int64_t h) const {
    return data + b * sb + t * st + s * ss + h * sh;
  }
};

// Where a backward writes dq, dk, dv: token (b, t, s) of each at ptr + ((b * T + t) * S + s) * token_stride,
// head h at + h * D (see the file header for the two layouts).
template <typename scalar_t>
struct GradOutputs {
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
  int64_t token_stride;
  TORCHNOVA_INLINE int64_t token(int64_t b, int64_t t, int64_t s, int64_t T, int64_t S) const {
    return ((b * T + t) * S + s) * token_stride;
  }
};

// The gradient tensors of a backward: three contiguous ones, or one packed dqkv (B, T, S, 3, H, D).
struct GradTensors {
  at::Tensor dq, dk, dv;  // unpacked; undefined when packed
  at::Tensor dqkv;        // packed; undefined when unpacked

  static GradTensors allocate(const at::Tensor& q, bool packed) {
    GradTensors g;
    const auto options = q.options().memory_format(at::MemoryFormat::Contiguous);
    if (packed) {
      g.dqkv = at::empty({q.size(0), q.size(1), q.size(2), 3, q.size(3), q.size(4)}, options);
    } else {
      g.dq = at::empty(q.sizes(), options);
      g.dk = at::empty(q.sizes(), options);
      g.dv = at::empty(q.sizes(), options);
    }
    return g;
  }

  template <typename scalar_t>
  GradOutputs<scalar_t> outputs() {
    if (dqkv.defined()) {
      scalar_t* base = dqkv.data_ptr<scalar_t>();
      const int64_t HD = dqkv.size(4) * dqkv.size(5);
      return {base, base + HD, base + 2 * HD, 3 * HD};
    }
    return {dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dq.size(3) * dq.size(4)};
  }
};

inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 5, op, ": q must have shape (B, T, S, H, D), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have q's shape ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(q.is_floating_point(), op, ": q must be floating point, got ", q.scalar_type());
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->size(4) <= 1 || t->stride(4) == 1 || t->numel() == 0, op,
                ": q, k, v need stride(-1) == 1, got strides ", t->strides());
  }
}

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// What every backward gets besides q, k, v: grad_out and out like q, lse (B, T, S, H) in the accumulation dtype.
inline void check_bwd_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                             const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q.scalar_type());
  // An empty tensor (B = 0, S = 0, ...) has nothing to read: its strides (0 for an expanded gradient) do not matter.
  TORCH_CHECK(grad_out.stride(4) == 1 || grad_out.size(4) <= 1 || grad_out.numel() == 0, op,
              ": grad_out needs stride(-1) == 1, got strides ", grad_out.strides());
  TORCH_CHECK(out.stride(4) == 1 || out.size(4) <= 1 || out.numel() == 0, op,
              ": out needs stride(-1) == 1, got strides ", out.strides());
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2) && lse.size(3) == q.size(3),
              op, ": lse must be ", acc, " of shape (B, T, S, H), got ", lse.scalar_type(), " ", lse.sizes());
}

// Rows of one operand as the matrix products read them: row (t, h) of a temporal item at p + t*ld_t + h*ld_h,
// row s of a spatial problem at p + s*ld_t. Every operand is first staged into a thread-local buffer in the
// accumulation type (this converts fp16/bf16 too): reading the products' B operands in place would walk rows
// that lie a power of two apart (S*H*D or H*D elements), which all fall into the same few L1 sets.
template <typename T>
struct Rows {
  T* p;
  int64_t ld_t, ld_h;
  TORCHNOVA_INLINE T* head(int64_t h) const { return p + h * ld_h; }
};

}  // namespace spacetime
}  // namespace torchnova
