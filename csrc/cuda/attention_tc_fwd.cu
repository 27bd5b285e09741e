// Tensor-core FlashAttention-2 forward for spatial_attention and cogvideo_attention (sm_80+): float16 / bfloat16 with
// mma.m16n8k16, and float32 through TF32 mma.m16n8k8 when torch allows TF32 matmuls.
//
// Math, per problem (spatial: (b, t, h) over the S tokens of frame t; cogvideo: (b, h) over the L tokens, seen as T =
// 1, S = L), scale s, visible(i, j) = j < S for spatial, the CogVideo rule (dual_channel_visibility.cuh) for cogvideo:
//   x_ij = s * log2(e) * q_i . k_j for visible pairs, -inf otherwise     (base-2 scores: exp2 is one MUFU op)
//   m_i = max_j x_ij,  l_i = sum_j 2^(x_ij - m_i),  out_i = sum_j 2^(x_ij - m_i) v_j / l_i
//   lse_i = ln(2) * (m_i + log2 l_i)  (= log sum_j exp(s q_i . k_j), the natural-log lse the SIMT kernels write)
// A row with no visible key: out_i = 0, lse_i = +inf (as the SIMT kernels: P = exp(S - inf) = 0 in the backward).
//
// Shapes: q, k, v (B, T, S, H, D) (cogvideo: (B, L, H, D) = T of 1) float16 / bfloat16 / float32, any strides with unit
// head-dim stride, 1 <= D <= 128 (float32: D <= 64); out (B, T, S, H, D) contiguous q.dtype; lse (B, T, S, H) float32
// contiguous: the SIMT forward's outputs exactly, so either backward consumes them.
//
// Tiling. One block = 4 warps = 128 threads owns kBlockM = 64 query rows of one problem (16 per warp: the M of
// mma.m16n8k16) and streams key tiles of kBlockN = 64 keys. D is padded to kDPad = 64 or 128 (two instantiations per
// dtype and visibility; padding columns are zero). Shared memory (input dtype, swizzled, flash_tc.cuh):
//   Q [64][kDPad] + 2 stages x (K [64][kDPad] + V [64][kDPad]) = e * 5 * 64 * kDPad bytes (e = element bytes):
//   40 / 80 KiB for fp16 / bf16 (kDPad 64 / 128), 80 KiB for fp32 (kDPad 64 only: at 128 the TF32 instance
//   needs 255 registers and spills, so float32 with D > 64 stays on SIMT); smem_plan::tc_fwd_bytes.
// TF32 (fp32 inputs): the same loop with m16n8k8 (k-steps of 8), fragments rounded by cvt.rna.tf32; P reaches its
// A-fragment layout by quad shuffles and V its B fragments by plain shared loads (flash_tc.cuh). P stays fp32 (rounded
// to TF32 by the mma), so the TF32 path's error is that of TF32 products, about float16's. Per key tile, each warp: S
// (16 x 64) = Q K^T by 8 n-tiles x kDPad / 16 k-steps of mma (Q fragments stay in registers for the whole loop), mask,
// online softmax on the accumulator fragments (a lane holds rows group and group + 8, reduced over the 4 lanes of its
// quad), P rounded to the input dtype as the A operand of O (16 x kDPad) += P V. The next visible K / V tile is in
// flight (cp.async, double buffered) while the current one is multiplied. Why 64 x 64 and 4 warps: docs/performance.md
// "Tensor-core kernels" (a 64-row block does 64 FLOP per K/V byte it loads, which come from L2: a problem's K and V
// stay there across its query blocks, so HBM sees about the op's minimal bytes; 16 rows per warp keep D = 128 at <= 254
// registers without spills; 80 KiB lets 2 blocks share an sm_80 / sm_90 SM).
//
// Visibility policy (template): DenseVisibility (spatial: only j < S), CogVideoVisibility (per-element pair_visible,
// and key tiles for which tiles_interact is false are skipped: neither loaded nor multiplied). Blocks: grid.x =
// problems * query_blocks, problem (b, t, h) with h fastest, the query block reversed (the late blocks, which see the
// most keys under CogVideo's causal rules, start first). Deterministic: fixed order, no atomics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "attention_tc_fwd.h"
#include "dual_channel_visibility.cuh"
#include "dynamic_smem.cuh"
#include "flash_tc.cuh"
#include "shared_memory_plan.h"
#include "spacetime_common.cuh"
#include "tensor_core.cuh"

