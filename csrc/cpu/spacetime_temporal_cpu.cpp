// Temporal attention (Video Diffusion Models), CPU kernels (the "cpp" backend). Schemas: csrc/spacetime_ops.cpp.
//
// Layout (B, T, S, H, D); q, k, v any strides with stride(-1) == 1; out contiguous; gradients contiguous or
// packed into one (B, T, S, 3, H, D) dqkv (spacetime_cpu.h).
//
// One problem per (b, s, h), a sequence over the T frames (a huge batch of tiny problems):
//   s_ij = scale * q_i . k_j + bias[h, i, j]        visible(i, j) = seg[b,i] == seg[b,j] && (!causal || j <= i)
//   lse_i = log sum_{j visible} exp(s_ij),  P_ij = exp(s_ij - lse_i),  out_i = sum_j P_ij v_j
// backward (P recomputed from the scores: the whole T x T tile is on chip, so the backward renormalizes it
// instead of using the saved lse, whose rounding to the accumulation dtype would cost |lse| * eps of accuracy):
//   delta_i = dO_i . O_i,  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - delta_i)
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij dO_i,
//   dbias[h, i, j] = sum over all (b, s) problems of dS_ij
// Work items are (b, s) pairs: their T x H x D blocks of q, k, v (and dO in backward) are read in place when they
// already have the accumulation type (reads_in_place: not under rotary, not for 2 KiB-multiple frame strides), else
// copied to thread-local buffers in the accumulation type (contiguous H*D runs per frame, so the loads stream;
// outputs of the accumulation type are written in place by the products, others staged and converted), and the item's H problems
// run on them as small register-blocked matrix products (tile_gemm.h) on transposed score tiles (keys along
// rows, queries along columns; see softmax_columns): S^T = scale K Q^T (Q^T transposed by 8 x 8 shuffles), a
// vectorized softmax down the columns with the bias and the mask as one additive (H, T, Tp) tile (-inf where
// invisible), O = (P^T)^T V; backward dP^T = V dO^T, dV = P^T dO, dK = scale dS^T Q, dQ = scale (dS^T)^T K.
// at::parallel_for over items; the AVX-512, AVX2+FMA or baseline copy chosen at runtime (cpu_dispatch.h).
// dbias is reduced deterministically: items are cut into a number of chunks that depends only on the
// item count (not on the thread count); each chunk sums into its own (H, T, T) partial, and the partials
// are added in chunk order, so two runs give bit-identical results on any machine. The backward takes
// delta_i = sum_j P_ij dP_ij, equal to dO_i . O_i (O_i = sum_j P_ij v_j) but computed from the tile already in
// registers: the kernel is memory-bound, and this spares reading O, one of its input streams.
//
// Rotary position embedding (the temporal_attention_rotary_* ops): q and k are rotated while they are staged,
// x'[t] = cos[t] o x[t] + sin[t] o rotate_half(x[t]) on the first rot_dim dims (the rest pass through), with
// pairs (a, b) = (2i, 2i+1) (interleaved, rotary-embedding-torch) or (i, i + rot_dim/2) (half-split, GPT-NeoX/HF):
//   x'_a = cos_a x_a - sin_a x_b,   x'_b = cos_b x_b + sin_b x_a        cos, sin: (T, rot_dim) acc contiguous
// Every product then runs on the rotated q', k' unchanged, and the backward maps dq', dk' back through the
// transpose of that linear map, in place on each head's finished gradient rows:
//   dx_a = cos_a dx'_a + sin_b dx'_b,   dx_b = cos_b dx'_b - sin_a dx'_a
// (exact for any tables; no gradient for the tables themselves).
//
// float32 / float16 / bfloat16 inputs accumulate in float32; float64 in double (the gradcheck path).
#include <torch/extension.h>

