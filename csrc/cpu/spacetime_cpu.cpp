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
// thread-local buffers in the accumulation type (contiguous H*D runs per frame, so the loads stream; q pre-scaled,
// K^T and V^T transposed for the products that need keys along rows), and the item's H problems run on them as
// small register-blocked matrix products (tile_gemm.h): S = (scale Q) K^T, a vectorized softmax per row with the
// bias and the mask as one additive (H, T, Tp) tile (-inf where invisible), O = P V; backward dP = dO V^T,
// dV = P^T dO, dQ = scale dS K, dK = dS^T (scale Q). at::parallel_for over items, AVX2+FMA copy chosen at runtime.
// dbias is reduced deterministically: items are cut into a number of chunks that depends only on the
// item count (not on the thread count); each chunk sums into its own (H, T, T) partial, and the partials
// are added in chunk order, so two runs give bit-identical results on any machine. The backward takes
// delta_i = sum_j P_ij dP_ij, equal to dO_i . O_i (O_i = sum_j P_ij v_j) but computed from the tile already in
// registers: the kernel is memory-bound, and this spares reading O, one of its five input streams.
//
// spatial: one problem per (b, t, h), a sequence over the S tokens of a frame, no mask, no bias. FlashAttention-2
// on the CPU: K^T and V of the problem are copied once (acc type), then blocks of kSpatialQueryBlock queries run
// against blocks of kSpatialKeyBlock keys with an online softmax (O rescaled when the running max grows), all
// products on tile_gemm.h. Memory per thread: a query block x key block score tile, never S x S. Backward per
// problem: for each query block and key block recompute P from lse, dP = dO V^T, dS = P o (dP - delta),
// dq += dS K, and accumulate dk += dS^T (scale q), dv += P^T dO in (S x D) accumulators.
//
// float32 / float16 / bfloat16 inputs accumulate in float32; float64 in double (the gradcheck path).
#include <torch/extension.h>

#include "cpu_dispatch.h"
#include "cpu_math.h"
#include "flash_tile.h"
#include "tile_gemm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace torchnova {
namespace {

constexpr int64_t kSpatialQueryBlock = 64;
constexpr int64_t kSpatialKeyBlock = 256;
constexpr int64_t kMaxBiasChunks = 256;

template <typename acc_t>
TORCHNOVA_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
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

// Row stride of a staged item: H*D plus one cache line, so the T frames do not share cache sets.
TORCHNOVA_INLINE int64_t staged_ld(int64_t HD) { return HD + 16; }

// The T x H rows of temporal item (b, s): H*D contiguous elements per frame (when sh == D), S*H*D apart.
template <typename acc_t, typename scalar_t>
TORCHNOVA_INLINE Rows<const acc_t> item_rows(const View5<scalar_t>& x, int64_t b, int64_t s, int64_t T, int64_t H,
                                             int64_t D, acc_t* staging) {
  const int64_t ld = staged_ld(H * D);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) cpu::convert_row(x.row(b, t, s, h), D, staging + t * ld + h * D);
  }
  return {staging, ld, D};
}

template <typename acc_t>
TORCHNOVA_INLINE Rows<acc_t> item_out_rows(int64_t H, int64_t D, acc_t* staging) {
  return {staging, staged_ld(H * D), D};
}

// Converts the staged output rows of item (b, s) into the contiguous (B, T, S, H, D) output.
template <typename acc_t, typename scalar_t>
TORCHNOVA_INLINE void store_item_rows(const Rows<acc_t>& rows, scalar_t* out, int64_t b, int64_t s, int64_t T,
                                      int64_t S, int64_t HD) {
  for (int64_t t = 0; t < T; ++t) {
    scalar_t* dst = out + ((b * T + t) * S + s) * HD;
    const acc_t* src = rows.p + t * rows.ld_t;
#pragma omp simd
    for (int64_t e = 0; e < HD; ++e) dst[e] = static_cast<scalar_t>(src[e]);
  }
}

