// Factorized space-time attention, CPU kernels (the "cpp" backend). Schemas: csrc/spacetime_ops.cpp.
//
// Layout (B, T, S, H, D); q, k, v any strides with stride(-1) == 1; outputs contiguous.
//
// temporal: one problem per (b, s, h), a sequence over the T frames (a huge batch of tiny problems):
//   s_ij = scale * q_i . k_j + bias[h, i, j]        visible(i, j) = seg[b,i] == seg[b,j] && (!causal || j <= i)
//   lse_i = log sum_{j visible} exp(s_ij),  P_ij = exp(s_ij - lse_i),  out_i = sum_j P_ij v_j
// backward (P recomputed from lse):
//   delta_i = dO_i . O_i,  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - delta_i)
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij dO_i,
//   dbias[h, i, j] = sum over all (b, s) problems of dS_ij
// Work items are (b, s) pairs: their T x H x D blocks of q, k, v (and dO, O in backward) are copied to
// thread-local buffers in the accumulation type (contiguous H*D runs per frame, so the loads stream), and the
// item's H problems run on them. at::parallel_for over items, AVX2+FMA copy chosen at runtime.
// dbias is reduced deterministically: items are cut into a number of chunks that depends only on the
// item count (not on the thread count); each chunk sums into its own (H, T, T) partial, and the partials
// are added in chunk order, so two runs give bit-identical results on any machine.
//
// spatial: one problem per (b, t, h), a sequence over the S tokens of a frame, no mask, no bias. Queries are
// processed in blocks of kQueryBlock rows against all keys of the problem with ATen GEMMs (BLAS/oneDNN,
// single-threaded inside the parallel loop): scores (block x S), exact softmax per row (the whole row is
// there, so no online rescaling), P V. Memory per thread: one block x S score tile, never S x S. Backward per
// problem: for each query block recompute P, dP = dO V^T, dS = P o (dP - delta), dq = scale dS K, and
// accumulate dk += scale dS^T q, dv += P^T dO in (S x D) accumulators.
//
// float32 / float16 / bfloat16 inputs accumulate in float32; float64 in double (the gradcheck path).
#include <torch/extension.h>

#include "cpu_dispatch.h"
#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace torchnova {
namespace {

constexpr int64_t kQueryBlock = 128;
constexpr int64_t kMaxBiasChunks = 256;

template <typename acc_t>
TORCHNOVA_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

template <typename acc_t>
TORCHNOVA_INLINE void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

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

template <typename scalar_t, typename acc_t>
TORCHNOVA_INLINE void load_row(const scalar_t* src, acc_t* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 5, op, ": q must have shape (B, T, S, H, D), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": k and v must have q's shape ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(q.is_floating_point(), op, ": q must be floating point, got ", q.scalar_type());
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->size(4) <= 1 || t->stride(4) == 1, op, ": q, k, v need stride(-1) == 1, got strides ",
                t->strides());
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// What every backward gets besides q, k, v: grad_out and out like q, lse (B, T, S, H) in the accumulation dtype.
void check_bwd_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                      const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
              ": grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(grad_out.stride(4) == 1 || grad_out.size(4) <= 1, op, ": grad_out needs stride(-1) == 1");
  TORCH_CHECK(out.stride(4) == 1 || out.size(4) <= 1, op, ": out needs stride(-1) == 1");
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 4 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2) && lse.size(3) == q.size(3),
              op, ": lse must be ", acc, " of shape (B, T, S, H), got ", lse.scalar_type(), " ", lse.sizes());
}

// ----------------------------------------------------------------------------------------------------------
// temporal
// ----------------------------------------------------------------------------------------------------------

struct TemporalMask {
  const int64_t* seg;  // (B, T) or nullptr
  bool causal;
  int64_t T;
  TORCHNOVA_INLINE bool visible(int64_t b, int64_t i, int64_t j) const {
    if (causal && j > i) return false;
    return seg == nullptr || seg[b * T + i] == seg[b * T + j];
  }
};

// scores[j] = scale q_i . k_j + bias[h, i, j] for visible keys (rows ld apart), -inf for masked ones; returns
// the row max (finite: the diagonal is always visible).
template <typename acc_t>
TORCHNOVA_INLINE acc_t row_scores(const acc_t* qb, const acc_t* kb, int64_t ld, const acc_t* bias,
                                  const TemporalMask& mask, acc_t scale, int64_t b, int64_t h, int64_t i, int64_t T,
                                  int64_t D, acc_t* scores) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < T; ++j) {
    if (!mask.visible(b, i, j)) {
      scores[j] = -std::numeric_limits<acc_t>::infinity();
      continue;
    }
    scores[j] = scale * dot(qb + i * ld, kb + j * ld, D) + (bias ? bias[(h * T + i) * T + j] : acc_t(0));
    row_max = std::max(row_max, scores[j]);
  }
  return row_max;
}

