// CogVideo dual-channel mix, CUDA kernels.
//
// Math (schemas in csrc/dual_channel_ops.cpp), per batch b, token t, hidden channel c, T = text_len,
// a_c = sigmoid(alpha_logit[c]):
//   y[b, t, c] = o_base[b, t, c]                                   for t <  T (text rows)
//   y[b, t, c] = a_c * o_base[b, t, c] + (1 - a_c) * o_plus[b, t, c] for t >= T (frame rows)
// Backward with g = grad_y:
//   d_base = g (text rows), a_c * g (frame rows);  d_plus = 0 (text rows), (1 - a_c) * g (frame rows)
//   d_alpha_logit[c] = a_c (1 - a_c) * sum_{b, t >= T} g[b, t, c] (o_base[b, t, c] - o_plus[b, t, c])
//
// Shapes: o_base, o_plus, grad_y (B, L, hidden) of one floating dtype (made contiguous here), alpha_logit
// (hidden,) of any floating dtype (converted to acc_t = float64 for float64 inputs, float32 otherwise).
// Outputs: y, d_base, d_plus (B, L, hidden) o_base.dtype contiguous; d_alpha_logit (hidden,) acc_t.
//
// The alpha gradient is reduced deterministically, without atomics: the B * L rows are cut into `chunks` chunks
// whose count depends only on the shape; each block sums one chunk for 32 channels in a fixed order and writes
// one partial per (chunk, channel); a second kernel adds the partials of each channel in chunk order.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_launch.cuh"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace torchnova {
namespace {

template <typename scalar_t>
using acc_of = at::acc_type<scalar_t, /*is_cuda=*/true>;

constexpr int kPacketBytes = 16;
constexpr int kElementwiseThreads = 256;
// Backward reduction block: 32 channels (one per lane, coalesced) x kRowLanes rows at a time.
constexpr int kChannelsPerBlock = 32;
constexpr int kRowLanes = 8;
// Rows per reduction chunk, at least; capped so that at most kMaxChunks partial rows are written.
constexpr int64_t kMinRowsPerChunk = 64;
constexpr int64_t kMaxChunks = 1024;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Packet {
  scalar_t v[kVec];
};

__device__ __forceinline__ float sigmoid_acc(float x) { return 1.f / (1.f + ::expf(-x)); }
__device__ __forceinline__ double sigmoid_acc(double x) { return 1.0 / (1.0 + ::exp(-x)); }

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kElementwiseThreads)
    dual_channel_mix_fwd_kernel(const scalar_t* __restrict__ o_base,                 // (B, L, hidden) contiguous
                                const scalar_t* __restrict__ o_plus,                 // (B, L, hidden) contiguous
                                const acc_of<scalar_t>* __restrict__ alpha_logit,    // (hidden,) contiguous
                                int64_t packets,                                     // B * L * hidden / kVec
                                int64_t hidden, int64_t seq_len, int64_t text_len,   // hidden % kVec == 0
                                scalar_t* __restrict__ y) {                          // (B, L, hidden) contiguous
  using acc_t = acc_of<scalar_t>;
  using packet_t = Packet<scalar_t, kVec>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t packet = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; packet < packets; packet += stride) {
    const int64_t element = packet * kVec;
    const int64_t token = (element / hidden) % seq_len, channel = element % hidden;  // a packet stays in one row
    const packet_t base = reinterpret_cast<const packet_t*>(o_base)[packet];
    if (token < text_len) {
      reinterpret_cast<packet_t*>(y)[packet] = base;
      continue;
    }
    const packet_t plus = reinterpret_cast<const packet_t*>(o_plus)[packet];
    packet_t out;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const acc_t a = sigmoid_acc(alpha_logit[channel + i]);
      const acc_t b = static_cast<acc_t>(base.v[i]), p = static_cast<acc_t>(plus.v[i]);
      out.v[i] = static_cast<scalar_t>(a * b + (acc_t(1) - a) * p);
    }
    reinterpret_cast<packet_t*>(y)[packet] = out;
  }
}