// Keys are padded to Tp (a multiple of the vector width) columns: the padded columns of K^T stay zero and
// their additive term is -inf, so they get probability 0 and never change a sum.
// additive[(h * T + i) * Tp + j] = bias[h, i, j] (or 0) where key j is visible to query i in batch b, else -inf.
template <typename acc_t>
void build_additive(const acc_t* bias, const TemporalMask& mask, int64_t b, int64_t H, int64_t T, int64_t Tp,
                    acc_t* additive) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < T; ++i) {
      acc_t* row = additive + (h * T + i) * Tp;
      for (int64_t j = 0; j < Tp; ++j) {
        const bool visible = j < T && mask.visible(b, i, j);
        row[j] = visible ? (bias ? bias[(h * T + i) * T + j] : acc_t(0)) : neg_inf;
      }
    }
  }
}

// In place: row = softmax(row + additive) over n columns; returns the log-sum-exp. The row max is finite (the
// diagonal is always visible), masked entries (-inf) give exactly 0.
template <typename acc_t>
TORCHNOVA_INLINE acc_t softmax_row(acc_t* row, const acc_t* additive, int64_t n) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t j = 0; j < n; ++j) {
    row[j] += additive[j];
    row_max = row[j] > row_max ? row[j] : row_max;
  }
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    row[j] = cpu::exp_nonpositive(row[j] - row_max);
    sum += row[j];
  }
  const acc_t inv = acc_t(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  return row_max + std::log(sum);
}

// Per-thread cache of the additive tile: rebuilt when the batch index changes and segment ids make it depend on b.
template <typename acc_t>
struct AdditiveTile {
  std::vector<acc_t> data;
  int64_t built_for = -1;
  const acc_t* get(const acc_t* bias, const TemporalMask& mask, int64_t b, int64_t H, int64_t T, int64_t Tp) {
    if (built_for < 0 || (mask.seg != nullptr && built_for != b)) {
      data.resize(H * T * Tp);
      build_additive(bias, mask, b, H, T, Tp, data.data());
      built_for = b;
    }
    return data.data();
  }
};

template <typename scalar_t, typename acc_t>
void temporal_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_t* bias,
                       const TemporalMask& mask, acc_t scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4), HD = H * D;
  const int64_t Tp = cpu::round_up(T, cpu::kVectorLanes<acc_t>);
  const View5<scalar_t> qv(q), kv(k), vv(v);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  const int64_t staged = T * staged_ld(HD);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(T * T * HD, 1));
  cpu::parallel_for_isa(B * S, grain, [&](int64_t lo, int64_t hi) TORCHNOVA_LAMBDA_INLINE {
    std::vector<acc_t> qb(staged), kb(staged), vb(staged), ob(staged), kt(D * Tp), probs(T * Tp);
    AdditiveTile<acc_t> additive;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / S, s = item % S;
      const acc_t* add = additive.get(bias, mask, b, H, T, Tp);
      const auto qr = item_rows<acc_t>(qv, b, s, T, H, D, qb.data());
      const auto kr = item_rows<acc_t>(kv, b, s, T, H, D, kb.data());
      const auto vr = item_rows<acc_t>(vv, b, s, T, H, D, vb.data());
      const auto orows = item_out_rows(H, D, ob.data());
      for (int64_t h = 0; h < H; ++h) {
        cpu::transpose(kr.head(h), kr.ld_t, T, D, kt.data(), Tp);                                   // K^T (D, Tp)
        cpu::gemm(T, Tp, D, qr.head(h), qr.ld_t, kt.data(), Tp, probs.data(), Tp, scale);           // scale Q K^T
        for (int64_t i = 0; i < T; ++i) {
          lse_p[((b * T + i) * S + s) * H + h] = softmax_row(probs.data() + i * Tp, add + (h * T + i) * Tp, Tp);
        }
        cpu::gemm(T, D, T, probs.data(), Tp, vr.head(h), vr.ld_t, orows.head(h), orows.ld_t);  // out = P V
      }
      store_item_rows(orows, out_p, b, s, T, S, HD);
    }
  });
}

