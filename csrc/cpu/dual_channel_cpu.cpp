// CogVideo dual-channel attention and the alpha mix, CPU kernels (the "cpp" backend).
//
// Attention, per (b, h), scale s = D^-1/2, visible(i, j) = key_visible(layout, i, j) && key j not padded text
// (csrc/dual_channel_visibility.h, the rule of pyext/torchnova/dual_channel/masks.py):
//   forward:  S_ij = s q_i.k_j;  lse_i = log sum_{visible j} exp(S_ij);  out_i = sum_j exp(S_ij - lse_i) v_j
//             (no visible key: out_i = 0, lse_i = +inf)
//   backward: P_ij = exp(S_ij - lse_i), delta_i = dout_i.out_i, dS_ij = P_ij (dout_i.v_j - delta_i)
//             dq_i = s sum_j dS_ij k_j,  dk_j = s sum_i dS_ij q_i,  dv_j = sum_i P_ij dout_i
// q, k, v, out, dout: (B, L, H, D); lse (B, L, H) acc. Work is split over (b, h) (at::parallel_for) so the
// dk/dv accumulation of one (b, h) is owned by one thread; each head's rows are staged contiguously in the
// accumulation type (fp16/bf16 converted there). Queries and keys are walked in tiles of 32 x 32 tokens: the
// visibility bits of every tile that block_may_see admits are computed once per call (key_visible per pair) and
// tiles without a visible pair are dropped, so the cost follows the visible pairs; on each kept tile the
// products are the register-blocked ones of tile_gemm.h (FlashAttention-2: online softmax in the forward, P
// recomputed from lse in the backward), with the tile's bits applied as -inf unless all its pairs are visible.
// Mix: a = sigmoid(alpha_logit) (hidden,); y = o_base on text rows, a o_base + (1 - a) o_plus on frame rows.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "dual_channel_visibility.h"
#include "cpu_dispatch.h"
#include "cpu_math.h"
#include "flash_tile.h"
#include "tile_gemm.h"

namespace {

using torchnova::dual_channel::block_may_see;
using torchnova::dual_channel::key_visible;
using torchnova::dual_channel::Layout;

constexpr int kBlock = 32;

int parse_choice(const std::string& value, const char* name, const char* first, const char* second) {
  if (value == first) return 0;
  if (value == second) return 1;
  TORCH_CHECK(false, "cogvideo_attention: ", name, " must be \"", first, "\" or \"", second, "\", got \"", value,
              "\"");
  return 0;
}

Layout check_and_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& text_pad_mask, int64_t text_len, int64_t frames,
                        int64_t grid_h, int64_t grid_w, const std::string& channel, const std::string& attention,
                        int64_t window, bool shifted, const std::string& stage) {
  TORCH_CHECK(q.dim() == 4, "cogvideo_attention: q must be 4-D (B, L, H, D), got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "cogvideo_attention: k and v must have q's shape ",
              q.sizes(), ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "cogvideo_attention: q, k, v must share one dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "cogvideo_attention: q must be floating point, got ",
              q.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "cogvideo_attention (cpu): expected CPU tensors");
  TORCH_CHECK(text_len >= 0 && frames >= 1 && grid_h >= 1 && grid_w >= 1,
              "cogvideo_attention: need text_len >= 0, frames, grid_h, grid_w >= 1");
  TORCH_CHECK(q.size(1) == text_len + frames * grid_h * grid_w, "cogvideo_attention: L = ", q.size(1),
              " must equal text_len + frames * grid_h * grid_w = ", text_len + frames * grid_h * grid_w);
  const int channel_id = parse_choice(channel, "channel", "base", "plus");
  const int attention_id = parse_choice(attention, "attention", "full", "window");
  const int stage_id = parse_choice(stage, "stage", "sequential", "interpolation");
  if (attention_id == 1 && channel_id == 1) {
    TORCH_CHECK(window >= 1 && grid_h % window == 0 && grid_w % window == 0, "cogvideo_attention: window ", window,
                " must divide grid ", grid_h, "x", grid_w);
  }
  if (text_pad_mask.has_value()) {
    const auto& m = *text_pad_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == text_len &&
                    m.is_contiguous() && m.device().is_cpu(),
                "cogvideo_attention: text_pad_mask must be a contiguous CPU bool tensor of shape (", q.size(0), ", ",
                text_len, "), got ", m.sizes());
  }
  return torchnova::dual_channel::make_layout(int(text_len), int(frames), int(grid_h), int(grid_w), channel_id,
                                              attention_id, int(window), shifted, stage_id);
}