namespace torchnova {
namespace {

using spacetime_cuda::quad_max;  // lanes 4g .. 4g + 3 share a row of every accumulator fragment
using spacetime_cuda::quad_sum;
using spacetime_cuda::TokenStrides;
using spacetime_cuda::token_offset;

constexpr int kWarps = smem_plan::kTcFwdWarps;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = smem_plan::kTcFwdBlockM;  // 64 = 4 warps x 16 rows
constexpr int kBlockN = smem_plan::kTcFwdBlockN;  // 64 keys per streamed tile
constexpr int kRowsPerWarp = 16;
static_assert(kBlockM == kWarps * kRowsPerWarp, "each warp owns the 16 rows of one mma tile");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// spatial_attention: every in-range key is visible.
struct DenseVisibility {
  __device__ __forceinline__ bool tile_may_see(int64_t /*q_first*/, int64_t /*k_first*/) const { return true; }
  __device__ __forceinline__ bool visible(int64_t /*b*/, int64_t /*query*/, int64_t /*key*/) const { return true; }
};

// cogvideo_attention: the CogVideo rule and the text padding mask, as the SIMT kernel applies them.
struct CogVideoVisibility {
  dual_channel::Layout layout;
  const bool* text_pad_mask;  // (B, text_len) contiguous or nullptr
  dual_channel_cuda::AttentionShape shape;
  __device__ __forceinline__ bool tile_may_see(int64_t q_first, int64_t k_first) const {
    return dual_channel_cuda::tiles_interact(layout, q_first, kBlockM, k_first, kBlockN, shape.seq_len);
  }
  __device__ __forceinline__ bool visible(int64_t b, int64_t query, int64_t key) const {
    return dual_channel_cuda::pair_visible(layout, text_pad_mask, b, query, key, shape);
  }
};

// First key tile index >= `tile` that the query block [q_first, q_first + kBlockM) may see, or `tiles`.
template <typename Visibility>
__device__ __forceinline__ int64_t next_key_tile(const Visibility& visibility, int64_t q_first, int64_t tile,
                                                 int64_t tiles) {
  while (tile < tiles && !visibility.tile_may_see(q_first, tile * kBlockN)) ++tile;
  return tile;
}

// Fragment registers holding fp32 bits, rounded in place to TF32 (cvt.rna), as mma.m16n8k8.tf32 expects.
template <int kCount>
__device__ __forceinline__ void round_to_tf32(uint32_t (&r)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) r[i] = tc::float_to_tf32(__uint_as_float(r[i]));
}

// acc += A * B: m16n8k8 tf32 for fp32 inputs, m16n8k16 for fp16 / bf16.
template <typename scalar_t>
__device__ __forceinline__ void mma(float acc[4], const uint32_t a[4], const uint32_t b[2]) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    tc::mma_m16n8k8_tf32(acc, a, b, acc);
  } else {
    flash_tc::mma_accumulate<scalar_t>(acc, a, b);
  }
}