void check_temporal_extras(const char* op, const at::Tensor& q, const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& segment_ids) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(3);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 3 && bias->size(0) == H && bias->size(1) == T && bias->size(2) == T, op,
                ": bias must have shape (H, T, T) = (", H, ", ", T, ", ", T, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == acc_type(q.scalar_type()) && bias->is_contiguous() && bias->device().is_cpu(),
                op, ": bias must be a contiguous CPU ", acc_type(q.scalar_type()), " tensor, got ",
                bias->scalar_type());
  }
  if (segment_ids.has_value()) {
    TORCH_CHECK(segment_ids->dim() == 2 && segment_ids->size(0) == B && segment_ids->size(1) == T, op,
                ": segment_ids must have shape (B, T) = (", B, ", ", T, "), got ", segment_ids->sizes());
    TORCH_CHECK(segment_ids->scalar_type() == at::kLong && segment_ids->is_contiguous() &&
                    segment_ids->device().is_cpu(),
                op, ": segment_ids must be a contiguous CPU int64 tensor, got ", segment_ids->scalar_type());
  }
}

// One work item is a (b, s) pair: its T x (H x D) blocks of q, k, v are contiguous runs of H*D elements per
// frame (the layout's innermost dims), so the loads stream; the H problems of the item then run on the buffers
// with row stride H*D.
template <typename scalar_t, typename acc_t>
TORCHNOVA_INLINE void load_item(const View5<scalar_t>& x, int64_t b, int64_t s, int64_t T, int64_t H, int64_t D,
                                acc_t* dst) {
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) load_row(x.row(b, t, s, h), dst + (t * H + h) * D, D);
  }
}