// Visibility of one (query block, key block) tile: bit j of rows[i] says key kb*kBlock + j is visible to query
// qb*kBlock + i (text padding left out: it depends on b). Built once per call from key_visible; tiles without a
// visible pair are dropped, so the kernels loop over visible tiles only.
struct TileMask {
  int key_block;
  bool all_visible;  // every in-range pair visible: the kernels skip the per-element masking
  uint32_t rows[kBlock];
};

std::vector<std::vector<TileMask>> visible_tiles(const Layout& layout, int length) {
  const int blocks = (length + kBlock - 1) / kBlock;
  std::vector<std::vector<TileMask>> tiles(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int qb = int(begin); qb < int(end); ++qb) {
      const int q_lo = qb * kBlock, q_hi = std::min(length, q_lo + kBlock);
      for (int kb = 0; kb < blocks; ++kb) {
        const int k_lo = kb * kBlock, k_hi = std::min(length, k_lo + kBlock);
        if (!block_may_see(layout, q_lo, q_hi, k_lo, k_hi)) continue;
        TileMask tile{kb, true, {}};
        const uint32_t full = k_hi - k_lo == 32 ? ~uint32_t(0) : (uint32_t(1) << (k_hi - k_lo)) - 1;
        uint32_t any = 0;
        for (int i = q_lo; i < q_hi; ++i) {
          uint32_t bits = 0;
          for (int j = k_lo; j < k_hi; ++j) bits |= uint32_t(key_visible(layout, i, j)) << (j - k_lo);
          tile.rows[i - q_lo] = bits;
          tile.all_visible = tile.all_visible && bits == full;
          any |= bits;
        }
        if (any != 0) tiles[qb].push_back(tile);
      }
    }
  });
  return tiles;
}

// visible_tiles() costs one key_visible per pair of every admitted tile, as much as the attention itself at a
// few heads; every layer of a model with the same layout (and each forward's backward) asks for the same tiles,
// so they are kept in a small process-wide cache keyed by the layout.
std::shared_ptr<const std::vector<std::vector<TileMask>>> cached_visible_tiles(const Layout& layout, int length) {
  using Key = std::array<int, 10>;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const std::vector<std::vector<TileMask>>>> cache;
  const Key key{layout.text_len, layout.frames, layout.grid_h, layout.grid_w, layout.window,
                layout.shift,    layout.channel, layout.attention, layout.stage, length};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  auto tiles = std::make_shared<const std::vector<std::vector<TileMask>>>(visible_tiles(layout, length));
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= 32) cache.clear();  // a model uses a handful of layouts; never grow without bound
  cache.emplace(key, tiles);
  return tiles;
}

// Bit j of word kb: key kb*kBlock + j of batch b exists (text_pad_mask), for every key block of a batch.
std::vector<uint32_t> present_words(const bool* key_present, int64_t B, int64_t L) {
  const int64_t blocks = (L + kBlock - 1) / kBlock;
  std::vector<uint32_t> words(B * blocks, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < L; ++j) words[b * blocks + j / kBlock] |= uint32_t(key_present[b * L + j]) << (j % kBlock);
  }
  return words;
}

// scores[r * ld + j] = -inf where the tile (and text padding) hides key j from row r.
template <typename acc_t>
TORCHNOVA_INLINE void mask_tile(const TileMask& tile, uint32_t present, int64_t rows, int64_t cols, acc_t* scores,
                                int64_t ld) {
  const uint32_t full = cols == 32 ? ~uint32_t(0) : (uint32_t(1) << cols) - 1;
  if (tile.all_visible && (present & full) == full) return;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t bits = tile.rows[r] & present;
    acc_t* row = scores + r * ld;
    for (int64_t j = 0; j < cols; ++j) row[j] = (bits >> j) & 1u ? row[j] : neg_inf;
  }
}

