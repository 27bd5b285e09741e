// STAND-IN, NOT THE PROJECT'S RULE: a local copy of the dual-channel visibility rule (DESIGN.md section 2) so that
// csrc/cuda/dual_channel_attention.cu compiles while csrc/dual_channel_visibility.h (branch issue6, validated
// there against pyext/torchnova/dual_channel/masks.py through the C++ CPU kernel) has not been committed. Delete
// this file and include csrc/dual_channel_visibility.h as soon as that header exists.
//
// Interface the CUDA kernel expects (host + device, all inline):
//   VisibilityLayout make_visibility_layout(text_len, frames, grid_h, grid_w, plus, window_mode, window, shifted,
//                                           interpolation)
//   bool key_visible(layout, query, key)                       token indices in [0, L)
//   bool block_may_see(layout, q_begin, q_end, k_begin, k_end)   false only if no pair of the ranges is visible
//   bool block_all_visible(layout, q_begin, q_end, k_begin, k_end) true only if every pair is visible
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TORCHNOVA_HD __host__ __device__
#else
#define TORCHNOVA_HD
#endif

namespace torchnova {
namespace dual_channel {

struct VisibilityLayout {
  int64_t text_len, frames, grid_h, grid_w;
  int64_t window, shift;  // shift = window / 2 on shifted layers, else 0
  bool plus, window_mode, interpolation;
};

inline VisibilityLayout make_visibility_layout(int64_t text_len, int64_t frames, int64_t grid_h, int64_t grid_w,
                                               bool plus, bool window_mode, int64_t window, bool shifted,
                                               bool interpolation) {
  return {text_len, frames, grid_h, grid_w, window, shifted ? window / 2 : 0, plus, window_mode, interpolation};
}

// Window group of a row (or column) coordinate. Shifted layers roll the grid by -shift and apply the Swin region
// mask, which in original coordinates groups [0, shift), [shift, shift + window), ..., [G - window + shift, G).
TORCHNOVA_HD inline int64_t window_group(const VisibilityLayout& l, int64_t coord) {
  return l.shift > 0 ? (coord + l.window - l.shift) / l.window : coord / l.window;
}

// Whether frame fq's rows may see frame fk's keys at some position (the position rule aside).
TORCHNOVA_HD inline bool frames_may_see(const VisibilityLayout& l, int64_t fq, int64_t fk) {
  if (!l.plus) return fq == fk;
  if (!l.interpolation) return fk <= fq;
  if (fq % 2 == 0) return fk % 2 == 0;
  return fk % 2 == 0 || fk <= fq;
}

TORCHNOVA_HD inline bool key_visible(const VisibilityLayout& l, int64_t query, int64_t key) {
  const int64_t text = l.text_len, tokens = l.grid_h * l.grid_w;
  if (query < text) return !l.plus && key < text;  // plus-channel text rows see nothing
  if (key < text) return true;
  const int64_t fq = (query - text) / tokens, fk = (key - text) / tokens;
  if (!frames_may_see(l, fq, fk)) return false;
  if (l.plus && l.window_mode) {
    const int64_t pq = (query - text) % tokens, pk = (key - text) % tokens;
    if (window_group(l, pq / l.grid_w) != window_group(l, pk / l.grid_w) ||
        window_group(l, pq % l.grid_w) != window_group(l, pk % l.grid_w)) {
      return false;
    }
  }
  // Causal inside the own frame, except key frames (even) of the interpolation stage, which see it fully.
  if (fk == fq) return key <= query || (l.interpolation && fq % 2 == 0);
  return true;
}

// Group-coordinate bounding box of the frame tokens [begin, end) (begin >= text_len): rows and columns they cover.
struct GroupBox {
  int64_t row_lo, row_hi, col_lo, col_hi;
};

TORCHNOVA_HD inline GroupBox group_box(const VisibilityLayout& l, int64_t begin, int64_t end) {
  const int64_t tokens = l.grid_h * l.grid_w;
  const int64_t first = begin - l.text_len, last = end - 1 - l.text_len;
  int64_t row_lo = 0, row_hi = l.grid_h - 1, col_lo = 0, col_hi = l.grid_w - 1;
  if (first / tokens == last / tokens) {  // one frame: the rows between, the columns between if one row
    const int64_t p0 = first % tokens, p1 = last % tokens;
    row_lo = p0 / l.grid_w;
    row_hi = p1 / l.grid_w;
    if (row_lo == row_hi) {
      col_lo = p0 % l.grid_w;
      col_hi = p1 % l.grid_w;
    }
  }
  return {window_group(l, row_lo), window_group(l, row_hi), window_group(l, col_lo), window_group(l, col_hi)};
}

TORCHNOVA_HD inline bool block_may_see(const VisibilityLayout& l, int64_t q_begin, int64_t q_end, int64_t k_begin,
                                       int64_t k_end) {
  const int64_t text = l.text_len, tokens = l.grid_h * l.grid_w;
  if (k_begin < text) {  // text keys: every base row, every frame row
    if (!l.plus || q_end > text) return true;
  }
  const int64_t qf_begin = q_begin > text ? q_begin : text, kf_begin = k_begin > text ? k_begin : text;
  if (qf_begin >= q_end || kf_begin >= k_end) return false;  // text rows never see frame keys
  const int64_t fq0 = (qf_begin - text) / tokens, fq1 = (q_end - 1 - text) / tokens;
  const int64_t fk0 = (kf_begin - text) / tokens, fk1 = (k_end - 1 - text) / tokens;
  bool frames_ok = false;
  for (int64_t fq = fq0; fq <= fq1 && !frames_ok; ++fq) {
    for (int64_t fk = fk0; fk <= fk1 && !frames_ok; ++fk) {
      if (!frames_may_see(l, fq, fk)) continue;
      // Same frame and causal there: needs a key at or before some query.
      frames_ok = fq != fk || kf_begin <= q_end - 1 || (l.interpolation && fq % 2 == 0);
    }
  }
  if (!frames_ok) return false;
  if (!(l.plus && l.window_mode)) return true;
  const GroupBox qb = group_box(l, qf_begin, q_end), kb = group_box(l, kf_begin, k_end);
  return qb.row_lo <= kb.row_hi && kb.row_lo <= qb.row_hi && qb.col_lo <= kb.col_hi && kb.col_lo <= qb.col_hi;
}

TORCHNOVA_HD inline bool block_all_visible(const VisibilityLayout& l, int64_t q_begin, int64_t q_end,
                                           int64_t k_begin, int64_t k_end) {
  const int64_t text = l.text_len, tokens = l.grid_h * l.grid_w;
  if (k_end <= text) return !l.plus || q_begin >= text;  // text keys only
  if (k_begin < text || q_begin < text) return false;     // mixed text / frame ranges: check per element
  if (l.plus && l.window_mode) return false;              // tiles rarely sit inside one window: per element
  const int64_t fq0 = (q_begin - text) / tokens, fq1 = (q_end - 1 - text) / tokens;
  const int64_t fk0 = (k_begin - text) / tokens, fk1 = (k_end - 1 - text) / tokens;
  for (int64_t fq = fq0; fq <= fq1; ++fq) {
    for (int64_t fk = fk0; fk <= fk1; ++fk) {
      if (!frames_may_see(l, fq, fk)) return false;
      if (fq == fk && !(l.interpolation && fq % 2 == 0) && k_end - 1 > q_begin) return false;  // causal part
    }
  }
  return true;
}

}  // namespace dual_channel
}  // namespace torchnova
