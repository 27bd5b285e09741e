// MESA / SAF KL regularizer, CUDA kernels.
//
// Math, per row r of student logits z (R, C) and teacher logits t (R, C), temperature tau > 0:
//   z' = z / tau, t' = t / tau                      (scaled before any max subtraction)
//   q = softmax(z'), p = softmax(t')
//   loss_rows[r] = tau^2 * sum_c p_c (log p_c - log q_c)
//                = tau^2 * (a / s_t - lse_t + lse_z),
//   with m_t = max t', s_t = sum_c e^{t'_c - m_t}, a = sum_c e^{t'_c - m_t} (t'_c - z'_c)
//   d loss_rows[r] / d z[r, c] = tau * (q_c - p_c)
// p_c = 0 (teacher logit -inf, or e^{t' - m_t} underflowing) contributes exactly 0, as xlogy / F.kl_div do.
//
// Ops (schemas in csrc/torchnova.cpp), acc_t = float64 for float64 logits, float32 otherwise:
//   mesa_kl_fwd(student (R, C), teacher (R, C), temperature, with_grad)
//     -> loss_rows (R,) acc_t, lse (4, R) acc_t contiguous = [m_z, log s_z, m_t, log s_t], the row log-sum-exps
//        logsumexp(z') = m_z + log s_z, logsumexp(t') = m_t + log s_t kept split (see the backward),
//        grad (R, C) student dtype contiguous = tau * (q - p), or shape (0,) when with_grad is false
//   mesa_kl_bwd(grad_rows (R,) acc_t, student (R, C), teacher (R, C), lse (4, R) acc_t, temperature)
//     -> (R, C) student dtype contiguous = grad_rows[r] * tau * (exp((z' - m_z) - log s_z) - exp((t' - m_t) -
//        log s_t)).
//        The exponent is formed from the row max and the log-sum separately, as the forward does: z' - m_z is
//        exact-ish for large logits, while z' - lse_z would inherit the rounding of lse_z to the ulp of its
//        magnitude (a relative gradient error of |lse| * 6e-8 in float32: 6e-4 at |z'| ~ 1e4).
//        Rows with grad_rows[r] == 0 are written as zeros without reading their logits (they may be garbage).
//
// Layout: a power-of-two group of threads_per_row threads owns one row (1..32 lanes of a warp for short rows,
// 64..1024 threads spanning warps for long rows), so rows go in grid.x only and R may exceed 65,535.
// The row is read in chunks of kPacketsPerThread packets per thread (a packet is one 16-byte vector when the
// rows are contiguous and aligned, one element otherwise). Each thread keeps an online log-sum-exp state for
// both rows plus the cross term a; states are merged with warp shuffles and, across warps, through shared
// memory. The gradient sweep then reuses the packets still held in registers (the whole row when it fits in
// one chunk: C <= 16384 for aligned contiguous 16- or 32-bit logits) and re-reads the earlier chunks from L2, where
// evict-first hints on everything that is not re-read (the last chunk, the gradient) help them stay.
// z' and t' are computed as z * (1 / tau), like the CPU kernel (exact for power-of-two tau, within ~1.5 ulp of z / tau
// otherwise), always before the max is subtracted.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace torchnova {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreadsPerRow = 1024;
// Blocks that hold several rows (threads_per_row < this) use this many threads.
constexpr int kMultiRowBlockThreads = 256;
constexpr int kPacketBytes = 16;

template <typename scalar_t>
using acc_of = at::acc_type<scalar_t, /*is_cuda=*/true>;

// kVec logits moved by one load / store instruction; kVec = 1 is the strided or misaligned fallback.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Packet {
  scalar_t v[kVec];
};

// Packets per thread per chunk: as many as fit, with their float conversions and the exp pass, in the 64
// registers per thread of a 1024-thread block without spilling (checked with ptxas -v for sm_80 and sm_90).
// 16-bit rows hold 2 x 32 B per thread (C <= 16384 stays in registers), float32 2 x 64 B (C <= 16384), float64
// (the gradcheck path, whose exp is register-hungry) one packet.
template <typename scalar_t, int kVec>
constexpr int kPacketsPerThread = std::is_same_v<scalar_t, double> ? (kVec == 1 ? 2 : 1)
                                  : kVec == 1                      ? 8
                                  : sizeof(scalar_t) == 4          ? 4
                                                                   : 2;