// The L rows of (b, h) of a contiguous (B, L, H, D) tensor, staged contiguously (row stride D) in acc_t.
template <typename scalar_t, typename acc_t>
TORCHNOVA_INLINE void stage_head(const scalar_t* x, int64_t b, int64_t h, int64_t L, int64_t H, int64_t D,
                                 acc_t* dst) {
  for (int64_t i = 0; i < L; ++i) torchnova::cpu::convert_row(x + ((b * L + i) * H + h) * D, D, dst + i * D);
}

// Forward per (b, h), FlashAttention-2 over the visible tiles: for each query block, online softmax over its
// visible key blocks (scores = scale Q K^T masked per tile, running max/sum, O rescaled when the max grows).
template <typename scalar_t, typename acc_t>
void attention_fwd_kernel(const Layout& layout, const scalar_t* q,  // (B, L, H, D) contiguous
                          const scalar_t* k, const scalar_t* v,     // (B, L, H, D) contiguous
                          const bool* key_present,                  // (B, L): key exists (text padding)
                          scalar_t* out,                            // (B, L, H, D)
                          acc_t* lse,                               // (B, L, H)
                          int64_t B, int64_t L, int64_t H, int64_t D) {
  namespace cpu = torchnova::cpu;
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(D));
  const auto tiles_ptr = cached_visible_tiles(layout, int(L));
  const auto& tiles = *tiles_ptr;
  const auto present = present_words(key_present, B, L);
  const int64_t blocks = (L + kBlock - 1) / kBlock, ldk = cpu::transposed_ld<acc_t>(L);
  cpu::parallel_for_isa(B * H, 1, [&](int64_t begin, int64_t end, auto isa) TORCHNOVA_LAMBDA_INLINE {
    constexpr int W = decltype(isa)::kVectorBytes;  // the ISA copy's vector width (cpu_dispatch.h)
    std::vector<acc_t> qb(L * D), kb(L * D), vb(L * D), kt(D * ldk), ob(kBlock * D), scores(kBlock * kBlock),
        row_max(kBlock), row_sum(kBlock);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      stage_head(q, b, h, L, H, D, qb.data());
      stage_head(k, b, h, L, H, D, kb.data());
      stage_head(v, b, h, L, H, D, vb.data());
      cpu::transpose(kb.data(), D, L, D, kt.data(), ldk);
      for (int64_t qblock = 0; qblock < blocks; ++qblock) {
        const int64_t m0 = qblock * kBlock, rows = std::min<int64_t>(kBlock, L - m0);
        std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
        std::fill(ob.begin(), ob.end(), acc_t(0));
        for (const TileMask& tile : tiles[qblock]) {
          const int64_t n0 = int64_t(tile.key_block) * kBlock, cols = std::min<int64_t>(kBlock, L - n0);
          cpu::gemm<W>(rows, cols, D, qb.data() + m0 * D, D, kt.data() + n0, ldk, scores.data(), kBlock, scale);
          mask_tile(tile, present[b * blocks + tile.key_block], rows, cols, scores.data(), kBlock);
          cpu::online_softmax_tile(scores.data(), kBlock, rows, cols, row_max.data(), row_sum.data(), ob.data(), D,
                                   D);
          cpu::gemm<W>(rows, D, cols, scores.data(), kBlock, vb.data() + n0 * D, D, ob.data(), D, acc_t(1),
                    /*accumulate=*/true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row_index = (b * L + m0 + r) * H + h;
          scalar_t* dst = out + row_index * D;
          const bool empty = row_sum[r] == acc_t(0);  // no visible key: out = 0, lse = +inf
          const acc_t inv = empty ? acc_t(0) : acc_t(1) / row_sum[r];
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(ob[r * D + d] * inv);
          lse[row_index] = empty ? std::numeric_limits<acc_t>::infinity() : row_max[r] + std::log(row_sum[r]);
        }
      }
    }
  });
}