template <typename scalar_t, typename acc_t>
void temporal_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_t* bias,
                       const TemporalMask& mask, acc_t scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4), HD = H * D;
  const View5<scalar_t> qv(q), kv(k), vv(v);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(T * T * H, 1));
  cpu::parallel_for_isa(B * S, grain, [&](int64_t lo, int64_t hi) TORCHNOVA_LAMBDA_INLINE {
    std::vector<acc_t> qb(T * HD), kb(T * HD), vb(T * HD), scores(T), acc(D);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / S, s = item % S;
      load_item(qv, b, s, T, H, D, qb.data());
      load_item(kv, b, s, T, H, D, kb.data());
      load_item(vv, b, s, T, H, D, vb.data());
      for (int64_t h = 0; h < H; ++h) {
        const acc_t *qh = qb.data() + h * D, *kh = kb.data() + h * D, *vh = vb.data() + h * D;
        for (int64_t i = 0; i < T; ++i) {
          const acc_t row_max = row_scores(qh, kh, HD, bias, mask, scale, b, h, i, T, D, scores.data());
          // One vectorized exp sweep over the row; masked scores (-inf) give exactly 0.
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < T; ++j) {
            scores[j] = cpu::exp_nonpositive(scores[j] - row_max);
            sum += scores[j];
          }
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t j = 0; j < T; ++j) {
            if (scores[j] != acc_t(0)) axpy(scores[j], vh + j * HD, acc.data(), D);
          }
          // The diagonal is always visible, so sum >= 1 and row_max is finite.
          scalar_t* o = out_p + (((b * T + i) * S + s) * H + h) * D;
          const acc_t inv = acc_t(1) / sum;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
          lse_p[((b * T + i) * S + s) * H + h] = row_max + std::log(sum);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void temporal_bwd_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const acc_t* bias, const TemporalMask& mask,
                       acc_t scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, acc_t* dbias) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4), HD = H * D;
  const View5<scalar_t> qv(q), kv(k), vv(v), gv(grad_out), ov(out);
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  scalar_t *dq_p = dq.data_ptr<scalar_t>(), *dk_p = dk.data_ptr<scalar_t>(), *dv_p = dv.data_ptr<scalar_t>();
  const int64_t items = B * S;
  // Deterministic dbias: a chunk count that depends on the item count only (never on the thread count).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxBiasChunks, (items + 15) / 16));
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  std::vector<acc_t> partial(dbias ? chunks * H * T * T : 0, acc_t(0));
  cpu::parallel_for_isa(chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) TORCHNOVA_LAMBDA_INLINE {
    std::vector<acc_t> qb(T * HD), kb(T * HD), vb(T * HD), gb(T * HD), dqb(T * HD), dkb(T * HD), dvb(T * HD);
    std::vector<acc_t> probs(T), delta(T * H);
    for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
      acc_t* chunk_bias = dbias ? &partial[chunk * H * T * T] : nullptr;
      for (int64_t item = chunk * per_chunk; item < std::min(items, (chunk + 1) * per_chunk); ++item) {
        const int64_t b = item / S, s = item % S;
        load_item(qv, b, s, T, H, D, qb.data());
        load_item(kv, b, s, T, H, D, kb.data());
        load_item(vv, b, s, T, H, D, vb.data());
        load_item(gv, b, s, T, H, D, gb.data());
        load_item(ov, b, s, T, H, D, dqb.data());  // O is only needed for delta: borrow dq's buffer
        for (int64_t r = 0; r < T * H; ++r) delta[r] = dot(&gb[r * D], &dqb[r * D], D);
        std::fill(dqb.begin(), dqb.end(), acc_t(0));
        std::fill(dkb.begin(), dkb.end(), acc_t(0));
        std::fill(dvb.begin(), dvb.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const acc_t *qh = qb.data() + h * D, *kh = kb.data() + h * D, *vh = vb.data() + h * D;
          const acc_t* gh = gb.data() + h * D;
          acc_t *dqh = dqb.data() + h * D, *dkh = dkb.data() + h * D, *dvh = dvb.data() + h * D;
          for (int64_t i = 0; i < T; ++i) {
            const acc_t row_lse = lse_p[((b * T + i) * S + s) * H + h];
            row_scores(qh, kh, HD, bias, mask, scale, b, h, i, T, D, probs.data());
#pragma omp simd
            for (int64_t j = 0; j < T; ++j) probs[j] = cpu::exp_nonpositive(probs[j] - row_lse);
            for (int64_t j = 0; j < T; ++j) {
              const acc_t pij = probs[j];
              if (pij == acc_t(0)) continue;  // masked (or underflowed): no contribution
              const acc_t dsij = pij * (dot(gh + i * HD, vh + j * HD, D) - delta[i * H + h]);
              axpy(pij, gh + i * HD, dvh + j * HD, D);
              axpy(scale * dsij, kh + j * HD, dqh + i * HD, D);
              axpy(scale * dsij, qh + i * HD, dkh + j * HD, D);
              if (chunk_bias) chunk_bias[(h * T + i) * T + j] += dsij;
            }
          }
        }
        for (int64_t t = 0; t < T; ++t) {  // outputs are contiguous: one run of H*D per frame
          const int64_t offset = ((b * T + t) * S + s) * HD;
          for (int64_t e = 0; e < HD; ++e) {
            dq_p[offset + e] = static_cast<scalar_t>(dqb[t * HD + e]);
            dk_p[offset + e] = static_cast<scalar_t>(dkb[t * HD + e]);
            dv_p[offset + e] = static_cast<scalar_t>(dvb[t * HD + e]);
          }
        }
      }
    }
  });
  if (dbias) {
    const int64_t n = H * T * T;
    std::fill(dbias, dbias + n, acc_t(0));
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t e = 0; e < n; ++e) dbias[e] += partial[chunk * n + e];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const c10::optional<at::Tensor>& segment_ids,
                                                              bool causal, double scale) {
  check_qkv("temporal_attention_fwd", q, k, v);
  check_temporal_extras("temporal_attention_fwd", q, bias, segment_ids);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  const TemporalMask mask{segment_ids.has_value() ? segment_ids->data_ptr<int64_t>() : nullptr, causal, q.size(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "temporal_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* bias_p = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
    temporal_fwd_impl<scalar_t, acc_t>(q, k, v, bias_p, mask, static_cast<acc_t>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> temporal_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& segment_ids,
    bool causal, double scale, bool needs_bias_grad, bool deterministic) {
  (void)deterministic;  // the CPU reduction is always deterministic (see the file header)
  check_qkv("temporal_attention_bwd", q, k, v);
  check_temporal_extras("temporal_attention_bwd", q, bias, segment_ids);
  check_bwd_inputs("temporal_attention_bwd", grad_out, q, out, lse);
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  at::Tensor dbias = needs_bias_grad ? at::zeros({q.size(3), q.size(1), q.size(1)}, q.options().dtype(acc))
                                     : at::empty({0}, q.options().dtype(acc));
  if (q.numel() == 0) return {dq, dk, dv, dbias};
  const TemporalMask mask{segment_ids.has_value() ? segment_ids->data_ptr<int64_t>() : nullptr, causal, q.size(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "temporal_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* bias_p = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
    temporal_bwd_impl<scalar_t, acc_t>(grad_out, q, k, v, out, lse_c, bias_p, mask, static_cast<acc_t>(scale), dq, dk,
                                       dv, needs_bias_grad ? dbias.data_ptr<acc_t>() : nullptr);
  });
  return {dq, dk, dv, dbias};
}

// ----------------------------------------------------------------------------------------------------------
// spatial
// ----------------------------------------------------------------------------------------------------------

// One (S, D) problem of a (B, T, S, H, D) tensor, in the accumulation dtype (a strided view when no cast is
// needed: the GEMMs read it through its leading dimension).
at::Tensor problem(const at::Tensor& x, int64_t b, int64_t t, int64_t h, at::ScalarType acc) {
  return x.select(0, b).select(0, t).select(1, h).to(acc);
}

void spatial_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out,
                      at::Tensor& lse) {
  const int64_t T = q.size(1), S = q.size(2), H = q.size(3);
  const auto acc = lse.scalar_type();
  at::parallel_for(0, q.size(0) * T * H, 1, [&](int64_t lo, int64_t hi) {
    // Worker threads do not inherit the caller's dispatch state: record no autograd history for the GEMMs.
    const at::NoGradGuard no_grad;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t h = p % H, t = (p / H) % T, b = p / (H * T);
      const at::Tensor qp = problem(q, b, t, h, acc), kt = problem(k, b, t, h, acc).t(), vp = problem(v, b, t, h, acc);
      for (int64_t start = 0; start < S; start += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, S - start);
        at::Tensor scores = at::mm(qp.narrow(0, start, rows), kt).mul_(scale);  // (rows, S)
        const at::Tensor row_lse = at::logsumexp(scores, {1}, /*keepdim=*/true);
        const at::Tensor probs = scores.sub_(row_lse).exp_();
        out.select(0, b).select(0, t).select(1, h).narrow(0, start, rows).copy_(at::mm(probs, vp));
        lse.select(0, b).select(0, t).select(1, h).narrow(0, start, rows).copy_(row_lse.squeeze(1));
      }
    }
  });
}