// 16-byte packets travel as uint4 so the cache-hinted intrinsics apply. Evict-first (.cs) loads are for logits
// that will not be read again, so they do not push out the chunks the gradient sweep re-reads from L2; the
// gradient is written evict-first for the same reason.
template <typename scalar_t, int kVec>
union PacketBits {
  uint4 bits;
  Packet<scalar_t, kVec> packet;
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ Packet<scalar_t, kVec> load_packet(const scalar_t* ptr, bool evict_first) {
  if constexpr (sizeof(Packet<scalar_t, kVec>) == sizeof(uint4)) {
    PacketBits<scalar_t, kVec> u;
    u.bits = evict_first ? __ldcs(reinterpret_cast<const uint4*>(ptr)) : *reinterpret_cast<const uint4*>(ptr);
    return u.packet;
  } else {
    return *reinterpret_cast<const Packet<scalar_t, kVec>*>(ptr);
  }
}

template <typename scalar_t, int kVec>
__device__ __forceinline__ void store_packet_evict_first(scalar_t* ptr, const Packet<scalar_t, kVec>& packet) {
  if constexpr (sizeof(Packet<scalar_t, kVec>) == sizeof(uint4)) {
    PacketBits<scalar_t, kVec> u;
    u.packet = packet;
    __stcs(reinterpret_cast<uint4*>(ptr), u.bits);
  } else {
    *reinterpret_cast<Packet<scalar_t, kVec>*>(ptr) = packet;
  }
}

// float uses the MUFU ex2 path (~2 ulp near 0, relative error grows ~|x| * 2^-24 for very negative x, where the
// terms are negligible against the sum); double is the gradcheck path and keeps the accurate exp.
__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }
__device__ __forceinline__ float log_acc(float x) { return ::logf(x); }
__device__ __forceinline__ double log_acc(double x) { return ::log(x); }
// fmax ignores NaN, so a NaN logit never becomes the shift; it still reaches the sums through exp(NaN).
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// bfloat16 -> float is a 16-bit shift; spelled out on the raw bits because c10's conversion goes through the
// address of the value, which costs registers in the unrolled packet loops.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return __uint_as_float(static_cast<uint32_t>(x.x) << 16);
  } else {
    return static_cast<acc_t>(x);
  }
}

template <typename scalar_t>
constexpr bool kIsHalfOrBFloat16 = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// Two 16-bit logits in one 32-bit register, the operand of the paired instructions (HMNMX2, F2F.PACK).
template <typename scalar_t>
using pair_of = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, __nv_bfloat162, __half2>;