#include "cpu_dispatch.h"
#include "cpu_math.h"
#include "spacetime_cpu.h"
#include "tile_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace torchnova {
namespace {

using namespace spacetime;  // View5, Rows, GradOutputs, GradTensors, the checks (spacetime_cpu.h)

constexpr int64_t kMaxBiasChunks = 256;

// Least work of one parallel chunk, in multiply-adds (~100 us on one core): an OpenMP region costs microseconds on
// an idle machine but a scheduler tick (8-20 ms measured on the 2-core development VM) when the other cores are
// busy, so small problems (the low-resolution levels of a video UNet) run on the calling thread.
constexpr int64_t kMinChunkMacs = int64_t(1) << 20;

// Row stride of a staged item: H*D plus one cache line, so the T frames do not share cache sets.
TORCHNOVA_INLINE int64_t staged_ld(int64_t HD) { return HD + 16; }

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

// Rotary tables and the rotation of one staged row (file header). cos == nullptr: no rotation.
template <typename acc_t>
struct RotaryTables {
  const acc_t* cos = nullptr;  // (T, rot_dim) contiguous
  const acc_t* sin = nullptr;  // (T, rot_dim) contiguous
  int64_t rot_dim = 0;
  bool interleaved = false;

  explicit operator bool() const { return cos != nullptr; }

  // x[0:rot_dim] of frame t <- its rotation (transpose: the backward's map of dx' to dx).
  template <bool kTranspose>
  TORCHNOVA_INLINE void rotate(acc_t* x, int64_t t) const {
    const acc_t* c = cos + t * rot_dim;
    const acc_t* s = sin + t * rot_dim;
    const int64_t half = rot_dim / 2;
    if (interleaved) {
      for (int64_t i = 0; i < half; ++i) pair<kTranspose>(x, c, s, 2 * i, 2 * i + 1);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) pair<kTranspose>(x, c, s, i, i + half);
    }
  }

  template <bool kTranspose>
  static TORCHNOVA_INLINE void pair(acc_t* x, const acc_t* c, const acc_t* s, int64_t a, int64_t b) {
    const acc_t xa = x[a], xb = x[b];
    if constexpr (kTranspose) {
      x[a] = c[a] * xa + s[b] * xb;
      x[b] = c[b] * xb - s[a] * xa;
    } else {
      x[a] = c[a] * xa - s[a] * xb;
      x[b] = c[b] * xb + s[b] * xa;
    }
  }

  // Every (frame, head) row of a staged item (row (t, h) at p + t * ld_t + h * ld_h).
  template <bool kTranspose>
  TORCHNOVA_INLINE void rotate_item(acc_t* p, int64_t ld_t, int64_t ld_h, int64_t T, int64_t H) const {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) rotate<kTranspose>(p + t * ld_t + h * ld_h, t);
    }
  }

  // The T rows of one head of a gradient (row t at p + t * ld_t).
  TORCHNOVA_INLINE void rotate_back_head(acc_t* p, int64_t ld_t, int64_t T) const {
    for (int64_t t = 0; t < T; ++t) rotate<true>(p + t * ld_t, t);
  }
};

// Whether item_rows may hand out a tensor's own rows instead of a staged copy: the tensor has the accumulation
// type, nothing rewrites its rows in the buffers (rotary rotates the staged q and k) and its frame stride is not a
// multiple of 2 KiB (the T frames of a head would then share a few L1 sets and evict each other; staging packs
// them). The products read any row stride, so the copy is a pass over q, k, v (and dO) that buys nothing (measured
// at T = 16, 8 heads x 40, frames 3*H*D apart in a fused qkv projection: a few percent of the float32 forward, within
// the noise of the loaded 2-core development VM).
template <typename acc_t, typename scalar_t>
bool reads_in_place(const View5<scalar_t>& x, bool rotated) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return !rotated && (x.st * static_cast<int64_t>(sizeof(scalar_t))) % 2048 != 0;
  } else {
    return false;
  }
}

