// CogVideo dual-channel attention, device side of the visibility rule: the per-pair test (pair_visible) and the
// per-tile skip test (tiles_interact) that every CogVideo CUDA kernel applies, SIMT (dual_channel_attention.cu)
// and tensor-core (attention_tc_fwd.cu, attention_tc_bwd.cu) alike, so that they mask exactly the same pairs and
// skip exactly the same tiles. The rule itself is csrc/dual_channel_visibility.h (shared with the CPU kernels).
//
//   visible(b, i, j) = i < L and j < L and not (j < text_len and text_pad_mask[b, j] is false)
//                      and key_visible(layout, i, j)
//   tiles_interact(queries [q_first, q_first + q_rows) x keys [k_first, k_first + k_rows), both clipped to L)
//                    = block_may_see(layout, ...): false only when no pair of the two ranges can be visible.
#pragma once

#include <cstdint>

#include "dual_channel_visibility.h"

namespace torchnova {
namespace dual_channel_cuda {

// The shape of one cogvideo_attention call as the kernels see it.
struct AttentionShape {
  int64_t batch, seq_len, heads, text_len;
  int head_dim;
  int64_t tiles;  // ceil(L / query rows per block) of the launch
  float scale;    // 1 / sqrt(D)
};

// Whether key `key` is visible from query `query` of batch b: in range, not padded text, and the layout rule.
// Token indices fit in int (the host checks L < 2^31), the rule's index type.
__device__ __forceinline__ bool pair_visible(const dual_channel::Layout& layout,
                                             const bool* __restrict__ text_pad_mask,  // (B, text_len) or nullptr
                                             int64_t b, int64_t query, int64_t key, const AttentionShape& shape) {
  const int64_t text_len = shape.text_len;
  if (query >= shape.seq_len || key >= shape.seq_len) return false;
  if (key < text_len && text_pad_mask != nullptr && !text_pad_mask[b * text_len + key]) return false;
  return dual_channel::key_visible(layout, static_cast<int>(query), static_cast<int>(key));
}

// Whether some pair of queries [q_first, q_first + q_rows) x keys [k_first, k_first + k_rows), both clipped to
// L, may be visible (false: skip the tile pair). Depends only on block-uniform values, so every thread of a block
// takes the same branch.
__device__ __forceinline__ bool tiles_interact(const dual_channel::Layout& layout, int64_t q_first, int q_rows,
                                               int64_t k_first, int k_rows, int64_t seq_len) {
  const int64_t q_end = q_first + q_rows < seq_len ? q_first + q_rows : seq_len;
  const int64_t k_end = k_first + k_rows < seq_len ? k_first + k_rows : seq_len;
  return dual_channel::block_may_see(layout, static_cast<int>(q_first), static_cast<int>(q_end),
                                     static_cast<int>(k_first), static_cast<int>(k_end));
}

}  // namespace dual_channel_cuda
}  // namespace torchnova
