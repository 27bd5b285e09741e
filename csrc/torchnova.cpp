// torchnova op schemas (TORCH_LIBRARY; the attention ops add theirs in csrc/*_ops.cpp with
// TORCH_LIBRARY_FRAGMENT) and the Python module that exports how the extension was built.
// Kernels register themselves per device in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
//
// mesa_kl_fwd(student (R, C), teacher (R, C), temperature, with_grad)
//   -> loss_rows (R,)      tau^2 * KL(softmax(t/tau) || softmax(z/tau)) per row, accumulation dtype
//      lse       (4, R)    [m_z, log s_z, m_t, log s_t], accumulation dtype: the row max m (0 for an all -inf row)
//                          and log-sum log s = log sum_c exp(z_c/tau - m) of each row, i.e. logsumexp(z/tau) =
//                          m_z + log s_z, kept split so exp((z/tau - m) - log s) never sees an lse rounded to
//                          the ulp of a large logit (|z/tau| ~ 1e4: 6e-4 relative error in float32)
//      grad      (R, C)    d loss_rows[r] / d z[r] = tau * (softmax(z/tau) - softmax(t/tau)), student dtype,
//                          contiguous; shape (0,) when with_grad is false
// mesa_kl_bwd(grad_rows (R,), student (R, C), teacher (R, C), lse (4, R), temperature)
//   -> grad_student (R, C) = grad_rows[r] * tau * (exp((z/tau - m_z) - log s_z) - exp((t/tau - m_t) - log s_t)),
//      contiguous, student dtype; rows whose grad_rows is 0 are written as exact zeros without reading their logits.
// The accumulation dtype is float64 for float64 inputs and float32 otherwise.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/cpu_dispatch.h"
#include "cuda/shared_memory_plan.h"

#ifndef TORCHNOVA_CUDA_ARCHS
#define TORCHNOVA_CUDA_ARCHS none
#endif
#define TORCHNOVA_STR_(x) #x
#define TORCHNOVA_STR(x) TORCHNOVA_STR_(x)

TORCH_LIBRARY(torchnova, m) {
  m.def("mesa_kl_fwd(Tensor student, Tensor teacher, float temperature, bool with_grad) -> (Tensor, Tensor, Tensor)");
  m.def("mesa_kl_bwd(Tensor grad_rows, Tensor student, Tensor teacher, Tensor lse, float temperature) -> Tensor");
}

PYBIND11_MODULE(_C, module) {
  module.def("build_info", []() {
    pybind11::dict info;
#ifdef TORCHNOVA_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_archs"] = std::string(TORCHNOVA_STR(TORCHNOVA_CUDA_ARCHS));
#else
    info["with_cuda"] = false;
    info["cuda_archs"] = std::string("");
#endif
    info["torch_version"] = std::string(TORCH_VERSION);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["cpu_isa"] = std::string(torchnova::cpu::kIsaNames[torchnova::cpu::supported_isa()]);
    return info;
  });
  // Dynamic shared memory per block of the smallest launch of a CUDA kernel (csrc/cuda/shared_memory_plan.h, the
  // same functions the launchers size their launches with); -1 for an unknown kernel or a shape out of range. The
  // cuda backend reasons compare it with the device's shared_memory_per_block_optin. Exported by CPU-only builds
  // too (plain arithmetic), so the reasons are testable without a GPU.
  module.def(
      "cuda_shared_memory_bytes",
      [](const std::string& kernel, int64_t frames, int64_t head_dim) {
        return torchnova::smem_plan::launch_bytes(kernel, frames, head_dim);
      },
      pybind11::arg("kernel"), pybind11::arg("frames"), pybind11::arg("head_dim"));
  // Which compiled copy of the CPU kernels runs (csrc/cpu/cpu_dispatch.h): tests run every copy the CPU has.
  module.def("cpu_isa", []() { return std::string(torchnova::cpu::kIsaNames[torchnova::cpu::active_isa()]); });
  module.def("cpu_isas", []() {
    std::vector<std::string> names;
    for (int isa = 0; isa <= torchnova::cpu::supported_isa(); ++isa) names.emplace_back(torchnova::cpu::kIsaNames[isa]);
    return names;
  });
  module.def("set_cpu_isa", [](const std::string& name) {
    const int isa = torchnova::cpu::isa_from_name(name.c_str());
    TORCH_CHECK_VALUE(isa >= 0, "set_cpu_isa: name must be one of baseline, avx2, avx512, got '", name, "'");
    TORCH_CHECK_VALUE(torchnova::cpu::set_active_isa(isa), "set_cpu_isa: this CPU does not support ", name,
                      " (best: ", torchnova::cpu::kIsaNames[torchnova::cpu::supported_isa()], ")");
  });
}