void spatial_bwd_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, double scale, at::Tensor& dq, at::Tensor& dk,
                      at::Tensor& dv) {
  const int64_t T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4);
  const auto acc = lse.scalar_type();
  at::parallel_for(0, q.size(0) * T * H, 1, [&](int64_t lo, int64_t hi) {
    // Worker threads do not inherit the caller's dispatch state: record no autograd history for the GEMMs.
    const at::NoGradGuard no_grad;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t h = p % H, t = (p / H) % T, b = p / (H * T);
      const at::Tensor qp = problem(q, b, t, h, acc), kp = problem(k, b, t, h, acc), vp = problem(v, b, t, h, acc);
      const at::Tensor gp = problem(grad_out, b, t, h, acc), op = problem(out, b, t, h, acc);
      const at::Tensor lp = lse.select(0, b).select(0, t).select(1, h);
      at::Tensor dk_acc = at::zeros({S, D}, qp.options()), dv_acc = at::zeros({S, D}, qp.options());
      for (int64_t start = 0; start < S; start += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, S - start);
        const at::Tensor qb = qp.narrow(0, start, rows), gb = gp.narrow(0, start, rows);
        const at::Tensor delta = (gb * op.narrow(0, start, rows)).sum({1}, /*keepdim=*/true);  // rowsum(dO o O)
        at::Tensor probs = at::mm(qb, kp.t()).mul_(scale).sub_(lp.narrow(0, start, rows).unsqueeze(1)).exp_();
        dv_acc.addmm_(probs.t(), gb);                                     // dV += P^T dO
        at::Tensor dscores = at::mm(gb, vp.t()).sub_(delta).mul_(probs);  // dS = P o (dO V^T - delta)
        dq.select(0, b).select(0, t).select(1, h).narrow(0, start, rows).copy_(at::mm(dscores, kp).mul_(scale));
        dk_acc.addmm_(dscores.t(), qb, /*beta=*/1, /*alpha=*/scale);  // dK += scale dS^T Q
      }
      dk.select(0, b).select(0, t).select(1, h).copy_(dk_acc);
      dv.select(0, b).select(0, t).select(1, h).copy_(dv_acc);
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
  spatial_fwd_impl(q, k, v, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spatial_attention_bwd_cpu(const at::Tensor& grad_out,
                                                                         const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& v, const at::Tensor& out,
                                                                         const at::Tensor& lse, double scale) {
  check_qkv("spatial_attention_bwd", q, k, v);
  check_bwd_inputs("spatial_attention_bwd", grad_out, q, out, lse);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  if (q.numel() == 0) return {dq, dk, dv};
  spatial_bwd_impl(grad_out, q, k, v, out, lse_c, scale, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CPU, m) {
  m.impl("temporal_attention_fwd", &temporal_attention_fwd_cpu);
  m.impl("temporal_attention_bwd", &temporal_attention_bwd_cpu);
  m.impl("spatial_attention_fwd", &spatial_attention_fwd_cpu);
  m.impl("spatial_attention_bwd", &spatial_attention_bwd_cpu);
}

}  // namespace torchnova