// The T x H rows of temporal item (b, s): the tensor's own rows (in_place, from reads_in_place), else a staged
// copy in the accumulation type (H*D contiguous elements per frame when sh == D: one copy per frame).
template <typename acc_t, typename scalar_t>
TORCHNOVA_INLINE Rows<const acc_t> item_rows(const View5<scalar_t>& x, int64_t b, int64_t s, int64_t T, int64_t H,
                                             int64_t D, acc_t* staging, bool in_place) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (in_place) return {x.row(b, 0, s, 0), x.st, x.sh};
  }
  const int64_t ld = staged_ld(H * D);
  for (int64_t t = 0; t < T; ++t) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      if (x.sh == D) {  // the frame's H heads are one contiguous run: one copy instead of H short loops
        std::memcpy(staging + t * ld, x.row(b, t, s, 0), H * D * sizeof(acc_t));
        continue;
      }
    }
    for (int64_t h = 0; h < H; ++h) cpu::convert_row(x.row(b, t, s, h), D, staging + t * ld + h * D);
  }
  return {staging, ld, D};
}

// Where the products of item (b, s) write one output, whose token (b, t, s) starts at
// out + ((b * T + t) * S + s) * token_stride (H*D for a (B, T, S, H, D) tensor, 3*H*D for a slice of dqkv):
// straight into it when it has the accumulation type (each product tile is stored once, so its rows lying
// S*token_stride apart costs nothing; measured ~10 % off the forward), else into a staging buffer that store()
// converts (fp16/bf16).
template <typename acc_t, typename scalar_t>
struct ItemOutput {
  static constexpr bool kDirect = std::is_same_v<acc_t, scalar_t>;
  Rows<acc_t> rows;
  scalar_t* out;
  int64_t token_stride, b, s, T, S, HD;

  TORCHNOVA_INLINE ItemOutput(scalar_t* out_, int64_t token_stride_, int64_t b_, int64_t s_, int64_t T_, int64_t S_,
                              int64_t H, int64_t D, acc_t* staging)
      : out(out_), token_stride(token_stride_), b(b_), s(s_), T(T_), S(S_), HD(H * D) {
    if constexpr (kDirect) {
      rows = {out + (b * T * S + s) * token_stride, S * token_stride, D};
    } else {
      rows = {staging, staged_ld(HD), D};
    }
  }

  TORCHNOVA_INLINE void store() const {
    if constexpr (kDirect) return;
    for (int64_t t = 0; t < T; ++t) {
      scalar_t* dst = out + ((b * T + t) * S + s) * token_stride;
      const acc_t* src = rows.p + t * rows.ld_t;
#pragma omp simd
      for (int64_t e = 0; e < HD; ++e) dst[e] = static_cast<scalar_t>(src[e]);
    }
  }
};

// The kernels work on transposed score tiles, S^T (T keys x Tp queries): a query is a column, so the softmax
// over keys runs down the columns with vertical vector operations (max, sum, log of Tp queries at once), where a
// row-major tile needs two horizontal reductions and a scalar log per query (~15 % of the forward at T = 16).
// Queries are padded to Tp (a multiple of the vector width) columns: the padded columns of Q^T stay zero and their
// additive term is 0, so they hold finite values that no product reads (the products run over the T real columns).
// additive[(h * T + j) * Tp + i] = bias[h, i, j] (or 0) where key j is visible to query i in batch b, else -inf.
template <typename acc_t>
void build_additive(const acc_t* bias, const TemporalMask& mask, int64_t b, int64_t H, int64_t T, int64_t Tp,
                    acc_t* additive) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < T; ++j) {
      acc_t* row = additive + (h * T + j) * Tp;
      for (int64_t i = 0; i < Tp; ++i) {
        if (i >= T) {
          row[i] = acc_t(0);
        } else {
          row[i] = mask.visible(b, i, j) ? (bias ? bias[(h * T + i) * T + j] : acc_t(0)) : neg_inf;
        }
      }
    }
  }
}

