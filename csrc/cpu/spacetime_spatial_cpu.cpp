// Spatial attention (Video Diffusion Models), CPU kernels (the "cpp" backend). Schemas: csrc/spacetime_ops.cpp.
//
// Layout (B, T, S, H, D); q, k, v any strides with stride(-1) == 1; out contiguous; gradients contiguous or
// packed into one (B, T, S, 3, H, D) dqkv (spacetime_cpu.h).
//
// One problem per (b, t, h), a sequence over the S tokens of a frame, no mask, no bias:
//   lse_i = log sum_j exp(scale q_i . k_j),  out_i = sum_j exp(scale q_i . k_j - lse_i) v_j
// FlashAttention-2 on the CPU: the problem's rows are staged once (acc type, K^T transposed), then blocks of
// kSpatialQueryBlock queries run against blocks of kSpatialKeyBlock keys with an online softmax (O rescaled when
// the running max grows), all products on tile_gemm.h (the AVX-512, AVX2+FMA or baseline copy chosen at runtime,
// cpu_dispatch.h). Memory per thread: a query block x key block score tile, never S x S. Backward per problem:
// for each query block and key block recompute P from lse, dP = dO V^T, dS = P o (dP - delta) with
// delta = rowsum(dO o O), dq += dS K, and accumulate dk += scale dS^T q, dv += P^T dO in (S x D) accumulators.
//
// float32 / float16 / bfloat16 inputs accumulate in float32; float64 in double (the gradcheck path).
#include <torch/extension.h>

#include "cpu_dispatch.h"
#include "cpu_math.h"
#include "flash_tile.h"
#include "spacetime_cpu.h"
#include "tile_gemm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace torchnova {
namespace {

using namespace spacetime;  // View5, Rows, GradOutputs, GradTensors, the checks (spacetime_cpu.h)

constexpr int64_t kSpatialQueryBlock = 64;
constexpr int64_t kSpatialKeyBlock = 256;

template <typename acc_t>
TORCHNOVA_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// The S rows of spatial problem (b, t, h), x.row(b, t, s, h), staged contiguously (row stride D).
template <typename acc_t, typename scalar_t>
TORCHNOVA_INLINE Rows<const acc_t> problem_rows(const View5<scalar_t>& x, int64_t b, int64_t t, int64_t h, int64_t S,
                                                int64_t D, acc_t* staging) {
  for (int64_t s = 0; s < S; ++s) cpu::convert_row(x.row(b, t, s, h), D, staging + s * D);
  return {staging, D, 0};
}

// FlashAttention-2 forward per problem: for each block of kSpatialQueryBlock queries, loop over blocks of
// kSpatialKeyBlock keys with an online softmax (running max m, running sum l, O rescaled when m grows).
template <typename scalar_t, typename acc_t>
void spatial_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, acc_t scale, at::Tensor& out,
                      at::Tensor& lse) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4);
  const View5<scalar_t> qv(q), kv(k), vv(v);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  const int64_t ldk = cpu::transposed_ld<acc_t>(S), staged = S * D;
  constexpr int64_t BM = kSpatialQueryBlock, BN = kSpatialKeyBlock;
  cpu::parallel_for_isa(B * T * H, 1, [&](int64_t lo, int64_t hi, auto isa) TORCHNOVA_LAMBDA_INLINE {
    constexpr int W = decltype(isa)::kVectorBytes;  // the ISA copy's vector width (cpu_dispatch.h)
    std::vector<acc_t> qb(staged), kb(staged), vb(staged), kt(D * ldk), ob(BM * D), scores(BM * BN),
        row_max(BM), row_sum(BM);
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t h = p % H, t = (p / H) % T, b = p / (H * T);
      const auto qr = problem_rows<acc_t>(qv, b, t, h, S, D, qb.data());
      const auto kr = problem_rows<acc_t>(kv, b, t, h, S, D, kb.data());
      const auto vr = problem_rows<acc_t>(vv, b, t, h, S, D, vb.data());
      cpu::transpose(kr.p, kr.ld_t, S, D, kt.data(), ldk);
      for (int64_t m0 = 0; m0 < S; m0 += BM) {
        const int64_t rows = std::min(BM, S - m0);
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
        std::fill(ob.begin(), ob.end(), acc_t(0));
        for (int64_t n0 = 0; n0 < S; n0 += BN) {
          const int64_t cols = std::min(BN, S - n0);
          cpu::gemm<W>(rows, cols, D, qr.p + m0 * qr.ld_t, qr.ld_t, kt.data() + n0, ldk, scores.data(), BN, scale);
          cpu::online_softmax_tile(scores.data(), BN, rows, cols, row_max.data(), row_sum.data(), ob.data(), D,
                                   D);
          cpu::gemm<W>(rows, D, cols, scores.data(), BN, vr.p + n0 * vr.ld_t, vr.ld_t, ob.data(), D, acc_t(1),
                    /*accumulate=*/true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row_index = ((b * T + t) * S + m0 + r) * H + h;
          scalar_t* dst = out_p + row_index * D;
          const acc_t inv = acc_t(1) / row_sum[r];
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(ob[r * D + d] * inv);
          lse_p[row_index] = row_max[r] + std::log(row_sum[r]);
        }
      }
    }
  });
}