template <typename scalar_t, int kDPad, typename Visibility>
__global__ void __launch_bounds__(kThreads)
    attention_tc_fwd_kernel(const scalar_t* __restrict__ q,  // (B, T, S, H, D), strides q_st
                            const scalar_t* __restrict__ k,  // (B, T, S, H, D), strides k_st
                            const scalar_t* __restrict__ v,  // (B, T, S, H, D), strides v_st
                            TokenStrides q_st, TokenStrides k_st, TokenStrides v_st,
                            bool async_loads,   // all three 16-byte chunk aligned (flash_tc::can_load_async)
                            float scale_log2,   // scale * log2(e)
                            int64_t T, int64_t S, int64_t H, int D,
                            int64_t query_blocks,  // ceil(S / kBlockM)
                            Visibility visibility,
                            scalar_t* __restrict__ out,  // (B, T, S, H, D) contiguous
                            float* __restrict__ lse) {   // (B, T, S, H) contiguous
  constexpr bool kTf32 = std::is_same_v<scalar_t, float>;
  constexpr int kKStep = kTf32 ? 8 : 16;    // k of one mma: m16n8k8 (tf32) or m16n8k16 (fp16 / bf16)
  constexpr int kKSteps = kDPad / kKStep;   // k-steps of Q K^T (head dim)
  constexpr int kKeyTiles8 = kBlockN / 8;  // n-tiles of S
  constexpr int kDTiles8 = kDPad / 8;      // n-tiles of O
  constexpr int kTileElems = kBlockN * kDPad;

  extern __shared__ float smem[];
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem);  // [kBlockM][kDPad] swizzled
  scalar_t* kv_tiles = q_tile + kBlockM * kDPad;         // [2 stages][K, V][kBlockN][kDPad] swizzled

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int64_t problem = blockIdx.x / query_blocks;
  const int64_t q_block = query_blocks - 1 - blockIdx.x % query_blocks;
  const int64_t h = problem % H, bt = problem / H, b = bt / T, t = bt % T;
  const int64_t q_first = q_block * kBlockM;
  const scalar_t* q_base = q + token_offset(q_st, b, t, 0, h);
  const scalar_t* k_base = k + token_offset(k_st, b, t, 0, h);
  const scalar_t* v_base = v + token_offset(v_st, b, t, 0, h);

  flash_tc::load_tile<kBlockM, kDPad, kThreads>(async_loads, q_tile, q_base, q_st.s, q_first, S, D);
  auto load_kv = [&](int stage, int64_t key_tile) {
    scalar_t* k_dst = kv_tiles + stage * 2 * kTileElems;
    flash_tc::load_tile<kBlockN, kDPad, kThreads>(async_loads, k_dst, k_base, k_st.s, key_tile * kBlockN, S, D);
    flash_tc::load_tile<kBlockN, kDPad, kThreads>(async_loads, k_dst + kTileElems, v_base, v_st.s,
                                                  key_tile * kBlockN, S, D);
  };
  const int64_t key_tiles = (S + kBlockN - 1) / kBlockN;
  int64_t key_tile = next_key_tile(visibility, q_first, 0, key_tiles);
  if (key_tile < key_tiles) load_kv(0, key_tile);
  tc::cp_async_commit();  // group: Q (+ the first K / V); an empty group on the plain path

  // This lane's two rows of the warp's 16: row_lo = group, row_hi = group + 8.
  const int64_t row_lo = q_first + warp * kRowsPerWarp + group, row_hi = row_lo + 8;
  float o[kDTiles8][4];
#pragma unroll
  for (int n = 0; n < kDTiles8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-kInf, -kInf};  // base-2 running max of rows lo / hi (the same in the 4 lanes of a quad)
  float row_sum[2] = {0.f, 0.f};      // this lane's partial sums (its columns), reduced over the quad at the end
  uint32_t q_frag[kKSteps][4];
  bool q_in_registers = false;

  int stage = 0;
  while (key_tile < key_tiles) {
    const int64_t next = next_key_tile(visibility, q_first, key_tile + 1, key_tiles);
    if (next < key_tiles) {
      load_kv(stage ^ 1, next);  // that stage was last read before the trailing barrier of the previous tile
      tc::cp_async_commit();
      tc::cp_async_wait<1>();  // everything but the tile just issued has landed
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();  // every thread's chunks of Q and of this stage are visible block-wide
    if (!q_in_registers) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        flash_tc::load_a<kDPad>(q_frag[kk], q_tile, warp * kRowsPerWarp, kk * kKStep);
        if constexpr (kTf32) round_to_tf32<4>(q_frag[kk]);
      }
      q_in_registers = true;
    }
    const scalar_t* k_tile = kv_tiles + stage * 2 * kTileElems;
    const scalar_t* v_tile = k_tile + kTileElems;
    const int64_t k_first = key_tile * kBlockN;

    // S = Q K^T for the warp's 16 rows x kBlockN keys.
    float s[kKeyTiles8][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int n = 0; n < kKeyTiles8; n += 2) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t kb[4];
        flash_tc::load_b_nk<kDPad>(kb, k_tile, n * 8, kk * kKStep);
        if constexpr (kTf32) round_to_tf32<4>(kb);
        mma<scalar_t>(s[n], q_frag[kk], kb);
        mma<scalar_t>(s[n + 1], q_frag[kk], kb + 2);
      }
    }

    // Mask (keys past S, invisible pairs) to -inf, scale to base 2, online softmax per row.
    float tile_max[2] = {-kInf, -kInf};