// Backward per (b, h) (one thread owns the dk/dv of a head), P recomputed from lse over the same visible tiles:
// dS = P o (dO V^T - delta), dV += P^T dO, dK += scale dS^T Q, dQ += dS K. Rows with lse = +inf get P = 0.
template <typename scalar_t, typename acc_t>
void attention_bwd_kernel(const Layout& layout, const scalar_t* dout,  // (B, L, H, D)
                          const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* out,
                          const acc_t* lse,          // (B, L, H)
                          const bool* key_present,   // (B, L)
                          scalar_t* dq, scalar_t* dk, scalar_t* dv,  // (B, L, H, D)
                          int64_t B, int64_t L, int64_t H, int64_t D) {
  namespace cpu = torchnova::cpu;
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(D));
  const auto tiles_ptr = cached_visible_tiles(layout, int(L));
  const auto& tiles = *tiles_ptr;
  const auto present = present_words(key_present, B, L);
  const int64_t blocks = (L + kBlock - 1) / kBlock, ldk = cpu::transposed_ld<acc_t>(L);
  cpu::parallel_for_isa(B * H, 1, [&](int64_t begin, int64_t end, auto isa) TORCHNOVA_LAMBDA_INLINE {
    constexpr int W = decltype(isa)::kVectorBytes;  // the ISA copy's vector width (cpu_dispatch.h)
    std::vector<acc_t> qb(L * D), kb(L * D), vb(L * D), gb(L * D), ob(L * D), kt(D * ldk), vt(D * ldk), dkb(L * D),
        dvb(L * D), dqb(kBlock * D), probs(kBlock * kBlock), dscores(kBlock * kBlock), delta(kBlock),
        row_lse(kBlock);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      stage_head(q, b, h, L, H, D, qb.data());
      stage_head(k, b, h, L, H, D, kb.data());
      stage_head(v, b, h, L, H, D, vb.data());
      stage_head(dout, b, h, L, H, D, gb.data());
      stage_head(out, b, h, L, H, D, ob.data());
      cpu::transpose(kb.data(), D, L, D, kt.data(), ldk);
      cpu::transpose(vb.data(), D, L, D, vt.data(), ldk);
      std::fill(dkb.begin(), dkb.end(), acc_t(0));
      std::fill(dvb.begin(), dvb.end(), acc_t(0));
      for (int64_t qblock = 0; qblock < blocks; ++qblock) {
        const int64_t m0 = qblock * kBlock, rows = std::min<int64_t>(kBlock, L - m0);
        const acc_t *q_rows = qb.data() + m0 * D, *g_rows = gb.data() + m0 * D;
        for (int64_t r = 0; r < rows; ++r) {
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) sum += g_rows[r * D + d] * ob[(m0 + r) * D + d];
          delta[r] = sum;  // rowsum(dO o O)
          row_lse[r] = lse[(b * L + m0 + r) * H + h];
        }
        std::fill(dqb.begin(), dqb.end(), acc_t(0));
        for (const TileMask& tile : tiles[qblock]) {
          const int64_t n0 = int64_t(tile.key_block) * kBlock, cols = std::min<int64_t>(kBlock, L - n0);
          cpu::gemm<W>(rows, cols, D, q_rows, D, kt.data() + n0, ldk, probs.data(), kBlock, scale);  // scale Q K^T
          mask_tile(tile, present[b * blocks + tile.key_block], rows, cols, probs.data(), kBlock);
          cpu::gemm<W>(rows, cols, D, g_rows, D, vt.data() + n0, ldk, dscores.data(), kBlock);  // dP = dO V^T
          cpu::softmax_grad_tile(probs.data(), dscores.data(), kBlock, rows, cols, row_lse.data(), delta.data());
          cpu::gemm<W, true>(cols, D, rows, probs.data(), kBlock, g_rows, D, dvb.data() + n0 * D, D, acc_t(1),
                                 true);  // dV += P^T dO
          cpu::gemm<W, true>(cols, D, rows, dscores.data(), kBlock, q_rows, D, dkb.data() + n0 * D, D, scale,
                                 true);  // dK += scale dS^T Q
          cpu::gemm<W>(rows, D, cols, dscores.data(), kBlock, kb.data() + n0 * D, D, dqb.data(), D, acc_t(1),
                    true);  // dQ += dS K
        }
        for (int64_t r = 0; r < rows; ++r) {
          scalar_t* dst = dq + ((b * L + m0 + r) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(scale * dqb[r * D + d]);
        }
      }
      for (int64_t i = 0; i < L; ++i) {
        const int64_t offset = ((b * L + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          dk[offset + d] = static_cast<scalar_t>(dkb[i * D + d]);
          dv[offset + d] = static_cast<scalar_t>(dvb[i * D + d]);
        }
      }
    }
  });
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor key_present_tensor(const c10::optional<at::Tensor>& text_pad_mask, int64_t B, int64_t L,
                              int64_t text_len) {
  auto present = at::ones({B, L}, at::TensorOptions().dtype(at::kBool));
  if (text_pad_mask.has_value() && text_len > 0) present.narrow(1, 0, text_len).copy_(*text_pad_mask);
  return present;
}