// In place on a transposed tile p (T x Tp, row j = key j): column i becomes softmax_j(p[j, i] + additive[j, i]),
// and lse[i] its log-sum-exp. Every column max is finite (the diagonal is always visible; padded columns have
// additive 0); masked entries (-inf) give exactly 0. col_sum: Tp values of scratch.
template <typename acc_t>
TORCHNOVA_INLINE void softmax_columns(acc_t* p, const acc_t* additive, int64_t T, int64_t Tp, acc_t* lse,
                                      acc_t* col_sum) {
  acc_t* col_max = lse;
#pragma omp simd
  for (int64_t i = 0; i < Tp; ++i) {
    p[i] += additive[i];
    col_max[i] = p[i];
  }
  for (int64_t j = 1; j < T; ++j) {
    acc_t* row = p + j * Tp;
    const acc_t* a = additive + j * Tp;
#pragma omp simd
    for (int64_t i = 0; i < Tp; ++i) {
      row[i] += a[i];
      col_max[i] = row[i] > col_max[i] ? row[i] : col_max[i];
    }
  }
  std::fill(col_sum, col_sum + Tp, acc_t(0));
  for (int64_t j = 0; j < T; ++j) {
    acc_t* row = p + j * Tp;
#pragma omp simd
    for (int64_t i = 0; i < Tp; ++i) {
      row[i] = cpu::exp_nonpositive(row[i] - col_max[i]);
      col_sum[i] += row[i];
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < Tp; ++i) {
    lse[i] = col_max[i] + cpu::log_positive(col_sum[i]);
    col_sum[i] = acc_t(1) / col_sum[i];
  }
  for (int64_t j = 0; j < T; ++j) {
    acc_t* row = p + j * Tp;
#pragma omp simd
    for (int64_t i = 0; i < Tp; ++i) row[i] *= col_sum[i];
  }
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
                       const TemporalMask& mask, acc_t scale, const RotaryTables<acc_t>& rot, at::Tensor& out,
                       at::Tensor& lse) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4), HD = H * D;
  const int64_t Tp = cpu::round_up(T, cpu::kVectorLanes<acc_t>);
  const View5<scalar_t> qv(q), kv(k), vv(v);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  const int64_t staged = T * staged_ld(HD);
  const bool q_in_place = reads_in_place<acc_t>(qv, bool(rot)), k_in_place = reads_in_place<acc_t>(kv, bool(rot)),
             v_in_place = reads_in_place<acc_t>(vv, false);
  const int64_t grain = std::max<int64_t>(1, kMinChunkMacs / std::max<int64_t>(2 * T * T * HD, 1));  // QK^T, PV
  cpu::parallel_for_isa(B * S, grain, [&](int64_t lo, int64_t hi, auto isa) TORCHNOVA_LAMBDA_INLINE {
    constexpr int W = decltype(isa)::kVectorBytes;  // the ISA copy's vector width (cpu_dispatch.h)
    const int64_t out_staged = ItemOutput<acc_t, scalar_t>::kDirect ? 0 : staged;
    std::vector<acc_t> qb(q_in_place ? 0 : staged), kb(k_in_place ? 0 : staged), vb(v_in_place ? 0 : staged),
        ob(out_staged), qt(D * Tp), probs(T * Tp), lse_cols(Tp),
        scratch(Tp);
    AdditiveTile<acc_t> additive;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / S, s = item % S;
      const acc_t* add = additive.get(bias, mask, b, H, T, Tp);
      const auto qr = item_rows<acc_t>(qv, b, s, T, H, D, qb.data(), q_in_place);
      const auto kr = item_rows<acc_t>(kv, b, s, T, H, D, kb.data(), k_in_place);
      const auto vr = item_rows<acc_t>(vv, b, s, T, H, D, vb.data(), v_in_place);
      if (rot) {  // q', k': rotated in the staging buffers
        rot.template rotate_item<false>(qb.data(), qr.ld_t, qr.ld_h, T, H);
        rot.template rotate_item<false>(kb.data(), kr.ld_t, kr.ld_h, T, H);
      }
      const ItemOutput<acc_t, scalar_t> output(out_p, HD, b, s, T, S, H, D, ob.data());
      const auto& orows = output.rows;
      for (int64_t h = 0; h < H; ++h) {
        cpu::transpose(qr.head(h), qr.ld_t, T, D, qt.data(), Tp);                             // Q^T (D, Tp)
        cpu::gemm<W>(T, Tp, D, kr.head(h), kr.ld_t, qt.data(), Tp, probs.data(), Tp, scale);  // S^T = scale K Q^T
        softmax_columns(probs.data(), add + h * T * Tp, T, Tp, lse_cols.data(), scratch.data());
        for (int64_t i = 0; i < T; ++i) lse_p[((b * T + i) * S + s) * H + h] = lse_cols[i];
        cpu::gemm<W, true>(T, D, T, probs.data(), Tp, vr.head(h), vr.ld_t, orows.head(h), orows.ld_t);  // out = P V
      }
      output.store();
    }
  });
}