#pragma unroll
    for (int n = 0; n < kKeyTiles8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t query = e < 2 ? row_lo : row_hi;
        const int64_t key = k_first + n * 8 + 2 * quad + (e & 1);
        const bool keep = key < S && query < S && visibility.visible(b, query, key);
        s[n][e] = keep ? s[n][e] * scale_log2 : -kInf;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
      }
    }
    float shift[2], carry[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      // -inf: no visible key yet; shift by 0 so 2^(-inf - shift) = 0 rather than NaN.
      shift[r] = new_max == -kInf ? 0.f : new_max;
      carry[r] = exp2f(row_max[r] - shift[r]);  // 0 while row_max = -inf
      row_max[r] = new_max;
      row_sum[r] *= carry[r];
    }
#pragma unroll
    for (int n = 0; n < kDTiles8; ++n) {
      o[n][0] *= carry[0];
      o[n][1] *= carry[0];
      o[n][2] *= carry[1];
      o[n][3] *= carry[1];
    }
#pragma unroll
    for (int n = 0; n < kKeyTiles8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - shift[e / 2]);
        row_sum[e / 2] += s[n][e];
      }
    }

    if constexpr (kTf32) {
      // O += P V with m16n8k8: the A fragment of 8 keys (one n-tile of S) wants P[row][quad] and P[row][quad + 4],
      // which the accumulator layout keeps in lanes 4 group + quad / 2 and 4 group + 2 + quad / 2 (element
      // quad % 2): two shuffle sources per register. V's B fragments, V[key = quad (+ 4)][column = group], are
      // plain shared loads (ldmatrix .trans cannot transpose 32-bit elements).
      using Sw = flash_tc::SwizzleOf<kDPad, float>;
      const int src_lo = (lane & ~3) | (quad >> 1), src_hi = src_lo + 2;
      const bool odd = (quad & 1) != 0;
#pragma unroll
      for (int n8 = 0; n8 < kKeyTiles8; ++n8) {
        float lo[4], hi[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          lo[e] = __shfl_sync(0xffffffffu, s[n8][e], src_lo);
          hi[e] = __shfl_sync(0xffffffffu, s[n8][e], src_hi);
        }
        uint32_t p_frag[4] = {tc::float_to_tf32(odd ? lo[1] : lo[0]), tc::float_to_tf32(odd ? lo[3] : lo[2]),
                              tc::float_to_tf32(odd ? hi[1] : hi[0]), tc::float_to_tf32(odd ? hi[3] : hi[2])};
#pragma unroll
        for (int n = 0; n < kDTiles8; ++n) {
          const uint32_t vb[2] = {tc::float_to_tf32(v_tile[Sw::offset(n8 * 8 + quad, n * 8 + group)]),
                                  tc::float_to_tf32(v_tile[Sw::offset(n8 * 8 + quad + 4, n * 8 + group)])};
          mma<scalar_t>(o[n], p_frag, vb);
        }
      }
    } else {
      using Pair = typename flash_tc::MmaType<scalar_t>::Pair;
      // O += P V: the accumulator layout of two adjacent 8-key n-tiles is the A fragment of one 16-key k-step.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t p_frag[4];
        p_frag[0] = tc::pack_two<Pair>(s[2 * kk][0], s[2 * kk][1]);
        p_frag[1] = tc::pack_two<Pair>(s[2 * kk][2], s[2 * kk][3]);
        p_frag[2] = tc::pack_two<Pair>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        p_frag[3] = tc::pack_two<Pair>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int n = 0; n < kDTiles8; n += 2) {
          uint32_t vb[4];
          flash_tc::load_b_kn<kDPad>(vb, v_tile, kk * 16, n * 8);
          mma<scalar_t>(o[n], p_frag, vb);
          mma<scalar_t>(o[n + 1], p_frag, vb + 2);
        }
      }
    }
    __syncthreads();  // the block is done with this stage before the next iteration refills it
    stage ^= 1;
    key_tile = next;
  }
  tc::cp_async_wait<0>();  // nothing may stay in flight when the block exits (no visible tile: Q's group)

  // Normalize and store: lane holds O[row][n * 8 + 2 quad + {0, 1}] for rows lo (o[n][0..1]) and hi (o[n][2..3]).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t query = r == 0 ? row_lo : row_hi;
    const float sum = quad_sum(row_sum[r]);
    if (query >= S) continue;
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t row = ((b * T + t) * S + query) * H + h;  // row of the contiguous out / lse
    scalar_t* out_row = out + row * D;