std::tuple<at::Tensor, at::Tensor> cogvideo_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& text_pad_mask,
    int64_t text_len, int64_t frames, int64_t grid_h, int64_t grid_w, c10::string_view channel,
    c10::string_view attention, int64_t window, bool shifted, c10::string_view stage) {
  const Layout layout = check_and_layout(q, k, v, text_pad_mask, text_len, frames, grid_h, grid_w,
                                         std::string(channel), std::string(attention), window, shifted,
                                         std::string(stage));
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const auto acc = acc_type(q.scalar_type());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto out = at::empty({B, L, H, D}, qc.options());
  auto lse = at::empty({B, L, H}, qc.options().dtype(acc));
  if (q.numel() == 0) return {out, lse};
  auto present = key_present_tensor(text_pad_mask, B, L, text_len);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cogvideo_attention_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attention_fwd_kernel<scalar_t, acc_t>(layout, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                          vc.data_ptr<scalar_t>(), present.data_ptr<bool>(), out.data_ptr<scalar_t>(),
                                          lse.data_ptr<acc_t>(), B, L, H, D);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cogvideo_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& text_pad_mask, int64_t text_len, int64_t frames,
    int64_t grid_h, int64_t grid_w, c10::string_view channel, c10::string_view attention, int64_t window,
    bool shifted, c10::string_view stage) {
  const Layout layout = check_and_layout(q, k, v, text_pad_mask, text_len, frames, grid_h, grid_w,
                                         std::string(channel), std::string(attention), window, shifted,
                                         std::string(stage));
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "cogvideo_attention_bwd: grad_out and out must have q's shape ", q.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "cogvideo_attention_bwd: grad_out and out must have q's dtype ", q.scalar_type());
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == L && lse.size(2) == H &&
                  lse.scalar_type() == acc,
              "cogvideo_attention_bwd: lse must be (B, L, H) of the accumulation dtype, got ", lse.sizes());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), oc = out.contiguous(),
             gc = grad_out.contiguous(), lc = lse.contiguous();
  auto dq = at::empty({B, L, H, D}, qc.options()), dk = at::empty_like(dq), dv = at::empty_like(dq);
  if (q.numel() == 0) return {dq, dk, dv};
  auto present = key_present_tensor(text_pad_mask, B, L, text_len);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cogvideo_attention_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attention_bwd_kernel<scalar_t, acc_t>(layout, gc.data_ptr<scalar_t>(), qc.data_ptr<scalar_t>(),
                                          kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), oc.data_ptr<scalar_t>(),
                                          lc.data_ptr<acc_t>(), present.data_ptr<bool>(), dq.data_ptr<scalar_t>(),
                                          dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B, L, H, D);
  });
  return {dq, dk, dv};
}

void check_mix(const at::Tensor& o_base, const at::Tensor& o_plus, const at::Tensor& alpha_logit, int64_t text_len) {
  TORCH_CHECK(o_base.dim() == 3, "dual_channel_mix: o_base must be (B, L, hidden), got ", o_base.sizes());
  TORCH_CHECK(o_plus.sizes() == o_base.sizes(), "dual_channel_mix: o_plus must have o_base's shape");
  TORCH_CHECK(alpha_logit.dim() == 1 && alpha_logit.size(0) == o_base.size(2),
              "dual_channel_mix: alpha_logit must be (hidden,)");
  TORCH_CHECK(o_plus.scalar_type() == o_base.scalar_type() && at::isFloatingType(o_base.scalar_type()),
              "dual_channel_mix: o_base and o_plus must share a floating dtype");
  TORCH_CHECK(o_base.device().is_cpu() && o_plus.device().is_cpu() && alpha_logit.device().is_cpu(),
              "dual_channel_mix (cpu): expected CPU tensors");
  TORCH_CHECK(text_len >= 0 && text_len <= o_base.size(1), "dual_channel_mix: text_len must be in [0, L]");
}