template <typename scalar_t, typename acc_t>
void temporal_bwd_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const acc_t* bias, const TemporalMask& mask,
                       acc_t scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, acc_t* dbias) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4), HD = H * D;
  const int64_t Tp = cpu::round_up(T, cpu::kVectorLanes<acc_t>);
  const View5<scalar_t> qv(q), kv(k), vv(v), gv(grad_out);  // out is not read: delta from P, dP (header)
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  scalar_t *dq_p = dq.data_ptr<scalar_t>(), *dk_p = dk.data_ptr<scalar_t>(), *dv_p = dv.data_ptr<scalar_t>();
  const int64_t items = B * S, staged = T * staged_ld(HD);
  // Deterministic dbias: a chunk count that depends on the item count only (never on the thread count).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxBiasChunks, (items + 15) / 16));
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  std::vector<acc_t> partial(dbias ? chunks * H * T * T : 0, acc_t(0));
  cpu::parallel_for_isa(chunks, 1, [&](int64_t chunk_lo, int64_t chunk_hi) TORCHNOVA_LAMBDA_INLINE {
    std::vector<acc_t> qb(staged), kb(staged), vb(staged), gb(staged), dqb(staged), dkb(staged), dvb(staged),
        kt(D * Tp), vt(D * Tp), probs(T * Tp), dscores(T * Tp);
    AdditiveTile<acc_t> additive;
    for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
      acc_t* chunk_bias = dbias ? &partial[chunk * H * T * T] : nullptr;
      const int64_t end = std::min(items, (chunk + 1) * per_chunk);
      for (int64_t item = chunk * per_chunk; item < end; ++item) {
        const int64_t b = item / S, s = item % S;
        const acc_t* add = additive.get(bias, mask, b, H, T, Tp);
        const auto qr = item_rows<acc_t>(qv, b, s, T, H, D, qb.data());
        const auto kr = item_rows<acc_t>(kv, b, s, T, H, D, kb.data());
        const auto vr = item_rows<acc_t>(vv, b, s, T, H, D, vb.data());
        const auto gr = item_rows<acc_t>(gv, b, s, T, H, D, gb.data());
        const auto dqr = item_out_rows(H, D, dqb.data());
        const auto dkr = item_out_rows(H, D, dkb.data());
        const auto dvr = item_out_rows(H, D, dvb.data());
        for (int64_t h = 0; h < H; ++h) {
          cpu::transpose(kr.head(h), kr.ld_t, T, D, kt.data(), Tp);
          cpu::transpose(vr.head(h), vr.ld_t, T, D, vt.data(), Tp);
          cpu::gemm(T, Tp, D, qr.head(h), qr.ld_t, kt.data(), Tp, probs.data(), Tp, scale);  // scale Q K^T
          cpu::gemm(T, Tp, D, gr.head(h), gr.ld_t, vt.data(), Tp, dscores.data(), Tp);      // dP = dO V^T
          for (int64_t i = 0; i < T; ++i) {
            const acc_t row_lse = lse_p[((b * T + i) * S + s) * H + h];
            acc_t *p = probs.data() + i * Tp, *ds = dscores.data() + i * Tp;
            const acc_t* a = add + (h * T + i) * Tp;
            acc_t row_delta = 0;  // delta_i = sum_j P_ij dP_ij (= dO_i . O_i)
#pragma omp simd reduction(+ : row_delta)
            for (int64_t j = 0; j < Tp; ++j) {
              p[j] = cpu::exp_nonpositive(p[j] + a[j] - row_lse);  // P from the saved lse
              row_delta += p[j] * ds[j];
            }
#pragma omp simd
            for (int64_t j = 0; j < Tp; ++j) ds[j] = p[j] * (ds[j] - row_delta);  // dS = P o (dP - delta)
            if (chunk_bias) {
              acc_t* db = chunk_bias + (h * T + i) * T;
              for (int64_t j = 0; j < T; ++j) db[j] += ds[j];
            }
          }
          cpu::gemm<acc_t, true>(T, D, T, probs.data(), Tp, gr.head(h), gr.ld_t, dvr.head(h), dvr.ld_t);  // P^T dO
          cpu::gemm(T, D, T, dscores.data(), Tp, kr.head(h), kr.ld_t, dqr.head(h), dqr.ld_t, scale);  // scale dS K
          cpu::gemm<acc_t, true>(T, D, T, dscores.data(), Tp, qr.head(h), qr.ld_t, dkr.head(h), dkr.ld_t,
                                 scale);  // dK = scale dS^T Q
        }
        store_item_rows(dqr, dq_p, b, s, T, S, HD);
        store_item_rows(dkr, dk_p, b, s, T, S, HD);
        store_item_rows(dvr, dv_p, b, s, T, S, HD);
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
  cpu::parallel_for_isa(B * T * H, 1, [&](int64_t lo, int64_t hi) TORCHNOVA_LAMBDA_INLINE {
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
          cpu::gemm(rows, cols, D, qr.p + m0 * qr.ld_t, qr.ld_t, kt.data() + n0, ldk, scores.data(), BN, scale);
          cpu::online_softmax_tile(scores.data(), BN, rows, cols, row_max.data(), row_sum.data(), ob.data(), D,
                                   D);
          cpu::gemm(rows, D, cols, scores.data(), BN, vr.p + n0 * vr.ld_t, vr.ld_t, ob.data(), D, acc_t(1),
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
                      const at::Tensor& out, const at::Tensor& lse, acc_t scale, at::Tensor& dq, at::Tensor& dk,
                      at::Tensor& dv) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4);
  const View5<scalar_t> qv(q), kv(k), vv(v), gv(grad_out), ov(out);
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  scalar_t *dq_p = dq.data_ptr<scalar_t>(), *dk_p = dk.data_ptr<scalar_t>(), *dv_p = dv.data_ptr<scalar_t>();
  const int64_t ldk = cpu::transposed_ld<acc_t>(S), staged = S * D;
  constexpr int64_t BM = kSpatialQueryBlock, BN = kSpatialKeyBlock;
  cpu::parallel_for_isa(B * T * H, 1, [&](int64_t lo, int64_t hi) TORCHNOVA_LAMBDA_INLINE {
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
          cpu::gemm(rows, cols, D, q_rows, qr.ld_t, kt.data() + n0, ldk, probs.data(), BN, scale);  // scale Q K^T
          cpu::gemm(rows, cols, D, g_rows, gr.ld_t, vt.data() + n0, ldk, dscores.data(), BN);       // dP = dO V^T
          cpu::softmax_grad_tile(probs.data(), dscores.data(), BN, rows, cols, row_lse.data(), delta.data());
          cpu::gemm<acc_t, true>(cols, D, rows, probs.data(), BN, g_rows, gr.ld_t, dvb.data() + n0 * D, D, acc_t(1),
                                 true);  // dV += P^T dO
          cpu::gemm<acc_t, true>(cols, D, rows, dscores.data(), BN, q_rows, qr.ld_t, dkb.data() + n0 * D, D, scale,
                                 true);  // dK += scale dS^T Q
          cpu::gemm(rows, D, cols, dscores.data(), BN, kr.p + n0 * kr.ld_t, kr.ld_t, dqb.data(), D, acc_t(1),
                    true);  // dQ += dS K
        }
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* dst = dq_p + (((b * T + t) * S + m0 + r) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(scale * dqb[r * D + d]);
        }
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t offset = (((b * T + t) * S + s) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          dk_p[offset + d] = static_cast<scalar_t>(dkb[s * D + d]);
          dv_p[offset + d] = static_cast<scalar_t>(dvb[s * D + d]);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spatial_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    spatial_bwd_impl<scalar_t, acc_t>(grad_out, q, k, v, out, lse_c, static_cast<acc_t>(scale), dq, dk, dv);
  });
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