template <typename scalar_t, typename acc_t>
void temporal_bwd_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const acc_t* bias, const TemporalMask& mask,
                       acc_t scale, const RotaryTables<acc_t>& rot, const GradOutputs<scalar_t>& grads,
                       acc_t* dbias) {
  const int64_t B = q.size(0), T = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4), HD = H * D;
  const int64_t Tp = cpu::round_up(T, cpu::kVectorLanes<acc_t>);
  const View5<scalar_t> qv(q), kv(k), vv(v), gv(grad_out);  // out is not read: delta from P, dP (header)
  const int64_t items = B * S, staged = T * staged_ld(HD);
  // Deterministic dbias: a chunk count that depends on the item count only (never on the thread count).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxBiasChunks, (items + 15) / 16));
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  std::vector<acc_t> partial(dbias ? chunks * H * T * T : 0, acc_t(0));
  const bool q_in_place = reads_in_place<acc_t>(qv, bool(rot)), k_in_place = reads_in_place<acc_t>(kv, bool(rot)),
             v_in_place = reads_in_place<acc_t>(vv, false), g_in_place = reads_in_place<acc_t>(gv, false);
  // Chunks per parallel task: kMinChunkMacs of work (5 T x T x D products per head); the chunks themselves, and so
  // the dbias sums, do not depend on it.
  const int64_t grain = std::max<int64_t>(1, kMinChunkMacs / std::max<int64_t>(5 * T * T * HD * per_chunk, 1));
  cpu::parallel_for_isa(chunks, grain, [&](int64_t chunk_lo, int64_t chunk_hi, auto isa) TORCHNOVA_LAMBDA_INLINE {
    constexpr int W = decltype(isa)::kVectorBytes;  // the ISA copy's vector width (cpu_dispatch.h)
    const int64_t out_staged = ItemOutput<acc_t, scalar_t>::kDirect ? 0 : staged;
    std::vector<acc_t> qb(q_in_place ? 0 : staged), kb(k_in_place ? 0 : staged), vb(v_in_place ? 0 : staged),
        gb(g_in_place ? 0 : staged), dqb(out_staged), dkb(out_staged),
        dvb(out_staged), qt(D * Tp), gt(D * Tp), probs(T * Tp), dscores(T * Tp), lse_cols(Tp), delta(Tp);
    AdditiveTile<acc_t> additive;
    for (int64_t chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
      acc_t* chunk_bias = dbias ? &partial[chunk * H * T * T] : nullptr;
      const int64_t end = std::min(items, (chunk + 1) * per_chunk);
      for (int64_t item = chunk * per_chunk; item < end; ++item) {
        const int64_t b = item / S, s = item % S;
        const acc_t* add = additive.get(bias, mask, b, H, T, Tp);
        const auto qr = item_rows<acc_t>(qv, b, s, T, H, D, qb.data(), q_in_place);
        const auto kr = item_rows<acc_t>(kv, b, s, T, H, D, kb.data(), k_in_place);
        const auto vr = item_rows<acc_t>(vv, b, s, T, H, D, vb.data(), v_in_place);
        const auto gr = item_rows<acc_t>(gv, b, s, T, H, D, gb.data(), g_in_place);
        if (rot) {  // q', k' as in the forward; dq', dk' are rotated back below
          rot.template rotate_item<false>(qb.data(), qr.ld_t, qr.ld_h, T, H);
          rot.template rotate_item<false>(kb.data(), kr.ld_t, kr.ld_h, T, H);
        }
        const ItemOutput<acc_t, scalar_t> dq_out(grads.dq, grads.token_stride, b, s, T, S, H, D, dqb.data());
        const ItemOutput<acc_t, scalar_t> dk_out(grads.dk, grads.token_stride, b, s, T, S, H, D, dkb.data());
        const ItemOutput<acc_t, scalar_t> dv_out(grads.dv, grads.token_stride, b, s, T, S, H, D, dvb.data());
        const auto &dqr = dq_out.rows, &dkr = dk_out.rows, &dvr = dv_out.rows;
        for (int64_t h = 0; h < H; ++h) {
          cpu::transpose(qr.head(h), qr.ld_t, T, D, qt.data(), Tp);  // Q^T (D, Tp)
          cpu::transpose(gr.head(h), gr.ld_t, T, D, gt.data(), Tp);  // dO^T (D, Tp)
          cpu::gemm<W>(T, Tp, D, kr.head(h), kr.ld_t, qt.data(), Tp, probs.data(), Tp, scale);  // S^T = scale K Q^T
          cpu::gemm<W>(T, Tp, D, vr.head(h), vr.ld_t, gt.data(), Tp, dscores.data(), Tp);       // dP^T = V dO^T
          // P^T recomputed as the softmax of the whole on-chip column (max, exp, sum), not as exp(s - lse) from
          // the saved lse: lse is rounded to the accumulation dtype at its magnitude, so exp(s - lse) carries a
          // relative error of |lse| * eps (8x the float32 reference's gradient error at scores ~30, found by the
          // property tests). Same exp count; padded query columns (i >= T) get finite values no product reads.
          softmax_columns(probs.data(), add + h * T * Tp, T, Tp, lse_cols.data(), delta.data());
          std::fill(delta.begin(), delta.end(), acc_t(0));
          for (int64_t j = 0; j < T; ++j) {  // delta_i = sum_j P_ij dP_ij (= dO_i . O_i)
            const acc_t *p = probs.data() + j * Tp, *ds = dscores.data() + j * Tp;
#pragma omp simd
            for (int64_t i = 0; i < Tp; ++i) delta[i] += p[i] * ds[i];
          }
          for (int64_t j = 0; j < T; ++j) {  // dS^T = P^T o (dP^T - delta)
            acc_t *p = probs.data() + j * Tp, *ds = dscores.data() + j * Tp;
#pragma omp simd
            for (int64_t i = 0; i < Tp; ++i) ds[i] = p[i] * (ds[i] - delta[i]);
            if (chunk_bias) {  // the chunk's partial dbias, stored transposed like the tiles: [h, j, i]
              acc_t* db = chunk_bias + (h * T + j) * T;
#pragma omp simd
              for (int64_t i = 0; i < T; ++i) db[i] += ds[i];
            }
          }
          cpu::gemm<W>(T, D, T, probs.data(), Tp, gr.head(h), gr.ld_t, dvr.head(h), dvr.ld_t);  // dV = P^T dO
          cpu::gemm<W>(T, D, T, dscores.data(), Tp, qr.head(h), qr.ld_t, dkr.head(h), dkr.ld_t,
                       scale);  // dK = scale dS^T Q
          cpu::gemm<W, true>(T, D, T, dscores.data(), Tp, kr.head(h), kr.ld_t, dqr.head(h), dqr.ld_t,
                             scale);  // dQ = scale dS K
          if (rot) {  // dq = R^T dq', dk = R^T dk', in place on the head's finished rows
            rot.rotate_back_head(dqr.head(h), dqr.ld_t, T);
            rot.rotate_back_head(dkr.head(h), dkr.ld_t, T);
          }
        }
        dq_out.store();
        dk_out.store();
        dv_out.store();
      }
    }
  });
  if (dbias) {
    const int64_t n = H * T * T;
    std::fill(dbias, dbias + n, acc_t(0));
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // in chunk order; the partials are [h, j, i]
      const acc_t* part = &partial[chunk * n];
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t j = 0; j < T; ++j) {
          for (int64_t i = 0; i < T; ++i) dbias[(h * T + i) * T + j] += part[(h * T + j) * T + i];
        }
      }
    }
  }
}

