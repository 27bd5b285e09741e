// MESA / SAF KL regularizer, CPU kernels (OpenMP over rows through at::parallel_for).
//
// Math, per row r of student logits z (R, C) and teacher logits t (R, C), temperature tau:
//   z' = z / tau, t' = t / tau, q = softmax(z'), p = softmax(t')
//   loss_rows[r] = tau^2 * sum_c p_c (log p_c - log q_c) = tau^2 * (sum_c p_c (t'_c - z'_c) - lse(t') + lse(z'))
//   d loss_rows[r] / d z[r, c] = tau * (q_c - p_c)
// p_c = 0 (teacher logit -inf) contributes exactly 0, as xlogy / F.kl_div do.
//
// Forward, one row at a time while the row is hot in L1/L2: a max sweep, an exp sweep that accumulates
// sum e^{z'-m_z}, sum e^{t'-m_t} and sum e^{t'-m_t} (t' - z'), and, when the gradient is wanted, a third
// sweep over the cached exponentials that writes tau * (q - p). The gradient is therefore produced in the
// same pass over the logits (no second read of z and t from memory), and each element costs two exps.
// Backward (mesa_kl_bwd) recomputes q and p from the saved row maxima and log-sums (kept split: exp((z' - m) -
// log s), never exp(z' - lse) with lse rounded to the ulp of a large logit) and scales by grad_rows.
//
// float32 / float16 / bfloat16 rows are processed in float32 with a vectorizable exp (Cody-Waite range
// reduction + degree-6 polynomial, ~2 ulp); float64 rows in double with std::exp (the gradcheck path).
#include <torch/extension.h>

#include "cpu_dispatch.h"
#include "cpu_math.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace torchnova {
namespace {

using cpu::exp_nonpositive;

// at::parallel_for over rows, each chunk run by the best compiled copy (csrc/cpu/cpu_dispatch.h).
template <typename Body>
void parallel_rows(int64_t rows, int64_t classes, const Body& body) {
  cpu::parallel_for_isa(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(classes, 1)), body);
}


template <typename acc_t>
struct RowStats {
  acc_t shift_z, log_sum_z;  // logsumexp(z') = shift_z + log_sum_z, kept split (see mesa_kl_bwd_rows)
  acc_t shift_t, log_sum_t;
  acc_t loss;     // tau^2 * KL(p || q)
  acc_t sum_z;    // sum_c e^{z'_c - shift_z}, the normaliser of the exponentials written to q_out
  acc_t sum_t;    // sum_c e^{t'_c - shift_t}, the normaliser of p_out
};

// Statistics of one row of contiguous acc_t logits. When `q_out`/`p_out` are given they receive the
// unnormalised exponentials e^{z'-m_z} and e^{t'-m_t} (for the gradient sweep).
template <typename acc_t>
TORCHNOVA_INLINE RowStats<acc_t> row_stats(const acc_t* z, const acc_t* t, int64_t C, acc_t inv_tau, acc_t tau, acc_t* q_out,
                          acc_t* p_out) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t max_z = neg_inf, max_t = neg_inf;
#pragma omp simd reduction(max : max_z, max_t)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t zc = z[c] * inv_tau, tc = t[c] * inv_tau;
    max_z = zc > max_z ? zc : max_z;
    max_t = tc > max_t ? tc : max_t;
  }
  // An all -inf row: use 0 as the shift so exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
  const acc_t shift_z = std::isinf(max_z) && max_z < 0 ? acc_t(0) : max_z;
  const acc_t shift_t = std::isinf(max_t) && max_t < 0 ? acc_t(0) : max_t;

  // Blocked summation: SIMD partial sums in acc_t over short blocks, blocks accumulated in double, so 256k
  // classes lose no more precision than a 1k-class row.
  constexpr int64_t kBlock = 512;
  double sum_z = 0, sum_t = 0, cross = 0;
  for (int64_t start = 0; start < C; start += kBlock) {
    const int64_t stop = std::min(C, start + kBlock);
    acc_t block_z = 0, block_t = 0, block_cross = 0;
    if (q_out != nullptr) {
#pragma omp simd reduction(+ : block_z, block_t, block_cross)
      for (int64_t c = start; c < stop; ++c) {
        const acc_t zc = z[c] * inv_tau, tc = t[c] * inv_tau;
        const acc_t ez = exp_nonpositive(zc - shift_z), et = exp_nonpositive(tc - shift_t);
        q_out[c] = ez;
        p_out[c] = et;
        block_z += ez;
        block_t += et;
        block_cross += et > 0 ? et * (tc - zc) : acc_t(0);
      }
    } else {
#pragma omp simd reduction(+ : block_z, block_t, block_cross)
      for (int64_t c = start; c < stop; ++c) {
        const acc_t zc = z[c] * inv_tau, tc = t[c] * inv_tau;
        const acc_t ez = exp_nonpositive(zc - shift_z), et = exp_nonpositive(tc - shift_t);
        block_z += ez;
        block_t += et;
        block_cross += et > 0 ? et * (tc - zc) : acc_t(0);
      }
    }
    sum_z += block_z;
    sum_t += block_t;
    cross += block_cross;
  }
  RowStats<acc_t> stats;
  // Combine in double: loss = tau^2 (cross / sum_t - lse_t + lse_z) cancels ~log(C) of each term.
  const double lse_z = shift_z + std::log(sum_z), lse_t = shift_t + std::log(sum_t);
  stats.shift_z = shift_z;
  stats.log_sum_z = static_cast<acc_t>(std::log(sum_z));
  stats.shift_t = shift_t;
  stats.log_sum_t = static_cast<acc_t>(std::log(sum_t));
  // KL >= 0, but the difference of these terms rounds to about -1e-7 where p == q (e.g. one class): clamp at 0.
  // (A NaN row stays NaN: NaN < 0 is false.)
  const double loss = double(tau) * double(tau) * (cross / sum_t - lse_t + lse_z);
  stats.loss = static_cast<acc_t>(loss < 0.0 ? 0.0 : loss);
  stats.sum_z = static_cast<acc_t>(sum_z);
  stats.sum_t = static_cast<acc_t>(sum_t);
  return stats;
}

