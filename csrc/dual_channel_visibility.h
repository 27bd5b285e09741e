// CogVideo dual-channel attention: which key a query sees, from token indices alone (no L x L mask).
// The same rule as pyext/torchnova/dual_channel/masks.py (pictures there), written as plain C++ so that the C++
// CPU kernels (csrc/cpu/dual_channel_cpu.cpp) and the CUDA kernels (csrc/cuda/dual_channel_*.cu) share
// one copy. No torch include: nvcc device code can use every function here.
//
// Tokens 0 .. text_len-1 are text; token t >= text_len is frame token p = t - text_len, frame f = p / (gh*gw),
// raster r = p % (gh*gw), row y = r / gw, col x = r % gw.
//   base channel:  text query -> text keys.  frame query -> text keys + own frame, causal (r_k <= r_q), except
//                  interpolation stage even frames (0, 2, 4, ...: the given key frames, any frame count), which
//                  see their whole frame.
//   plus channel:  text query -> nothing (out = 0).  frame query -> text keys + frame keys in its spatial group
//                  (attention "full": the whole grid; "window": window x window cells, on shifted layers the
//                  Swin groups of the grid rolled by -window/2 with the region rule) that are
//                  sequential:     at or before the query in (frame, raster) order;
//                  interpolation:  in an even frame; or (odd query frame) in the own frame at or before the
//                                  query, or in an earlier odd frame.
// Inside one spatial group, CogVideo's window-local raster order equals the global raster order, so "causal in
// the window sequence" is p_k <= p_q. Padded text keys (text_pad_mask) are masked by the caller (depends on b).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TORCHNOVA_HD __host__ __device__
#else
#define TORCHNOVA_HD
#endif