// FlashAttention-2 backward per problem, P recomputed from lse: for each query block, over all key blocks,
//   P = exp(S - lse), dS = P o (dO V^T - delta), dV += P^T dO, dK += scale dS^T Q, dQ += dS K,
// with dK, dV accumulated for the whole problem and dQ for the query block.
template <typename scalar_t, typename acc_t>
void spatial_bwd_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, acc_t scale, const GradOutputs<scalar_t>& grads) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4);
  const View5<scalar_t> qv(q), kv(k), vv(v), gv(grad_out), ov(out);
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const int64_t ldk = cpu::transposed_ld<acc_t>(S), staged = S * D;
  constexpr int64_t BM = kSpatialQueryBlock, BN = kSpatialKeyBlock;
  cpu::parallel_for_isa(B * T * H, 1, [&](int64_t lo, int64_t hi, auto isa) TORCHNOVA_LAMBDA_INLINE {
    constexpr int W = decltype(isa)::kVectorBytes;  // the ISA copy's vector width (cpu_dispatch.h)
    std::vector<acc_t> qb(staged), kb(staged), vb(staged), gb(staged), ob(staged), kt(D * ldk), vt(D * ldk),
        dkb(S * D), dvb(S * D), dqb(BM * D), probs(BM * BN), dscores(BM * BN), delta(BM), row_lse(BM);
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t h = p % H, t = (p / H) % T, b = p / (H * T);
      const auto qr = problem_rows<acc_t>(qv, b, t, h, S, D, qb.data());
      const auto kr = problem_rows<acc_t>(kv, b, t, h, S, D, kb.data());
      const auto vr = problem_rows<acc_t>(vv, b, t, h, S, D, vb.data());
      const auto gr = problem_rows<acc_t>(gv, b, t, h, S, D, gb.data());
      const auto orows = problem_rows<acc_t>(ov, b, t, h, S, D, ob.data());
      cpu::transpose(kr.p, kr.ld_t, S, D, kt.data(), ldk);
      cpu::transpose(vr.p, vr.ld_t, S, D, vt.data(), ldk);
      std::fill(dkb.begin(), dkb.end(), acc_t(0));
      std::fill(dvb.begin(), dvb.end(), acc_t(0));
      for (int64_t m0 = 0; m0 < S; m0 += BM) {
        const int64_t rows = std::min(BM, S - m0);
        const acc_t *q_rows = qr.p + m0 * qr.ld_t, *g_rows = gr.p + m0 * gr.ld_t;
        for (int64_t r = 0; r < rows; ++r) {
          delta[r] = dot(g_rows + r * gr.ld_t, orows.p + (m0 + r) * orows.ld_t, D);  // rowsum(dO o O)
          row_lse[r] = lse_p[((b * T + t) * S + m0 + r) * H + h];
        }
        std::fill(dqb.begin(), dqb.end(), acc_t(0));
        for (int64_t n0 = 0; n0 < S; n0 += BN) {
          const int64_t cols = std::min(BN, S - n0);
          cpu::gemm<W>(rows, cols, D, q_rows, qr.ld_t, kt.data() + n0, ldk, probs.data(), BN, scale);  // scale Q K^T
          cpu::gemm<W>(rows, cols, D, g_rows, gr.ld_t, vt.data() + n0, ldk, dscores.data(), BN);       // dP = dO V^T
          cpu::softmax_grad_tile(probs.data(), dscores.data(), BN, rows, cols, row_lse.data(), delta.data());
          cpu::gemm<W, true>(cols, D, rows, probs.data(), BN, g_rows, gr.ld_t, dvb.data() + n0 * D, D, acc_t(1),
                                 true);  // dV += P^T dO
          cpu::gemm<W, true>(cols, D, rows, dscores.data(), BN, q_rows, qr.ld_t, dkb.data() + n0 * D, D, scale,
                                 true);  // dK += scale dS^T Q
          cpu::gemm<W>(rows, D, cols, dscores.data(), BN, kr.p + n0 * kr.ld_t, kr.ld_t, dqb.data(), D, acc_t(1),
                    true);  // dQ += dS K
        }
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* dst = grads.dq + grads.token(b, t, m0 + r, T, S) + h * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(scale * dqb[r * D + d]);
        }
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t offset = grads.token(b, t, s, T, S) + h * D;
        for (int64_t d = 0; d < D; ++d) {
          grads.dk[offset + d] = static_cast<scalar_t>(dkb[s * D + d]);
          grads.dv[offset + d] = static_cast<scalar_t>(dvb[s * D + d]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> spatial_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, double scale) {
  check_qkv("spatial_attention_fwd", q, k, v);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spatial_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    spatial_fwd_impl<scalar_t, acc_t>(q, k, v, static_cast<acc_t>(scale), out, lse);
  });
  return {out, lse};
}

// Shared by the two backward ops: checks, the gradient tensors (three, or one packed dqkv), the kernel.
GradTensors spatial_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale,
                             bool packed) {
  check_qkv(op, q, k, v);
  check_bwd_inputs(op, grad_out, q, out, lse);
  const at::Tensor lse_c = lse.contiguous();
  GradTensors grads = GradTensors::allocate(q, packed);
  if (q.numel() == 0) return grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spatial_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    spatial_bwd_impl<scalar_t, acc_t>(grad_out, q, k, v, out, lse_c, static_cast<acc_t>(scale),
                                      grads.outputs<scalar_t>());
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_bwd_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& v, const at::Tensor& out,
                                                                         const at::Tensor& lse, double scale) {
  GradTensors g = spatial_backward("spatial_attention_bwd", grad_out, q, k, v, out, lse, scale, /*packed=*/false);
  return {g.dq, g.dk, g.dv};
}

at::Tensor spatial_attention_qkvpacked_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                               const at::Tensor& out, const at::Tensor& lse, double scale) {
  const auto [q, k, v] = unpack_qkv("spatial_attention_qkvpacked_bwd", qkv);
  return spatial_backward("spatial_attention_qkvpacked_bwd", grad_out, q, k, v, out, lse, scale, /*packed=*/true).dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CPU, m) {
  m.impl("spatial_attention_fwd", &spatial_attention_fwd_cpu);
  m.impl("spatial_attention_bwd", &spatial_attention_bwd_cpu);
  m.impl("spatial_attention_qkvpacked_bwd", &spatial_attention_qkvpacked_bwd_cpu);
}

}  // namespace torchnova