// Reads row r of a 2-D tensor into contiguous acc_t storage; returns a pointer to use. Contiguous rows of
// the accumulation dtype are used in place.
template <typename scalar_t, typename acc_t>
TORCHNOVA_INLINE const acc_t* load_row(const scalar_t* base, int64_t row_stride, int64_t col_stride, int64_t r, int64_t C,
                      acc_t* buffer) {
  const scalar_t* row = base + r * row_stride;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (col_stride == 1) return row;
  }
  for (int64_t c = 0; c < C; ++c) buffer[c] = static_cast<acc_t>(row[c * col_stride]);
  return buffer;
}

template <typename scalar_t, typename acc_t>
void mesa_kl_fwd_rows(const at::Tensor& student, const at::Tensor& teacher, double temperature, bool with_grad,
                      at::Tensor& loss_rows, at::Tensor& lse, at::Tensor& grad) {
  const int64_t R = student.size(0), C = student.size(1);
  const acc_t tau = static_cast<acc_t>(temperature), inv_tau = acc_t(1) / tau;
  const scalar_t* z_base = student.const_data_ptr<scalar_t>();
  const scalar_t* t_base = teacher.const_data_ptr<scalar_t>();
  const int64_t z_rs = student.stride(0), z_cs = student.stride(1);
  const int64_t t_rs = teacher.stride(0), t_cs = teacher.stride(1);
  acc_t* loss_out = loss_rows.data_ptr<acc_t>();
  acc_t* lse_out = lse.data_ptr<acc_t>();
  scalar_t* grad_out = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
  parallel_rows(R, C, [&](int64_t begin, int64_t end) TORCHNOVA_LAMBDA_INLINE {
    std::vector<acc_t> z_buf(C), t_buf(C), q_buf(with_grad ? C : 0), p_buf(with_grad ? C : 0);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* z = load_row<scalar_t, acc_t>(z_base, z_rs, z_cs, r, C, z_buf.data());
      const acc_t* t = load_row<scalar_t, acc_t>(t_base, t_rs, t_cs, r, C, t_buf.data());
      const RowStats<acc_t> s =
          row_stats<acc_t>(z, t, C, inv_tau, tau, with_grad ? q_buf.data() : nullptr, p_buf.data());
      loss_out[r] = s.loss;
      lse_out[r] = s.shift_z;
      lse_out[R + r] = s.log_sum_z;
      lse_out[2 * R + r] = s.shift_t;
      lse_out[3 * R + r] = s.log_sum_t;
      if (with_grad) {
        scalar_t* g = grad_out + r * C;
        if (std::isnan(s.loss)) {
          // A NaN row (garbage in a padding row) stashes a zero gradient, so the backward's plain
          // grad_rows * stash gives exact zeros for masked rows; the NaN loss itself is still returned.
          for (int64_t c = 0; c < C; ++c) g[c] = scalar_t(0);
          continue;
        }
        const acc_t scale_q = tau / s.sum_z, scale_p = tau / s.sum_t;  // q = e_z / sum_z, p = e_t / sum_t
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<scalar_t>(q_buf[c] * scale_q - p_buf[c] * scale_p);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void mesa_kl_bwd_rows(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                      const at::Tensor& lse, double temperature, at::Tensor& grad_student) {
  const int64_t R = student.size(0), C = student.size(1);
  const acc_t tau = static_cast<acc_t>(temperature), inv_tau = acc_t(1) / tau;
  const scalar_t* z_base = student.const_data_ptr<scalar_t>();
  const scalar_t* t_base = teacher.const_data_ptr<scalar_t>();
  const int64_t z_rs = student.stride(0), z_cs = student.stride(1);
  const int64_t t_rs = teacher.stride(0), t_cs = teacher.stride(1);
  const acc_t* g_rows = grad_rows.const_data_ptr<acc_t>();
  const acc_t* lse_in = lse.const_data_ptr<acc_t>();
  scalar_t* out = grad_student.data_ptr<scalar_t>();
  parallel_rows(R, C, [&](int64_t begin, int64_t end) TORCHNOVA_LAMBDA_INLINE {
    std::vector<acc_t> z_buf(C), t_buf(C);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g = out + r * C;
      const acc_t g_row = g_rows[r];
      if (g_row == acc_t(0)) {  // masked row: never read its logits (they may be garbage)
        for (int64_t c = 0; c < C; ++c) g[c] = scalar_t(0);
        continue;
      }
      const acc_t* z = load_row<scalar_t, acc_t>(z_base, z_rs, z_cs, r, C, z_buf.data());
      const acc_t* t = load_row<scalar_t, acc_t>(t_base, t_rs, t_cs, r, C, t_buf.data());
      const acc_t shift_z = lse_in[r], log_sum_z = lse_in[R + r], scale = g_row * tau;
      const acc_t shift_t = lse_in[2 * R + r], log_sum_t = lse_in[3 * R + r];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t q = exp_nonpositive((z[c] * inv_tau - shift_z) - log_sum_z);
        const acc_t p = exp_nonpositive((t[c] * inv_tau - shift_t) - log_sum_t);
        g[c] = static_cast<scalar_t>(scale * (q - p));
      }
    }
  });
}

void check_logits(const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  TORCH_CHECK(student.dim() == 2, "mesa_kl: student must be 2-D (rows, classes), got shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "mesa_kl: teacher must have the student's shape ",
              student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "mesa_kl: teacher dtype must equal student dtype ",
              student.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), "mesa_kl: teacher must be on the student's device ",
              student.device(), ", got ", teacher.device());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "mesa_kl: logits must be floating point, got ",
              student.scalar_type());
  TORCH_CHECK(temperature > 0, "mesa_kl: temperature must be > 0, got ", temperature);
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> mesa_kl_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                               double temperature, bool with_grad) {
  check_logits(student, teacher, temperature);
  TORCH_CHECK(student.device().is_cpu(), "mesa_kl_fwd_cpu: expected CPU tensors, got ", student.device());
  const int64_t R = student.size(0), C = student.size(1);
  const auto acc_opts = student.options().dtype(accumulation_type(student.scalar_type()));
  at::Tensor loss_rows = at::empty({R}, acc_opts);
  at::Tensor lse = at::empty({4, R}, acc_opts);
  at::Tensor grad = with_grad ? at::empty({R, C}, student.options()) : at::empty({0}, student.options());
  if (R == 0) return {loss_rows, lse, grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mesa_kl_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    mesa_kl_fwd_rows<scalar_t, acc_t>(student, teacher, temperature, with_grad, loss_rows, lse, grad);
  });
  return {loss_rows, lse, grad};
}