// One block: channels [tile * 32, tile * 32 + 32) x rows [chunk * rows_per_chunk, (chunk + 1) * rows_per_chunk),
// blockIdx.x = chunk * channel_tiles + tile. Writes d_base, d_plus for its rows and one alpha partial per channel.
template <typename scalar_t>
__global__ void __launch_bounds__(kChannelsPerBlock* kRowLanes)
    dual_channel_mix_bwd_kernel(const scalar_t* __restrict__ grad_y,                // (B, L, hidden) contiguous
                                const scalar_t* __restrict__ o_base,                // (B, L, hidden) contiguous
                                const scalar_t* __restrict__ o_plus,                // (B, L, hidden) contiguous
                                const acc_of<scalar_t>* __restrict__ alpha_logit,   // (hidden,) contiguous
                                int64_t rows,                                       // B * L
                                int64_t hidden, int64_t seq_len, int64_t text_len,
                                int64_t rows_per_chunk, int64_t channel_tiles,
                                scalar_t* __restrict__ d_base,                      // (B, L, hidden) contiguous
                                scalar_t* __restrict__ d_plus,                      // (B, L, hidden) contiguous
                                acc_of<scalar_t>* __restrict__ alpha_partials) {    // (chunks, hidden) contiguous
  using acc_t = acc_of<scalar_t>;
  const int lane = threadIdx.x % kChannelsPerBlock, row_lane = threadIdx.x / kChannelsPerBlock;
  const int64_t tile = blockIdx.x % channel_tiles, chunk = blockIdx.x / channel_tiles;
  const int64_t channel = tile * kChannelsPerBlock + lane;
  const bool channel_valid = channel < hidden;
  const acc_t a = channel_valid ? sigmoid_acc(alpha_logit[channel]) : acc_t(0);
  const int64_t row_begin = chunk * rows_per_chunk, row_end = std::min(rows, row_begin + rows_per_chunk);

  acc_t partial = 0;
  if (channel_valid) {
    for (int64_t row = row_begin + row_lane; row < row_end; row += kRowLanes) {
      const int64_t index = row * hidden + channel;
      const acc_t g = static_cast<acc_t>(grad_y[index]);
      if (row % seq_len < text_len) {
        d_base[index] = grad_y[index];
        d_plus[index] = scalar_t(0);
      } else {
        d_base[index] = static_cast<scalar_t>(a * g);
        d_plus[index] = static_cast<scalar_t>((acc_t(1) - a) * g);
        partial += g * (static_cast<acc_t>(o_base[index]) - static_cast<acc_t>(o_plus[index]));
      }
    }
  }
  __shared__ acc_t partials[kRowLanes][kChannelsPerBlock];
  partials[row_lane][lane] = partial;
  __syncthreads();
  if (row_lane == 0 && channel_valid) {
    acc_t sum = 0;
#pragma unroll
    for (int r = 0; r < kRowLanes; ++r) sum += partials[r][lane];  // fixed order: deterministic
    alpha_partials[chunk * hidden + channel] = sum;
  }
}

// d_alpha_logit[c] = a_c (1 - a_c) * sum over chunks (in chunk order) of alpha_partials[chunk, c].
template <typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    dual_channel_mix_alpha_grad_kernel(const acc_t* __restrict__ alpha_partials,  // (chunks, hidden) contiguous
                                       const acc_t* __restrict__ alpha_logit,     // (hidden,) contiguous
                                       int64_t chunks, int64_t hidden,
                                       acc_t* __restrict__ d_alpha_logit) {       // (hidden,)
  const int64_t channel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (channel >= hidden) return;
  acc_t sum = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += alpha_partials[chunk * hidden + channel];
  const acc_t a = sigmoid_acc(alpha_logit[channel]);
  d_alpha_logit[channel] = a * (acc_t(1) - a) * sum;
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_mix_inputs(const char* op, const at::Tensor& o_base, const at::Tensor& o_plus,
                      const at::Tensor& alpha_logit, int64_t text_len) {
  TORCH_CHECK(o_base.dim() == 3, op, ": o_base must be 3-D (B, L, hidden), got ", o_base.dim(), "-D with shape ",
              o_base.sizes());
  TORCH_CHECK(o_plus.sizes() == o_base.sizes(), op, ": o_plus must have o_base's shape ", o_base.sizes(), ", got ",
              o_plus.sizes());
  TORCH_CHECK(is_floating(o_base.scalar_type()), op,
              ": o_base must be float32, float64, float16 or bfloat16, got ", o_base.scalar_type());
  TORCH_CHECK(o_plus.scalar_type() == o_base.scalar_type(), op, ": o_plus dtype must equal o_base dtype ",
              o_base.scalar_type(), ", got ", o_plus.scalar_type());
  TORCH_CHECK(o_base.is_cuda(), op, ": o_base must be a CUDA tensor, got device ", o_base.device());
  TORCH_CHECK(o_plus.device() == o_base.device(), op, ": o_plus must be on o_base's device ", o_base.device(),
              ", got ", o_plus.device());
  TORCH_CHECK(alpha_logit.dim() == 1 && alpha_logit.size(0) == o_base.size(2), op,
              ": alpha_logit must have shape (hidden,) = (", o_base.size(2), ",), got ", alpha_logit.sizes());
  TORCH_CHECK(is_floating(alpha_logit.scalar_type()), op,
              ": alpha_logit must be float32, float64, float16 or bfloat16, got ", alpha_logit.scalar_type());
  TORCH_CHECK(alpha_logit.device() == o_base.device(), op, ": alpha_logit must be on o_base's device ",
              o_base.device(), ", got ", alpha_logit.device());
  TORCH_CHECK(text_len >= 0 && text_len <= o_base.size(1), op, ": text_len must be in [0, L] = [0, ",
              o_base.size(1), "], got ", text_len);
}

bool is_aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

unsigned elementwise_blocks(int64_t work) {
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(max_blocks, (work + kElementwiseThreads - 1) /
                                                                               kElementwiseThreads)));
}