// Rounds kVec accumulator values to a packet; 16-bit types convert two values per instruction.
template <typename scalar_t, int kVec, typename acc_t>
__device__ __forceinline__ Packet<scalar_t, kVec> round_to_packet(const acc_t (&values)[kVec]) {
  Packet<scalar_t, kVec> out;
  if constexpr (kIsHalfOrBFloat16<scalar_t> && kVec % 2 == 0) {
#pragma unroll
    for (int j = 0; j < kVec / 2; ++j) {
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        reinterpret_cast<pair_of<scalar_t>*>(out.v)[j] = __floats2bfloat162_rn(values[2 * j], values[2 * j + 1]);
      } else {
        reinterpret_cast<pair_of<scalar_t>*>(out.v)[j] = __floats2half2_rn(values[2 * j], values[2 * j + 1]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out.v[i] = static_cast<scalar_t>(values[i]);
  }
  return out;
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// The value to subtract before exp: a running max of -inf means "no finite logit yet", and subtracting it
// would turn exp(-inf - (-inf)) into NaN; subtracting 0 instead gives exp(-inf) = 0.
template <typename acc_t>
__device__ __forceinline__ acc_t safe_shift(acc_t running_max) {
  return running_max == neg_inf<acc_t>() ? acc_t(0) : running_max;
}

// Online softmax statistics of a (part of a) row. max_* is -inf (and the sums 0) until a finite logit is seen.
template <typename acc_t>
struct RowState {
  acc_t max_z;  // max z'
  acc_t sum_z;  // sum e^{z' - max_z}
  acc_t max_t;  // max t'
  acc_t sum_t;  // sum e^{t' - max_t}
  acc_t cross;  // sum e^{t' - max_t} (t' - z'), may be +inf when z' = -inf where p > 0
};

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> empty_state() {
  return {neg_inf<acc_t>(), acc_t(0), neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

// cross * factor where factor = 0 must give 0 even for cross = +inf (the terms underflowed: p = 0 there).
template <typename acc_t>
__device__ __forceinline__ acc_t rescale_cross(acc_t cross, acc_t factor) {
  return factor > acc_t(0) ? cross * factor : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge_states(const RowState<acc_t>& x, const RowState<acc_t>& y) {
  RowState<acc_t> out;
  out.max_z = max_acc(x.max_z, y.max_z);
  const acc_t shift_z = safe_shift(out.max_z);
  out.sum_z = x.sum_z * exp_acc(x.max_z - shift_z) + y.sum_z * exp_acc(y.max_z - shift_z);
  out.max_t = max_acc(x.max_t, y.max_t);
  const acc_t shift_t = safe_shift(out.max_t);
  const acc_t factor_x = exp_acc(x.max_t - shift_t), factor_y = exp_acc(y.max_t - shift_t);
  out.sum_t = x.sum_t * factor_x + y.sum_t * factor_y;
  out.cross = rescale_cross(x.cross, factor_x) + rescale_cross(y.cross, factor_y);
  return out;
}

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shuffle_xor(const RowState<acc_t>& s, int lane_mask) {
  constexpr unsigned kFullWarp = 0xffffffffu;
  return {__shfl_xor_sync(kFullWarp, s.max_z, lane_mask), __shfl_xor_sync(kFullWarp, s.sum_z, lane_mask),
          __shfl_xor_sync(kFullWarp, s.max_t, lane_mask), __shfl_xor_sync(kFullWarp, s.sum_t, lane_mask),
          __shfl_xor_sync(kFullWarp, s.cross, lane_mask)};
}

// Merges the states of the threads_per_row threads of each row; every thread of the row gets the result.
// Must be reached by every thread of the block (shuffles over full warps, __syncthreads for long rows).
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge_row(RowState<acc_t> state, int threads_per_row) {
  // Row groups are aligned power-of-two lane ranges, so xor partners below threads_per_row stay in the row.
  for (int lane_mask = min(threads_per_row, kWarpSize) / 2; lane_mask > 0; lane_mask /= 2) {
    state = merge_states(state, shuffle_xor(state, lane_mask));
  }
  if (threads_per_row > kWarpSize) {  // uniform over the block: threads_per_row is a kernel argument
    __shared__ RowState<acc_t> warp_states[kMaxThreadsPerRow / kWarpSize];
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    if (lane == 0) warp_states[warp] = state;
    __syncthreads();
    const int warps_per_row = threads_per_row / kWarpSize;
    const int first_warp_of_row = warp & ~(warps_per_row - 1);
    state = lane < warps_per_row ? warp_states[first_warp_of_row + lane] : empty_state<acc_t>();
    // Full butterfly (not just warps_per_row lanes) so every lane, not only the low ones, ends with the total.
    for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
      state = merge_states(state, shuffle_xor(state, lane_mask));
    }
  }
  return state;
}

// Where a thread's packets lie: packet k of chunk j is packet j * chunk_packets + k * threads_per_row + lane,
// so for each k the threads of a row read consecutive packets (coalesced).
// Within-row indices are 32-bit (the host checks C < 2^31 - 2^14) to keep address math out of the register budget.
struct RowTiling {
  int log2_threads_per_row;
  int packets;        // packets per row = ceil(C / kVec)
  int chunk_packets;  // kPacketsPerThread * threads_per_row
  int chunks;         // ceil(packets / chunk_packets), the same for every row
};

// Loads one chunk of a row; packets past the row end (or of a row >= R) read as -inf, which adds nothing to the
// max, the sums (exp(-inf) = 0) or the cross term (guarded by e^{t'} > 0), so the math needs no bounds checks.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void load_chunk(Packet<scalar_t, kVec> (&buffer)[kPacketsPerThread<scalar_t, kVec>],
                                           const scalar_t* row_ptr,  // row start, (C,) with stride col_stride
                                           int64_t col_stride, int chunk, int lane, const RowTiling& tiling,
                                           bool row_valid, bool evict_first) {
  Packet<scalar_t, kVec> padding;
#pragma unroll
  for (int i = 0; i < kVec; ++i) padding.v[i] = static_cast<scalar_t>(neg_inf<acc_of<scalar_t>>());
#pragma unroll
  for (int k = 0; k < kPacketsPerThread<scalar_t, kVec>; ++k) {
    const int packet = chunk * tiling.chunk_packets + (k << tiling.log2_threads_per_row) + lane;
    if (row_valid && packet < tiling.packets) {
      if constexpr (kVec == 1) {
        buffer[k].v[0] = row_ptr[int64_t(packet) * col_stride];
      } else {  // vectorized only when the column stride is 1 and the row start is 16-byte aligned
        buffer[k] = load_packet<scalar_t, kVec>(row_ptr + packet * kVec, evict_first);
      }
    } else {
      buffer[k] = padding;
    }
  }
}

// Max of the logits of a chunk, before scaling. 16-bit logits are compared two at a time in their own format
// (HMNMX2): besides halving the instructions, converting them to float here would let the compiler keep all the
// converted values alive until the exp pass, which spills at the 64 registers a 1024-thread block allows.
template <typename scalar_t, int kVec>
__device__ __forceinline__ acc_of<scalar_t> chunk_max(
    const Packet<scalar_t, kVec> (&x)[kPacketsPerThread<scalar_t, kVec>]) {  // one chunk of one row
  using acc_t = acc_of<scalar_t>;
  if constexpr (kIsHalfOrBFloat16<scalar_t> && kVec % 2 == 0) {
    using pair_t = pair_of<scalar_t>;
    pair_t pair_max = reinterpret_cast<const pair_t*>(x[0].v)[0];
#pragma unroll
    for (int k = 0; k < kPacketsPerThread<scalar_t, kVec>; ++k) {
#pragma unroll
      for (int j = 0; j < kVec / 2; ++j) pair_max = __hmax2(pair_max, reinterpret_cast<const pair_t*>(x[k].v)[j]);
    }
    return max_acc(__low2float(pair_max), __high2float(pair_max));
  } else {
    acc_t max_value = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < kPacketsPerThread<scalar_t, kVec>; ++k) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) max_value = max_acc(max_value, to_acc<acc_t>(x[k].v[i]));
    }
    return max_value;
  }
}

// Folds one chunk into the online state: one max pass over the registers, then one exp per logit against the
// new max, instead of a rescale per logit.
template <typename scalar_t, int kVec, typename acc_t>
__device__ __forceinline__ void accumulate_chunk(RowState<acc_t>& state,
                                                 const Packet<scalar_t, kVec> (&z)[kPacketsPerThread<scalar_t, kVec>],
                                                 const Packet<scalar_t, kVec> (&t)[kPacketsPerThread<scalar_t, kVec>],
                                                 acc_t inv_tau) {
  const acc_t raw_max_z = chunk_max<scalar_t, kVec>(z), raw_max_t = chunk_max<scalar_t, kVec>(t);
  // Multiplying by inv_tau > 0 and rounding is monotone, so max(z) * inv_tau is bitwise max(z * inv_tau).
  const acc_t max_z = max_acc(state.max_z, raw_max_z * inv_tau);
  const acc_t max_t = max_acc(state.max_t, raw_max_t * inv_tau);
  const acc_t shift_z = safe_shift(max_z), shift_t = safe_shift(max_t);
  acc_t sum_z = state.sum_z * exp_acc(state.max_z - shift_z);
  const acc_t carry_t = exp_acc(state.max_t - shift_t);
  acc_t sum_t = state.sum_t * carry_t;
  acc_t cross = rescale_cross(state.cross, carry_t);
#pragma unroll
  for (int k = 0; k < kPacketsPerThread<scalar_t, kVec>; ++k) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const acc_t zs = to_acc<acc_t>(z[k].v[i]) * inv_tau, ts = to_acc<acc_t>(t[k].v[i]) * inv_tau;
      const acc_t ez = exp_acc(zs - shift_z), et = exp_acc(ts - shift_t);
      sum_z += ez;
      sum_t += et;
      // p = 0 contributes 0 even where t' - z' is -inf - (-inf) = NaN or +inf.
      cross += et > acc_t(0) ? et * (ts - zs) : acc_t(0);
    }
  }
  state = {max_z, sum_z, max_t, sum_t, cross};
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    mesa_kl_fwd_kernel(const scalar_t* __restrict__ student,  // (R, C), strides (z_row_stride, z_col_stride)
                       const scalar_t* __restrict__ teacher,  // (R, C), strides (t_row_stride, t_col_stride)
                       int64_t z_row_stride, int64_t z_col_stride, int64_t t_row_stride, int64_t t_col_stride,
                       int64_t rows,  // R
                       int64_t cols,  // C
                       RowTiling tiling, acc_of<scalar_t> tau, acc_of<scalar_t> inv_tau,
                       acc_of<scalar_t>* __restrict__ loss_rows,  // (R,)
                       acc_of<scalar_t>* __restrict__ lse,        // (4, R) contiguous: [m_z, log s_z, m_t, log s_t]
                       scalar_t* __restrict__ grad) {             // (R, C) contiguous, nullptr: no gradient
  using acc_t = acc_of<scalar_t>;
  constexpr int kPackets = kPacketsPerThread<scalar_t, kVec>;
  const int log2_tpr = tiling.log2_threads_per_row;
  const int lane = threadIdx.x & ((1 << log2_tpr) - 1);
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> log2_tpr) + (threadIdx.x >> log2_tpr);
  // Threads of a row past R still run the loops (with -inf padding): merge_row needs every thread.
  const bool row_valid = row < rows;
  const int64_t safe_row = row_valid ? row : 0;
  const scalar_t* z_row = student + safe_row * z_row_stride;
  const scalar_t* t_row = teacher + safe_row * t_row_stride;

  Packet<scalar_t, kVec> z_buf[kPackets], t_buf[kPackets];
  RowState<acc_t> state = empty_state<acc_t>();
  for (int chunk = 0; chunk < tiling.chunks; ++chunk) {
    // Only chunks before the last are read again (by the gradient sweep).
    const bool last_use = grad == nullptr || chunk == tiling.chunks - 1;
    load_chunk<scalar_t, kVec>(z_buf, z_row, z_col_stride, chunk, lane, tiling, row_valid, last_use);
    load_chunk<scalar_t, kVec>(t_buf, t_row, t_col_stride, chunk, lane, tiling, row_valid, last_use);
    accumulate_chunk<scalar_t, kVec, acc_t>(state, z_buf, t_buf, inv_tau);
  }
  state = merge_row(state, 1 << log2_tpr);
  if (!row_valid) return;  // no block-wide synchronisation below this point

  const acc_t shift_z = safe_shift(state.max_z), shift_t = safe_shift(state.max_t);
  if (lane == 0) {
    const acc_t log_sum_z = log_acc(state.sum_z), log_sum_t = log_acc(state.sum_t);
    lse[row] = shift_z;
    lse[rows + row] = log_sum_z;
    lse[2 * rows + row] = shift_t;
    lse[3 * rows + row] = log_sum_t;
    // lse_z - lse_t grouped as (shift difference) + (log difference): for logits ~1e4 this avoids the rounding
    // of each lse to the ulp of its large magnitude.
    // KL >= 0, but these terms round to about -1e-7 where p == q (e.g. one class): clamp at 0 (NaN stays NaN).
    const acc_t loss = tau * tau * (state.cross / state.sum_t + (shift_z - shift_t) + (log_sum_z - log_sum_t));
    loss_rows[row] = loss < acc_t(0) ? acc_t(0) : loss;
  }
  if (grad == nullptr) return;

  // q = e^{z' - shift_z} / sum_z, p = e^{t' - shift_t} / sum_t: exponents relative to the row max stay exact for
  // large logits, unlike z' - lse_z.
  const acc_t scale_q = tau / state.sum_z, scale_p = tau / state.sum_t;
  scalar_t* grad_row = grad + row * cols;
  // Last chunk first: it is still in registers (the whole row when chunks == 1); earlier chunks are re-read.
  for (int chunk = tiling.chunks - 1; chunk >= 0; --chunk) {
    if (chunk != tiling.chunks - 1) {
      load_chunk<scalar_t, kVec>(z_buf, z_row, z_col_stride, chunk, lane, tiling, true, true);
      load_chunk<scalar_t, kVec>(t_buf, t_row, t_col_stride, chunk, lane, tiling, true, true);
    }
#pragma unroll
    for (int k = 0; k < kPackets; ++k) {
      const int packet = chunk * tiling.chunk_packets + (k << log2_tpr) + lane;
      if (packet >= tiling.packets) continue;
      acc_t values[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const acc_t zs = to_acc<acc_t>(z_buf[k].v[i]) * inv_tau;
        const acc_t ts = to_acc<acc_t>(t_buf[k].v[i]) * inv_tau;
        values[i] = exp_acc(zs - shift_z) * scale_q - exp_acc(ts - shift_t) * scale_p;
      }
      store_packet_evict_first<scalar_t, kVec>(grad_row + packet * kVec, round_to_packet<scalar_t>(values));
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    mesa_kl_bwd_kernel(const acc_of<scalar_t>* __restrict__ grad_rows,  // (R,) contiguous
                       const scalar_t* __restrict__ student,  // (R, C), strides (z_row_stride, z_col_stride)
                       const scalar_t* __restrict__ teacher,  // (R, C), strides (t_row_stride, t_col_stride)
                       int64_t z_row_stride, int64_t z_col_stride, int64_t t_row_stride, int64_t t_col_stride,
                       const acc_of<scalar_t>* __restrict__ lse,  // (4, R) contiguous: [m_z, log s_z, m_t, log s_t]
                       int64_t rows,                              // R
                       int64_t cols,                              // C
                       RowTiling tiling, acc_of<scalar_t> tau, acc_of<scalar_t> inv_tau,
                       scalar_t* __restrict__ grad_student) {  // (R, C) contiguous
  using acc_t = acc_of<scalar_t>;
  constexpr int kPackets = kPacketsPerThread<scalar_t, kVec>;
  const int log2_tpr = tiling.log2_threads_per_row;
  const int lane = threadIdx.x & ((1 << log2_tpr) - 1);
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> log2_tpr) + (threadIdx.x >> log2_tpr);
  if (row >= rows) return;  // no cross-thread communication in this kernel
  scalar_t* out_row = grad_student + row * cols;
  const acc_t row_grad = grad_rows[row];

  if (row_grad == acc_t(0)) {  // masked row: its logits may be garbage or NaN, so never read them
    Packet<scalar_t, kVec> zeros;
#pragma unroll
    for (int i = 0; i < kVec; ++i) zeros.v[i] = scalar_t(0);
    for (int packet = lane; packet < tiling.packets; packet += 1 << log2_tpr) {
      store_packet_evict_first<scalar_t, kVec>(out_row + packet * kVec, zeros);
    }
    return;
  }

  const acc_t shift_z = lse[row], log_sum_z = lse[rows + row], shift_t = lse[2 * rows + row],
              log_sum_t = lse[3 * rows + row], scale = row_grad * tau;
  const scalar_t* z_row = student + row * z_row_stride;
  const scalar_t* t_row = teacher + row * t_row_stride;
  Packet<scalar_t, kVec> z_buf[kPackets], t_buf[kPackets];
  for (int chunk = 0; chunk < tiling.chunks; ++chunk) {
    load_chunk<scalar_t, kVec>(z_buf, z_row, z_col_stride, chunk, lane, tiling, true, true);
    load_chunk<scalar_t, kVec>(t_buf, t_row, t_col_stride, chunk, lane, tiling, true, true);
#pragma unroll
    for (int k = 0; k < kPackets; ++k) {
      const int packet = chunk * tiling.chunk_packets + (k << log2_tpr) + lane;
      if (packet >= tiling.packets) continue;
      acc_t values[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const acc_t zs = to_acc<acc_t>(z_buf[k].v[i]) * inv_tau;
        const acc_t ts = to_acc<acc_t>(t_buf[k].v[i]) * inv_tau;
        values[i] = scale * (exp_acc((zs - shift_z) - log_sum_z) - exp_acc((ts - shift_t) - log_sum_t));
      }
      store_packet_evict_first<scalar_t, kVec>(out_row + packet * kVec, round_to_packet<scalar_t>(values));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

struct LaunchConfig {
  RowTiling tiling;
  int threads_per_block;
  unsigned blocks;
};

// Threads per row: the smallest power of two that covers the row in one chunk (so the gradient sweep needs no
// re-read), capped at 1024; short rows share a warp / a 256-thread block instead of idling a whole block.
LaunchConfig plan_launch(int64_t rows, int64_t cols, int vec, int packets_per_thread) {
  // The last chunk may extend past the row by up to kPacketsPerThread * kMaxThreadsPerRow packets.
  TORCH_CHECK(cols < std::numeric_limits<int32_t>::max() - 16 * kMaxThreadsPerRow,
              "mesa_kl: at most 2^31 - 2^14 classes per row are supported, got ", cols);
  LaunchConfig config;
  config.tiling.packets = static_cast<int>((cols + vec - 1) / vec);
  const int wanted_threads = (config.tiling.packets + packets_per_thread - 1) / packets_per_thread;
  int log2_tpr = 0;
  while ((1 << log2_tpr) < wanted_threads && (1 << log2_tpr) < kMaxThreadsPerRow) ++log2_tpr;
  const int threads_per_row = 1 << log2_tpr;
  config.tiling.log2_threads_per_row = log2_tpr;
  config.tiling.chunk_packets = packets_per_thread * threads_per_row;
  config.tiling.chunks = (config.tiling.packets + config.tiling.chunk_packets - 1) / config.tiling.chunk_packets;
  config.threads_per_block = threads_per_row >= kMultiRowBlockThreads ? threads_per_row : kMultiRowBlockThreads;
  const int64_t rows_per_block = config.threads_per_block / threads_per_row;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "mesa_kl: too many rows for one launch (", rows,
              " rows need ", blocks, " blocks, grid.x allows 2^31 - 1)");
  config.blocks = static_cast<unsigned>(blocks);
  return config;
}

bool is_aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// 16-byte packets need unit column stride, C a multiple of the packet width, and every row start of every tensor
// 16-byte aligned (base pointer and row stride); otherwise the scalar instantiation handles any strides.
bool can_vectorize(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor* grad_out) {
  const int64_t elem = student.element_size(), vec = kPacketBytes / elem, rows = student.size(0);
  if (student.size(1) % vec != 0) return false;
  for (const at::Tensor* x : {&student, &teacher}) {
    if (x->stride(1) != 1 || !is_aligned(x->const_data_ptr(), kPacketBytes)) return false;
    if (rows > 1 && x->stride(0) % vec != 0) return false;
  }
  return grad_out == nullptr || is_aligned(grad_out->const_data_ptr(), kPacketBytes);
}

void check_logits(const char* op, const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  TORCH_CHECK(student.dim() == 2, op, ": student must be 2-D (rows, classes), got ", student.dim(),
              "-D with shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), op, ": teacher must have the student's shape ", student.sizes(),
              ", got ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kDouble ||
                  student.scalar_type() == at::kHalf || student.scalar_type() == at::kBFloat16,
              op, ": student must be float32, float64, float16 or bfloat16, got ", student.scalar_type());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), op, ": teacher dtype must equal student dtype ",
              student.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK(student.is_cuda(), op, ": student must be a CUDA tensor, got device ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), op, ": teacher must be on the student's device ",
              student.device(), ", got ", teacher.device());
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> mesa_kl_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                double temperature, bool with_grad) {
  check_logits("mesa_kl_fwd", student, teacher, temperature);
  const at::cuda::OptionalCUDAGuard guard(device_of(student));
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto acc_options = student.options().dtype(accumulation_type(student.scalar_type()));
  at::Tensor loss_rows = at::empty({rows}, acc_options);
  at::Tensor lse = at::empty({4, rows}, acc_options);
  at::Tensor grad = with_grad ? at::empty({rows, cols}, student.options()) : at::empty({0}, student.options());
  if (rows == 0) return {loss_rows, lse, grad};

  const bool vectorized = can_vectorize(student, teacher, with_grad ? &grad : nullptr);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mesa_kl_fwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t tau = static_cast<acc_t>(temperature), inv_tau = acc_t(1) / tau;
    auto launch = [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const LaunchConfig config = plan_launch(rows, cols, kVec, kPacketsPerThread<scalar_t, kVec>);
      TORCHNOVA_LAUNCH_KERNEL(config.blocks, config.threads_per_block, 0, stream, mesa_kl_fwd_kernel<scalar_t, kVec>)(
          student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), student.stride(0),
          student.stride(1), teacher.stride(0), teacher.stride(1), rows, cols, config.tiling, tau, inv_tau,
          loss_rows.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(),
          with_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vectorized) {
      launch(std::integral_constant<int, kPacketBytes / int(sizeof(scalar_t))>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {loss_rows, lse, grad};
}

at::Tensor mesa_kl_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                            const at::Tensor& lse, double temperature) {
  check_logits("mesa_kl_bwd", student, teacher, temperature);
  const int64_t rows = student.size(0), cols = student.size(1);
  const auto acc = accumulation_type(student.scalar_type());
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == rows, "mesa_kl_bwd: grad_rows must have shape (", rows,
              ",), got ", grad_rows.sizes());
  TORCH_CHECK(grad_rows.scalar_type() == acc, "mesa_kl_bwd: grad_rows dtype must be ", acc, " for ",
              student.scalar_type(), " logits, got ", grad_rows.scalar_type());
  TORCH_CHECK(grad_rows.device() == student.device(), "mesa_kl_bwd: grad_rows must be on the student's device ",
              student.device(), ", got ", grad_rows.device());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 4 && lse.size(1) == rows, "mesa_kl_bwd: lse must have shape (4, ",
              rows, "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc, "mesa_kl_bwd: lse dtype must be ", acc, " for ", student.scalar_type(),
              " logits, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == student.device(), "mesa_kl_bwd: lse must be on the student's device ",
              student.device(), ", got ", lse.device());

  const at::cuda::OptionalCUDAGuard guard(device_of(student));
  at::Tensor grad_student = at::empty({rows, cols}, student.options());
  if (rows == 0) return grad_student;
  const at::Tensor grad_rows_c = grad_rows.contiguous(), lse_c = lse.contiguous();

  const bool vectorized = can_vectorize(student, teacher, &grad_student);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mesa_kl_bwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t tau = static_cast<acc_t>(temperature), inv_tau = acc_t(1) / tau;
    auto launch = [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const LaunchConfig config = plan_launch(rows, cols, kVec, kPacketsPerThread<scalar_t, kVec>);
      TORCHNOVA_LAUNCH_KERNEL(config.blocks, config.threads_per_block, 0, stream, mesa_kl_bwd_kernel<scalar_t, kVec>)(
          grad_rows_c.const_data_ptr<acc_t>(), student.const_data_ptr<scalar_t>(),
          teacher.const_data_ptr<scalar_t>(), student.stride(0), student.stride(1), teacher.stride(0),
          teacher.stride(1), lse_c.const_data_ptr<acc_t>(), rows, cols, config.tiling, tau, inv_tau,
          grad_student.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vectorized) {
      launch(std::integral_constant<int, kPacketBytes / int(sizeof(scalar_t))>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CUDA, m) {
  m.impl("mesa_kl_fwd", &mesa_kl_fwd_cuda);
  m.impl("mesa_kl_bwd", &mesa_kl_bwd_cuda);
}

}  // namespace torchnova
