// CogVideo dual-channel attention and the alpha mix, CPU kernels (the "cpp" backend).
//
// Attention, per (b, h), scale s = D^-1/2, visible(i, j) = key_visible(layout, i, j) && key j not padded text
// (csrc/dual_channel_visibility.h, the rule of pyext/torchnova/dual_channel/masks.py):
//   forward:  S_ij = s q_i.k_j;  lse_i = log sum_{visible j} exp(S_ij);  out_i = sum_j exp(S_ij - lse_i) v_j
//             (no visible key: out_i = 0, lse_i = +inf)
//   backward: P_ij = exp(S_ij - lse_i), delta_i = dout_i.out_i, dS_ij = P_ij (dout_i.v_j - delta_i)
//             dq_i = s sum_j dS_ij k_j,  dk_j = s sum_i dS_ij q_i,  dv_j = sum_i P_ij dout_i
// q, k, v, out, dout: (B, L, H, D); lse (B, L, H) acc. Work is split over (b, h) (at::parallel_for) so the
// dk/dv accumulation of one (b, h) is owned by one thread. Queries and keys are walked in blocks of 32 tokens
// and key blocks for which block_may_see is false are skipped, so the cost follows the visible pairs.
// Mix: a = sigmoid(alpha_logit) (hidden,); y = o_base on text rows, a o_base + (1 - a) o_plus on frame rows.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "dual_channel_visibility.h"

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

// For every (query block, key block) pair: may any pair be visible (padding ignored here, applied per key).
std::vector<std::vector<int>> visible_key_blocks(const Layout& layout, int length) {
  const int blocks = (length + kBlock - 1) / kBlock;
  std::vector<std::vector<int>> lists(blocks);
  for (int qb = 0; qb < blocks; ++qb)
    for (int kb = 0; kb < blocks; ++kb)
      if (block_may_see(layout, qb * kBlock, std::min(length, (qb + 1) * kBlock), kb * kBlock,
                        std::min(length, (kb + 1) * kBlock)))
        lists[qb].push_back(kb);
  return lists;
}

template <typename acc_t>
void attention_fwd_kernel(const Layout& layout, const acc_t* q,      // (B, L, H, D) contiguous
                          const acc_t* k, const acc_t* v,            // (B, L, H, D) contiguous
                          const bool* key_present,                   // (B, L): key exists (text padding)
                          acc_t* out,                                // (B, L, H, D)
                          acc_t* lse,                                // (B, L, H)
                          int64_t B, int64_t L, int64_t H, int64_t D) {
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(D));
  const auto lists = visible_key_blocks(layout, int(L));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bool* present = key_present + b * L;
      for (int64_t i = 0; i < L; ++i) {
        const acc_t* qi = q + ((b * L + i) * H + h) * D;
        acc_t row_max = -std::numeric_limits<acc_t>::infinity(), row_sum = 0;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int kb : lists[i / kBlock]) {
          const int64_t j_end = std::min<int64_t>(L, int64_t(kb + 1) * kBlock);
          for (int64_t j = int64_t(kb) * kBlock; j < j_end; ++j) {
            if (!present[j] || !key_visible(layout, int(i), int(j))) continue;
            const acc_t* kj = k + ((b * L + j) * H + h) * D;
            acc_t dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
            const acc_t score = dot * scale;
            if (score > row_max) {
              const acc_t correction = std::exp(row_max - score);
              row_sum *= correction;
              for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
              row_max = score;
            }
            const acc_t p = std::exp(score - row_max);
            row_sum += p;
            const acc_t* vj = v + ((b * L + j) * H + h) * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += p * vj[d];
          }
        }
        acc_t* oi = out + ((b * L + i) * H + h) * D;
        if (row_sum > 0) {
          for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] / row_sum;
          lse[(b * L + i) * H + h] = row_max + std::log(row_sum);
        } else {
          for (int64_t d = 0; d < D; ++d) oi[d] = 0;
          lse[(b * L + i) * H + h] = std::numeric_limits<acc_t>::infinity();
        }
      }
    }
  });
}