at::Tensor dual_channel_mix_fwd_cuda(const at::Tensor& o_base, const at::Tensor& o_plus,
                                     const at::Tensor& alpha_logit, int64_t text_len) {
  check_mix_inputs("dual_channel_mix_fwd", o_base, o_plus, alpha_logit, text_len);
  const at::cuda::CUDAGuard guard(o_base.device());
  const at::Tensor base = o_base.contiguous(), plus = o_plus.contiguous();
  const at::Tensor logit = alpha_logit.to(accumulation_type(o_base.scalar_type())).contiguous();
  at::Tensor y = at::empty(o_base.sizes(), o_base.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const int64_t seq_len = o_base.size(1), hidden = o_base.size(2);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o_base.scalar_type(), "dual_channel_mix_fwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    constexpr int kWideVec = kPacketBytes / int(sizeof(scalar_t));
    auto launch = [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      const int64_t packets = y.numel() / kVec;
      TORCHNOVA_LAUNCH_KERNEL(elementwise_blocks(packets), kElementwiseThreads, 0, stream,
                              dual_channel_mix_fwd_kernel<scalar_t, kVec>)(
          base.const_data_ptr<scalar_t>(), plus.const_data_ptr<scalar_t>(), logit.const_data_ptr<acc_t>(), packets,
          hidden, seq_len, text_len, y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // 16-byte packets when a packet never straddles two rows and every pointer is 16-byte aligned.
    if (hidden % kWideVec == 0 && is_aligned(base.const_data_ptr(), kPacketBytes) &&
        is_aligned(plus.const_data_ptr(), kPacketBytes) && is_aligned(y.const_data_ptr(), kPacketBytes)) {
      launch(std::integral_constant<int, kWideVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_channel_mix_bwd_cuda(const at::Tensor& grad_y,
                                                                         const at::Tensor& o_base,
                                                                         const at::Tensor& o_plus,
                                                                         const at::Tensor& alpha_logit,
                                                                         int64_t text_len) {
  check_mix_inputs("dual_channel_mix_bwd", o_base, o_plus, alpha_logit, text_len);
  TORCH_CHECK(grad_y.sizes() == o_base.sizes(), "dual_channel_mix_bwd: grad_y must have o_base's shape ",
              o_base.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == o_base.scalar_type(), "dual_channel_mix_bwd: grad_y dtype must equal o_base "
              "dtype ", o_base.scalar_type(), ", got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == o_base.device(), "dual_channel_mix_bwd: grad_y must be on o_base's device ",
              o_base.device(), ", got ", grad_y.device());
  const at::cuda::CUDAGuard guard(o_base.device());
  const auto acc = accumulation_type(o_base.scalar_type());
  const at::Tensor grad = grad_y.contiguous(), base = o_base.contiguous(), plus = o_plus.contiguous();
  const at::Tensor logit = alpha_logit.to(acc).contiguous();
  const auto options = o_base.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor d_base = at::empty(o_base.sizes(), options), d_plus = at::empty(o_base.sizes(), options);
  const int64_t batch = o_base.size(0), seq_len = o_base.size(1), hidden = o_base.size(2);
  at::Tensor d_alpha_logit = at::empty({hidden}, o_base.options().dtype(acc));
  if (hidden == 0) return {d_base, d_plus, d_alpha_logit};
  const int64_t rows = batch * seq_len;
  if (rows == 0) return {d_base, d_plus, d_alpha_logit.zero_()};

  // The chunking depends only on the shape, so the summation order (and the result) is reproducible.
  const int64_t chunks = std::min(kMaxChunks, (rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  const int64_t channel_tiles = (hidden + kChannelsPerBlock - 1) / kChannelsPerBlock;
  TORCH_CHECK(chunks * channel_tiles <= std::numeric_limits<int32_t>::max(),
              "dual_channel_mix_bwd: hidden = ", hidden, " needs too many blocks for one launch");
  at::Tensor alpha_partials = at::empty({chunks, hidden}, o_base.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o_base.scalar_type(), "dual_channel_mix_bwd_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    TORCHNOVA_LAUNCH_KERNEL(static_cast<unsigned>(chunks * channel_tiles), kChannelsPerBlock * kRowLanes, 0, stream,
                            dual_channel_mix_bwd_kernel<scalar_t>)(
            grad.const_data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(), plus.const_data_ptr<scalar_t>(),
            logit.const_data_ptr<acc_t>(), rows, hidden, seq_len, text_len, rows_per_chunk, channel_tiles,
            d_base.mutable_data_ptr<scalar_t>(), d_plus.mutable_data_ptr<scalar_t>(),
            alpha_partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned reduce_blocks = static_cast<unsigned>((hidden + kElementwiseThreads - 1) / kElementwiseThreads);
    TORCHNOVA_LAUNCH_KERNEL(reduce_blocks, kElementwiseThreads, 0, stream, dual_channel_mix_alpha_grad_kernel<acc_t>)(
        alpha_partials.const_data_ptr<acc_t>(), logit.const_data_ptr<acc_t>(), chunks, hidden,
        d_alpha_logit.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_base, d_plus, d_alpha_logit};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CUDA, m) {
  m.impl("dual_channel_mix_fwd", &dual_channel_mix_fwd_cuda);
  m.impl("dual_channel_mix_bwd", &dual_channel_mix_bwd_cuda);
}

}  // namespace torchnova