#pragma unroll
    for (int n = 0; n < kDTiles8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = n * 8 + 2 * quad + e;
        if (d < D) out_row[d] = static_cast<scalar_t>(o[n][2 * r + e] * inv_sum);
      }
    }
    if (quad == 0) lse[row] = sum > 0.f ? kLn2 * (row_max[r] + log2f(sum)) : kInf;
  }
}

std::atomic<int64_t> g_forward_launches{0};

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else if (dtype == at::kHalf) {
    fn(c10::Half{});
  } else if (dtype == at::kBFloat16) {
    fn(c10::BFloat16{});
  } else {
    TORCH_CHECK_VALUE(false, "tensor-core attention: dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Calls fn(std::integral_constant<int, kDPad>) for the padded head dim 64 or 128.
template <typename Fn>
void dispatch_padded_head_dim(int D, Fn&& fn) {
  if (D <= 64) {
    fn(std::integral_constant<int, 64>{});
  } else {
    fn(std::integral_constant<int, 128>{});
  }
}
static_assert(smem_plan::tc_fwd_padded_head_dim(64) == 64 && smem_plan::tc_fwd_padded_head_dim(65) == 128,
              "dispatch_padded_head_dim and shared_memory_plan.h must agree");

// One launch over (B, T, S, H, D) views (cogvideo: T = 1).
template <typename Visibility>
void launch_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const TokenStrides& q_st, const TokenStrides& k_st, const TokenStrides& v_st, double scale,
                    int64_t B, int64_t T, int64_t S, int64_t H, int D, const Visibility& visibility, at::Tensor& out,
                    at::Tensor& lse) {
  const int64_t query_blocks = (S + kBlockM - 1) / kBlockM;
  const unsigned blocks = spacetime_cuda::checked_grid(op, B * T * H * query_blocks);
  const bool async_loads = flash_tc::can_load_async(q) && flash_tc::can_load_async(k) &&
                           flash_tc::can_load_async(v);
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(q.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    dispatch_padded_head_dim(D, [&](auto padded) {
      constexpr int kDPad = decltype(padded)::value;
      if constexpr (std::is_same_v<scalar_t, float> && kDPad > smem_plan::kTcTf32MaxHeadDim) {
        TORCH_CHECK(false, op, ": the TF32 kernel takes D <= ", smem_plan::kTcTf32MaxHeadDim,
                    " (use_tensor_core_forward routes larger float32 head dims to the SIMT kernel)");
      } else {
        constexpr int64_t kSmemBytes = smem_plan::tc_fwd_bytes_of_padded(kDPad, sizeof(scalar_t));
        // The kernel's carve-up of smem: Q [kBlockM][kDPad] + 2 stages x (K, V) [kBlockN][kDPad] elements.
        static_assert(kSmemBytes == int64_t(sizeof(scalar_t)) * (kBlockM + 2 * 2 * kBlockN) * kDPad,
                      "shared_memory_plan.h must match the tensor-core forward's tiles");
        auto kernel = attention_tc_fwd_kernel<scalar_t, kDPad, Visibility>;
        cuda_smem::prepare_launch(op, kernel, kSmemBytes, kSmemBytes, "the tensor-core attention forward kernel");
        TORCHNOVA_LAUNCH_KERNEL(blocks, kThreads, kSmemBytes, stream, kernel)(
            q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), q_st, k_st,
            v_st, async_loads, scale_log2, T, S, H, D, query_blocks, visibility, out.mutable_data_ptr<scalar_t>(),
            lse.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        g_forward_launches.fetch_add(1, std::memory_order_relaxed);
      }
    });
  });
}

}  // namespace