template <typename acc_t>
void attention_bwd_kernel(const Layout& layout, const acc_t* dout,  // (B, L, H, D)
                          const acc_t* q, const acc_t* k, const acc_t* v, const acc_t* out,  // (B, L, H, D)
                          const acc_t* lse,                                                  // (B, L, H)
                          const bool* key_present,                                           // (B, L)
                          acc_t* dq, acc_t* dk, acc_t* dv,  // (B, L, H, D), zero-initialised
                          int64_t B, int64_t L, int64_t H, int64_t D) {
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(D));
  const auto lists = visible_key_blocks(layout, int(L));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bool* present = key_present + b * L;
      for (int64_t i = 0; i < L; ++i) {
        const int64_t row = (b * L + i) * H + h;
        const acc_t row_lse = lse[row];
        if (std::isinf(row_lse)) continue;  // no visible key: P = 0, no gradient
        const acc_t* qi = q + row * D;
        const acc_t* doi = dout + row * D;
        const acc_t* oi = out + row * D;
        acc_t delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += doi[d] * oi[d];
        acc_t* dqi = dq + row * D;
        for (int kb : lists[i / kBlock]) {
          const int64_t j_end = std::min<int64_t>(L, int64_t(kb + 1) * kBlock);
          for (int64_t j = int64_t(kb) * kBlock; j < j_end; ++j) {
            if (!present[j] || !key_visible(layout, int(i), int(j))) continue;
            const int64_t key_row = (b * L + j) * H + h;
            const acc_t* kj = k + key_row * D;
            const acc_t* vj = v + key_row * D;
            acc_t dot = 0, dp = 0;
            for (int64_t d = 0; d < D; ++d) {
              dot += qi[d] * kj[d];
              dp += doi[d] * vj[d];
            }
            const acc_t p = std::exp(dot * scale - row_lse);
            const acc_t ds = p * (dp - delta) * scale;
            acc_t* dkj = dk + key_row * D;
            acc_t* dvj = dv + key_row * D;
            for (int64_t d = 0; d < D; ++d) {
              dqi[d] += ds * kj[d];
              dkj[d] += ds * qi[d];
              dvj[d] += p * doi[d];
            }
          }
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
  auto qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  auto out = at::empty({B, L, H, D}, qa.options());
  auto lse = at::empty({B, L, H}, qa.options());
  auto present = key_present_tensor(text_pad_mask, B, L, text_len);
  AT_DISPATCH_FLOATING_TYPES(acc, "cogvideo_attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(layout, qa.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(), va.data_ptr<scalar_t>(),
                                   present.data_ptr<bool>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B,
                                   L, H, D);
  });
  return {out.to(q.scalar_type()), lse};
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
  const auto acc = acc_type(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == L && lse.size(2) == H &&
                  lse.scalar_type() == acc,
              "cogvideo_attention_bwd: lse must be (B, L, H) of the accumulation dtype, got ", lse.sizes());
  auto qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  auto oa = out.to(acc).contiguous(), ga = grad_out.to(acc).contiguous(), la = lse.contiguous();
  auto dq = at::zeros({B, L, H, D}, qa.options()), dk = at::zeros_like(dq), dv = at::zeros_like(dq);
  auto present = key_present_tensor(text_pad_mask, B, L, text_len);
  AT_DISPATCH_FLOATING_TYPES(acc, "cogvideo_attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(layout, ga.data_ptr<scalar_t>(), qa.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(),
                                   va.data_ptr<scalar_t>(), oa.data_ptr<scalar_t>(), la.data_ptr<scalar_t>(),
                                   present.data_ptr<bool>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                   dv.data_ptr<scalar_t>(), B, L, H, D);
  });
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
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