at::Tensor mesa_kl_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                           const at::Tensor& lse, double temperature) {
  check_logits(student, teacher, temperature);
  TORCH_CHECK(student.device().is_cpu(), "mesa_kl_bwd_cpu: expected CPU tensors, got ", student.device());
  const int64_t R = student.size(0), C = student.size(1);
  const auto acc = accumulation_type(student.scalar_type());
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == R, "mesa_kl_bwd: grad_rows must have shape (", R,
              ",), got ", grad_rows.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == 4 && lse.size(1) == R, "mesa_kl_bwd: lse must have shape (4, ", R,
              "), got ", lse.sizes());
  TORCH_CHECK(grad_rows.scalar_type() == acc && lse.scalar_type() == acc, "mesa_kl_bwd: grad_rows and lse must be ",
              acc, ", got ", grad_rows.scalar_type(), " and ", lse.scalar_type());
  const at::Tensor grad_rows_c = grad_rows.contiguous(), lse_c = lse.contiguous();
  at::Tensor grad_student = at::empty({R, C}, student.options());
  if (R == 0) return grad_student;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mesa_kl_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    mesa_kl_bwd_rows<scalar_t, acc_t>(grad_rows_c, student, teacher, lse_c, temperature, grad_student);
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchnova, CPU, m) {
  m.impl("mesa_kl_fwd", &mesa_kl_fwd_cpu);
  m.impl("mesa_kl_bwd", &mesa_kl_bwd_cpu);
}

}  // namespace torchnova