void check_rotary(const char* op, const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin) {
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == q.size(1) && cos.size(1) % 2 == 0 && cos.size(1) >= 2 &&
                  cos.size(1) <= q.size(4),
              op, ": rotary_cos must have shape (T, rot_dim) with T = ", q.size(1),
              ", rot_dim even, 2 <= rot_dim <= D = ", q.size(4), ", got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": rotary_sin must have rotary_cos's shape ", cos.sizes(), ", got ",
              sin.sizes());
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->device().is_cpu(), op,
                ": rotary tables must be contiguous CPU ", acc, " tensors, got ", t->scalar_type());
  }
}

template <typename acc_t>
RotaryTables<acc_t> rotary_tables(const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                                  bool interleaved) {
  RotaryTables<acc_t> rot;
  if (cos.has_value()) {
    rot.cos = cos->data_ptr<acc_t>();
    rot.sin = sin->data_ptr<acc_t>();
    rot.rot_dim = cos->size(1);
    rot.interleaved = interleaved;
  }
  return rot;
}

// Shared by the two forward ops (rotary_cos/sin: both given or neither).
std::tuple<at::Tensor, at::Tensor> temporal_forward(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const c10::optional<at::Tensor>& bias,
                                                    const c10::optional<at::Tensor>& segment_ids, bool causal,
                                                    double scale, const c10::optional<at::Tensor>& rotary_cos,
                                                    const c10::optional<at::Tensor>& rotary_sin,
                                                    bool rotary_interleaved) {
  check_qkv(op, q, k, v);
  check_temporal_extras(op, q, bias, segment_ids);
  if (rotary_cos.has_value()) check_rotary(op, q, *rotary_cos, *rotary_sin);
  const auto acc = acc_type(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  const TemporalMask mask{segment_ids.has_value() ? segment_ids->data_ptr<int64_t>() : nullptr, causal, q.size(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "temporal_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* bias_p = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
    const auto rot = rotary_tables<acc_t>(rotary_cos, rotary_sin, rotary_interleaved);
    temporal_fwd_impl<scalar_t, acc_t>(q, k, v, bias_p, mask, static_cast<acc_t>(scale), rot, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const c10::optional<at::Tensor>& segment_ids,
                                                              bool causal, double scale) {
  return temporal_forward("temporal_attention_fwd", q, k, v, bias, segment_ids, causal, scale, c10::nullopt,
                          c10::nullopt, false);
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_rotary_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& segment_ids, bool causal, double scale, const at::Tensor& rotary_cos,
    const at::Tensor& rotary_sin, bool rotary_interleaved) {
  return temporal_forward("temporal_attention_rotary_fwd", q, k, v, bias, segment_ids, causal, scale, rotary_cos,
                          rotary_sin, rotary_interleaved);
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_rotary_qkvpacked_fwd_cpu(
    const at::Tensor& qkv, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& segment_ids,
    bool causal, double scale, const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, bool rotary_interleaved) {
  const auto [q, k, v] = unpack_qkv("temporal_attention_rotary_qkvpacked_fwd", qkv);
  return temporal_forward("temporal_attention_rotary_qkvpacked_fwd", q, k, v, bias, segment_ids, causal, scale,
                          rotary_cos, rotary_sin, rotary_interleaved);
}

// Shared by the two backward ops: checks, the gradient tensors (three, or one packed dqkv), the kernel.
GradTensors temporal_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& segment_ids,
                              bool causal, double scale, bool needs_bias_grad, bool packed, at::Tensor& dbias,
                              const c10::optional<at::Tensor>& rotary_cos = c10::nullopt,
                              const c10::optional<at::Tensor>& rotary_sin = c10::nullopt,
                              bool rotary_interleaved = false) {
  check_qkv(op, q, k, v);
  check_temporal_extras(op, q, bias, segment_ids);
  if (rotary_cos.has_value()) check_rotary(op, q, *rotary_cos, *rotary_sin);
  check_bwd_inputs(op, grad_out, q, out, lse);
  const auto acc = acc_type(q.scalar_type());
  const at::Tensor lse_c = lse.contiguous();
  GradTensors grads = GradTensors::allocate(q, packed);
  dbias = needs_bias_grad ? at::zeros({q.size(3), q.size(1), q.size(1)}, q.options().dtype(acc))
                          : at::empty({0}, q.options().dtype(acc));
  if (q.numel() == 0) return grads;
  const TemporalMask mask{segment_ids.has_value() ? segment_ids->data_ptr<int64_t>() : nullptr, causal, q.size(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "temporal_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* bias_p = bias.has_value() ? bias->data_ptr<acc_t>() : nullptr;
    const auto rot = rotary_tables<acc_t>(rotary_cos, rotary_sin, rotary_interleaved);
    temporal_bwd_impl<scalar_t, acc_t>(grad_out, q, k, v, out, lse_c, bias_p, mask, static_cast<acc_t>(scale), rot,
                                       grads.outputs<scalar_t>(), needs_bias_grad ? dbias.data_ptr<acc_t>() : nullptr);
  });
  return grads;
}

// deterministic: ignored, the CPU reduction is always deterministic (see the file header).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> temporal_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& segment_ids,
    bool causal, double scale, bool needs_bias_grad, bool /*deterministic*/) {
  at::Tensor dbias;
  GradTensors g = temporal_backward("temporal_attention_bwd", grad_out, q, k, v, out, lse, bias, segment_ids, causal,
                                    scale, needs_bias_grad, /*packed=*/false, dbias);
  return {g.dq, g.dk, g.dv, dbias};
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_qkvpacked_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& segment_ids, bool causal, double scale,
    bool needs_bias_grad, bool /*deterministic*/) {
  const auto [q, k, v] = unpack_qkv("temporal_attention_qkvpacked_bwd", qkv);
  at::Tensor dbias;
  GradTensors g = temporal_backward("temporal_attention_qkvpacked_bwd", grad_out, q, k, v, out, lse, bias,
                                    segment_ids, causal, scale, needs_bias_grad, /*packed=*/true, dbias);
  return {g.dqkv, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> temporal_attention_rotary_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& segment_ids,
    bool causal, double scale, const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, bool rotary_interleaved,
    bool needs_bias_grad, bool /*deterministic*/) {
  at::Tensor dbias;
  GradTensors g = temporal_backward("temporal_attention_rotary_bwd", grad_out, q, k, v, out, lse, bias, segment_ids,
                                    causal, scale, needs_bias_grad, /*packed=*/false, dbias, rotary_cos, rotary_sin,
                                    rotary_interleaved);
  return {g.dq, g.dk, g.dv, dbias};
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_rotary_qkvpacked_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& segment_ids, bool causal, double scale,
    const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, bool rotary_interleaved, bool needs_bias_grad,
    bool /*deterministic*/) {
  const auto [q, k, v] = unpack_qkv("temporal_attention_rotary_qkvpacked_bwd", qkv);
  at::Tensor dbias;
  GradTensors g = temporal_backward("temporal_attention_rotary_qkvpacked_bwd", grad_out, q, k, v, out, lse, bias,
                                    segment_ids, causal, scale, needs_bias_grad, /*packed=*/true, dbias, rotary_cos,
                                    rotary_sin, rotary_interleaved);
  return {g.dqkv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CPU, m) {
  m.impl("temporal_attention_rotary_fwd", &temporal_attention_rotary_fwd_cpu);
  m.impl("temporal_attention_rotary_bwd", &temporal_attention_rotary_bwd_cpu);
  m.impl("temporal_attention_rotary_qkvpacked_fwd", &temporal_attention_rotary_qkvpacked_fwd_cpu);
  m.impl("temporal_attention_rotary_qkvpacked_bwd", &temporal_attention_rotary_qkvpacked_bwd_cpu);
  m.impl("temporal_attention_fwd", &temporal_attention_fwd_cpu);
  m.impl("temporal_attention_bwd", &temporal_attention_bwd_cpu);
  m.impl("temporal_attention_qkvpacked_bwd", &temporal_attention_qkvpacked_bwd_cpu);
}

}  // namespace torchnova