namespace attention_tc {

KernelChoice kernel_choice_from_env() {
  const char* raw = std::getenv("TORCHNOVA_CUDA_ATTENTION_KERNEL");
  if (raw == nullptr || raw[0] == '\0' || std::strcmp(raw, "auto") == 0) return KernelChoice::kAuto;
  if (std::strcmp(raw, "tensor_core") == 0) return KernelChoice::kTensorCore;
  TORCH_CHECK_VALUE(std::strcmp(raw, "simt") == 0,
                    "TORCHNOVA_CUDA_ATTENTION_KERNEL must be auto, tensor_core or simt, got \"", raw, "\"");
  return KernelChoice::kSimt;
}

bool use_tensor_core_forward(const char* op, const at::Tensor& q, int64_t head_dim) {
  const KernelChoice choice = kernel_choice_from_env();
  if (choice == KernelChoice::kSimt) return false;
  // Why q cannot take the tensor-core kernel; empty when it can.
  std::string why;
  const auto dtype = q.scalar_type();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int element_bytes = static_cast<int>(q.element_size());
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) {
    why = std::string("dtype is ") + c10::toString(dtype);
  } else if (dtype == at::kFloat && !at::globalContext().allowTF32CuBLAS()) {
    why = "dtype is Float and TF32 matmuls are off (torch.backends.cuda.matmul.allow_tf32 = False, or "
          "torch.set_float32_matmul_precision(\"highest\")): float32 runs on the SIMT kernel";
  } else if (dtype == at::kFloat && head_dim > smem_plan::kTcTf32MaxHeadDim) {
    why = "head dim D = " + std::to_string(head_dim) + " exceeds " + std::to_string(smem_plan::kTcTf32MaxHeadDim) +
          " for float32 (the TF32 kernel at D = 128 would spill registers)";
  } else if (head_dim > kMaxHeadDim) {
    why = "head dim D = " + std::to_string(head_dim) + " exceeds " + std::to_string(kMaxHeadDim);
  } else if (props->major < 8) {
    why = "compute capability " + std::to_string(props->major) + "." + std::to_string(props->minor) +
          " is below 8.0 (mma.sync m16n8k16, ldmatrix and cp.async need sm_80)";
  } else if (smem_plan::tc_fwd_bytes(static_cast<int>(head_dim), element_bytes) >
             static_cast<int64_t>(props->sharedMemPerBlockOptin)) {
    why = "it needs " + std::to_string(smem_plan::tc_fwd_bytes(static_cast<int>(head_dim), element_bytes)) +
          " bytes of shared memory per block, the device allows " + std::to_string(props->sharedMemPerBlockOptin);
  }
  if (choice == KernelChoice::kTensorCore) {
    TORCH_CHECK_VALUE(why.empty(), op, ": TORCHNOVA_CUDA_ATTENTION_KERNEL=tensor_core, but the tensor-core kernel ",
                      "cannot run this call: ", why);
  }
  return why.empty();
}

void spatial_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                           at::Tensor& out, at::Tensor& lse) {
  launch_forward("spatial_attention_fwd", q, k, v, spacetime_cuda::token_strides(q),
                 spacetime_cuda::token_strides(k), spacetime_cuda::token_strides(v), scale, q.size(0), q.size(1),
                 q.size(2), q.size(3), static_cast<int>(q.size(4)), DenseVisibility{}, out, lse);
}

void cogvideo_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const bool* text_pad_mask, const dual_channel::Layout& layout,
                            const dual_channel_cuda::AttentionShape& shape, at::Tensor& out, at::Tensor& lse) {
  // (B, L, H, D) as (B, T = 1, S = L, H, D): the T stride is never used (t = 0).
  auto strides = [](const at::Tensor& x) { return TokenStrides{x.stride(0), 0, x.stride(1), x.stride(2)}; };
  launch_forward("cogvideo_attention_fwd", q, k, v, strides(q), strides(k), strides(v), shape.scale, shape.batch,
                 1, shape.seq_len, shape.heads, shape.head_dim, CogVideoVisibility{layout, text_pad_mask, shape}, out,
                 lse);
}

int64_t forward_launches() { return g_forward_launches.load(std::memory_order_relaxed); }

}  // namespace attention_tc
}  // namespace torchnova