at::Tensor dual_channel_mix_fwd_cpu(const at::Tensor& o_base, const at::Tensor& o_plus, const at::Tensor& alpha_logit,
                                    int64_t text_len) {
  check_mix(o_base, o_plus, alpha_logit, text_len);
  const auto acc = acc_type(o_base.scalar_type());
  const int64_t B = o_base.size(0), L = o_base.size(1), C = o_base.size(2);
  auto base = o_base.to(acc).contiguous(), plus = o_plus.to(acc).contiguous();
  auto alpha = at::sigmoid(alpha_logit.to(acc)).contiguous();
  auto y = at::empty({B, L, C}, base.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "dual_channel_mix_fwd_cpu", [&] {
    const scalar_t* pb = base.data_ptr<scalar_t>();
    const scalar_t* pp = plus.data_ptr<scalar_t>();
    const scalar_t* pa = alpha.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t off = row * C;
        if (row % L < text_len) {
          for (int64_t c = 0; c < C; ++c) py[off + c] = pb[off + c];
        } else {
          for (int64_t c = 0; c < C; ++c) py[off + c] = pa[c] * pb[off + c] + (scalar_t(1) - pa[c]) * pp[off + c];
        }
      }
    });
  });
  return y.to(o_base.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_channel_mix_bwd_cpu(const at::Tensor& grad_y,
                                                                        const at::Tensor& o_base,
                                                                        const at::Tensor& o_plus,
                                                                        const at::Tensor& alpha_logit,
                                                                        int64_t text_len) {
  check_mix(o_base, o_plus, alpha_logit, text_len);
  TORCH_CHECK(grad_y.sizes() == o_base.sizes(), "dual_channel_mix_bwd: grad_y must have o_base's shape");
  const auto acc = acc_type(o_base.scalar_type());
  const int64_t B = o_base.size(0), L = o_base.size(1), C = o_base.size(2);
  auto base = o_base.to(acc).contiguous(), plus = o_plus.to(acc).contiguous(), g = grad_y.to(acc).contiguous();
  auto alpha = at::sigmoid(alpha_logit.to(acc)).contiguous();
  auto d_base = at::empty({B, L, C}, base.options()), d_plus = at::empty_like(d_base);
  auto d_alpha = at::zeros({C}, base.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "dual_channel_mix_bwd_cpu", [&] {
    const scalar_t* pb = base.data_ptr<scalar_t>();
    const scalar_t* pp = plus.data_ptr<scalar_t>();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const scalar_t* pa = alpha.data_ptr<scalar_t>();
    scalar_t* db = d_base.data_ptr<scalar_t>();
    scalar_t* dp = d_plus.data_ptr<scalar_t>();
    // d alpha_logit_c = a_c (1 - a_c) sum_{frame rows} g (o_base - o_plus): per-channel sums, serial over rows
    // within a channel chunk so no two threads touch one channel.
    at::parallel_for(0, C, 64, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t row = 0; row < B * L; ++row) {
        const int64_t off = row * C;
        const bool text = row % L < text_len;
        for (int64_t c = c_begin; c < c_end; ++c) {
          const scalar_t gc = pg[off + c];
          if (text) {
            db[off + c] = gc;
            dp[off + c] = 0;
          } else {
            db[off + c] = pa[c] * gc;
            dp[off + c] = (scalar_t(1) - pa[c]) * gc;
          }
        }
      }
    });
    scalar_t* pd = d_alpha.data_ptr<scalar_t>();
    at::parallel_for(0, C, 64, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t row = 0; row < B * L; ++row) {
        if (row % L < text_len) continue;
        const int64_t off = row * C;
        for (int64_t c = c_begin; c < c_end; ++c) pd[c] += pg[off + c] * (pb[off + c] - pp[off + c]);
      }
      for (int64_t c = c_begin; c < c_end; ++c) pd[c] *= pa[c] * (scalar_t(1) - pa[c]);
    });
  });
  const auto dt = o_base.scalar_type();
  return {d_base.to(dt), d_plus.to(dt), d_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CPU, m) {
  m.impl("cogvideo_attention_fwd", &cogvideo_attention_fwd_cpu);
  m.impl("cogvideo_attention_bwd", &cogvideo_attention_bwd_cpu);
  m.impl("dual_channel_mix_fwd", &dual_channel_mix_fwd_cpu);
  m.impl("dual_channel_mix_bwd", &dual_channel_mix_bwd_cpu);
}