namespace torchnova {
namespace dual_channel {

enum Channel : int { kBase = 0, kPlus = 1 };
enum Attention : int { kFull = 0, kWindow = 1 };
enum Stage : int { kSequential = 0, kInterpolation = 1 };

struct Layout {
  int text_len;
  int frames;
  int grid_h;
  int grid_w;
  int window;  // spatial window side (used by attention == kWindow)
  int shift;   // window / 2 on shifted layers, else 0
  int channel;    // Channel
  int attention;  // Attention
  int stage;      // Stage
};

TORCHNOVA_HD inline Layout make_layout(int text_len, int frames, int grid_h, int grid_w, int channel, int attention,
                                       int window, bool shifted, int stage) {
  Layout layout;
  layout.text_len = text_len;
  layout.frames = frames;
  layout.grid_h = grid_h;
  layout.grid_w = grid_w;
  layout.window = window;
  layout.shift = (attention == kWindow && shifted) ? window / 2 : 0;
  layout.channel = channel;
  layout.attention = attention;
  layout.stage = stage;
  return layout;
}

TORCHNOVA_HD inline int seq_len(const Layout& layout) {
  return layout.text_len + layout.frames * layout.grid_h * layout.grid_w;
}

// Spatial group of a row (or column) coordinate along an axis of `size` cells. Non-shifted: coord / window.
// Shifted by s: the grid is rolled by -s, so rolled coordinate c' = (c - s) mod size; windows are c' / window and
// the region rule splits the last window at size - s. In original coordinates: c >= s -> (c - s) / window,
// c < s -> its own group `size / window` (the wrapped-around strip).
TORCHNOVA_HD inline int axis_group(const Layout& layout, int coord) {
  if (layout.channel != kPlus || layout.attention != kWindow) return 0;
  if (layout.shift == 0) return coord / layout.window;
  if (coord < layout.shift) return 0x7fffffff;  // the wrapped strip: a group of its own on this axis
  return (coord - layout.shift) / layout.window;
}

TORCHNOVA_HD inline bool key_visible(const Layout& layout, int query, int key) {
  const int text_len = layout.text_len;
  if (key < text_len) return query < text_len ? layout.channel == kBase : true;
  if (query < text_len) return false;
  const int frame_size = layout.grid_h * layout.grid_w;
  const int pq = query - text_len, pk = key - text_len;
  const int fq = pq / frame_size, fk = pk / frame_size;
  const int rq = pq - fq * frame_size, rk = pk - fk * frame_size;
  const bool interpolation = layout.stage == kInterpolation;
  if (layout.channel == kBase) {
    if (fq != fk) return false;
    if (interpolation && (fq % 2) == 0) return true;
    return rk <= rq;
  }
  if (layout.attention == kWindow) {
    const int yq = rq / layout.grid_w, xq = rq - yq * layout.grid_w;
    const int yk = rk / layout.grid_w, xk = rk - yk * layout.grid_w;
    if (axis_group(layout, yq) != axis_group(layout, yk)) return false;
    if (axis_group(layout, xq) != axis_group(layout, xk)) return false;
  }
  if (!interpolation) return pk <= pq;
  if ((fk % 2) == 0) return true;
  if ((fq % 2) == 0) return false;
  if (fk == fq) return rk <= rq;
  return fk < fq;
}

// Bit set of the spatial groups along one axis touched by frame positions [p_lo, p_hi] (inclusive). Group ids
// are mapped to bits modulo 63 plus bit 63 for the wrapped strip; aliasing only adds bits (conservative).
TORCHNOVA_HD inline uint64_t group_bit(int group) {
  return group == 0x7fffffff ? (uint64_t(1) << 63) : (uint64_t(1) << (group % 63));
}

TORCHNOVA_HD inline uint64_t row_groups(const Layout& layout, int p_lo, int p_hi) {
  const int global_row_lo = p_lo / layout.grid_w, global_row_hi = p_hi / layout.grid_w;
  if (global_row_hi - global_row_lo + 1 >= layout.grid_h) return ~uint64_t(0);
  uint64_t bits = 0;
  for (int row = global_row_lo; row <= global_row_hi; ++row) bits |= group_bit(axis_group(layout, row % layout.grid_h));
  return bits;
}

TORCHNOVA_HD inline uint64_t col_groups(const Layout& layout, int p_lo, int p_hi) {
  const int global_row_lo = p_lo / layout.grid_w, global_row_hi = p_hi / layout.grid_w;
  const int x_lo = p_lo % layout.grid_w, x_hi = p_hi % layout.grid_w;
  if (global_row_hi - global_row_lo >= 2 || (global_row_hi > global_row_lo && x_hi + 1 >= x_lo)) return ~uint64_t(0);
  uint64_t bits = 0;
  if (global_row_hi == global_row_lo) {
    for (int x = x_lo; x <= x_hi; ++x) bits |= group_bit(axis_group(layout, x));
  } else {
    for (int x = x_lo; x < layout.grid_w; ++x) bits |= group_bit(axis_group(layout, x));
    for (int x = 0; x <= x_hi; ++x) bits |= group_bit(axis_group(layout, x));
  }
  return bits;
}

// Conservative tile test: false only if no query in [q_lo, q_hi) sees any key in [k_lo, k_hi) (half-open
// token ranges). Tiles for which this is false can be skipped; true tiles still apply key_visible per pair.
TORCHNOVA_HD inline bool block_may_see(const Layout& layout, int q_lo, int q_hi, int k_lo, int k_hi) {
  if (q_lo >= q_hi || k_lo >= k_hi) return false;
  const int text_len = layout.text_len;
  if (k_lo < text_len && (layout.channel == kBase || q_hi > text_len)) return true;  // text keys
  const int kf_lo = k_lo > text_len ? k_lo : text_len;
  const int qf_lo = q_lo > text_len ? q_lo : text_len;
  if (kf_lo >= k_hi || qf_lo >= q_hi) return false;  // no frame keys, or only text queries (see no frame keys)
  const int frame_size = layout.grid_h * layout.grid_w;
  const int pq_lo = qf_lo - text_len, pq_hi = q_hi - 1 - text_len;
  const int pk_lo = kf_lo - text_len, pk_hi = k_hi - 1 - text_len;
  const int fq_lo = pq_lo / frame_size, fq_hi = pq_hi / frame_size;
  const int fk_lo = pk_lo / frame_size, fk_hi = pk_hi / frame_size;
  const bool interpolation = layout.stage == kInterpolation;
  if (layout.channel == kBase) {
    const int f_lo = fq_lo > fk_lo ? fq_lo : fk_lo, f_hi = fq_hi < fk_hi ? fq_hi : fk_hi;
    if (f_lo > f_hi) return false;              // no shared frame
    if (pk_lo <= pq_hi) return true;            // some key at or before some query
    return interpolation && (f_hi > f_lo || (f_lo % 2) == 0);  // only a fully visible (even) frame helps
  }
  bool time_ok;
  if (!interpolation) {
    time_ok = pk_lo <= pq_hi;
  } else if (fk_hi > fk_lo || (fk_lo % 2) == 0) {
    time_ok = true;  // the key range contains an even (fully visible) frame
  } else {           // a single odd key frame fk: odd query frames after it, or fk itself causally
    const int fk = fk_lo;
    int first_odd_after = fq_lo > fk + 1 ? fq_lo : fk + 1;
    if ((first_odd_after % 2) == 0) ++first_odd_after;
    time_ok = first_odd_after <= fq_hi || (fq_lo <= fk && fk <= fq_hi && pk_lo <= pq_hi);
  }
  if (!time_ok) return false;
  if (layout.attention != kWindow) return true;
  return (row_groups(layout, pq_lo, pq_hi) & row_groups(layout, pk_lo, pk_hi)) != 0 &&
         (col_groups(layout, pq_lo, pq_hi) & col_groups(layout, pk_lo, pk_hi)) != 0;
}

}  // namespace dual_channel
}  // namespace torchnova
