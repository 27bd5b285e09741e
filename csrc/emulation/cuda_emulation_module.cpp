// torchnova._C_cuda_emu: the CUDA kernels of csrc/cuda compiled as host C++ against the emulation layer
// (cuda_emulation.h), registered as the CPU kernels of torchnova::<op>_cuda_emu. Test-only: built with
// TORCHNOVA_CUDA_EMULATION=1 (setup.py); used by torchnova.testing.cuda_emulation().
//
// register_ops() (called from Python after torchnova._C is loaded) defines the schemas of the _cuda_emu ops as
// copies of the real ops' schemas, so they can never drift apart, and the qkv-packed ops, which on a GPU run
// the unpacked CUDA kernels on views (csrc/spacetime_ops.cpp), do the same here with the emulated ones.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <memory>
#include <sstream>
#include <string>
#include <tuple>

#include "spacetime_qkvpacked.h"
// After the torch and pybind11 headers: its keyword macros must not touch them.
#include "emulation/cuda_emulation.h"

namespace torchnova_emu {
void set_device_limits(int multiprocessors, size_t smem_optin_bytes);
void set_guarded_allocation(bool enabled, bool exact_ends);
void set_reverse_schedule(bool reverse);
bool reverse_schedule();
namespace testing {
void bind(pybind11::module& module);
}
}  // namespace torchnova_emu

// Launches of the tensor-core attention forward kernel and backward kernel pair (csrc/cuda/attention_tc_fwd.h,
// attention_tc_bwd.h; the headers themselves need the kernel-side includes, so only these declarations are
// repeated here).
namespace torchnova {
namespace attention_tc __attribute__((visibility("hidden"))) {
int64_t forward_launches();
int64_t backward_launches();
}  // namespace attention_tc
}  // namespace torchnova

namespace {

constexpr const char* kEmulatedOps[] = {
    "mesa_kl_fwd",           "mesa_kl_bwd",           "temporal_attention_fwd",
    "temporal_attention_bwd", "spatial_attention_fwd", "spatial_attention_bwd",
    "temporal_attention_qkvpacked_fwd", "temporal_attention_qkvpacked_bwd", "spatial_attention_qkvpacked_fwd",
    "spatial_attention_qkvpacked_bwd",  "cogvideo_attention_fwd",           "cogvideo_attention_bwd",
    "dual_channel_mix_fwd",             "dual_channel_mix_bwd",
    "temporal_attention_rotary_fwd",    "temporal_attention_rotary_bwd",
    "temporal_attention_rotary_qkvpacked_fwd", "temporal_attention_rotary_qkvpacked_bwd"};

constexpr char kTemporalFwd[] = "torchnova::temporal_attention_fwd_cuda_emu";
constexpr char kTemporalBwd[] = "torchnova::temporal_attention_bwd_cuda_emu";
constexpr char kSpatialFwd[] = "torchnova::spatial_attention_fwd_cuda_emu";
constexpr char kSpatialBwd[] = "torchnova::spatial_attention_bwd_cuda_emu";
using Packed = torchnova::spacetime::PackedViaUnpacked<kTemporalFwd, kTemporalBwd, kSpatialFwd, kSpatialBwd>;
constexpr char kRotaryFwd[] = "torchnova::temporal_attention_rotary_fwd_cuda_emu";
constexpr char kRotaryBwd[] = "torchnova::temporal_attention_rotary_bwd_cuda_emu";
using RotaryPacked = torchnova::spacetime::RotaryPackedViaUnpacked<kRotaryFwd, kRotaryBwd>;

// Idempotent: defines torchnova::<op>_cuda_emu for every op with the real op's schema.
void register_ops() {
  static bool done = false;
  if (done) return;
  auto* defs = new torch::Library(torch::Library::FRAGMENT, "torchnova", std::nullopt, __FILE__, __LINE__);
  for (const char* name : kEmulatedOps) {
    const std::string real = std::string("torchnova::") + name;
    auto handle = c10::Dispatcher::singleton().findSchema({real, ""});
    TORCH_CHECK(handle.has_value(), "CUDA emulation: the op ", real,
                " is not registered; import torchnova._C before torchnova._C_cuda_emu");
    std::ostringstream schema;
    schema << handle->schema();
    std::string text = schema.str();
    const std::string prefix = real + "(";
    TORCH_CHECK(text.rfind(prefix, 0) == 0, "CUDA emulation: unexpected schema ", text);
    text = std::string(name) + "_cuda_emu(" + text.substr(prefix.size());
    defs->def(text.c_str());
  }
  auto* impls = new torch::Library(torch::Library::IMPL, "torchnova", c10::DispatchKey::CPU, __FILE__, __LINE__);
  impls->impl("temporal_attention_qkvpacked_fwd_cuda_emu", &Packed::temporal_fwd);
  impls->impl("temporal_attention_qkvpacked_bwd_cuda_emu", &Packed::temporal_bwd);
  impls->impl("spatial_attention_qkvpacked_fwd_cuda_emu", &Packed::spatial_fwd);
  impls->impl("spatial_attention_qkvpacked_bwd_cuda_emu", &Packed::spatial_bwd);
  impls->impl("temporal_attention_rotary_qkvpacked_fwd_cuda_emu", &RotaryPacked::fwd);
  impls->impl("temporal_attention_rotary_qkvpacked_bwd_cuda_emu", &RotaryPacked::bwd);
  done = true;
}

}  // namespace

PYBIND11_MODULE(_C_cuda_emu, module) {
  module.doc() = "torchnova CUDA kernels compiled for the CPU emulation layer (test-only)";
  module.def("register_ops", &register_ops);
  module.def("ops", []() {
    std::vector<std::string> names(std::begin(kEmulatedOps), std::end(kEmulatedOps));
    return names;
  });
  module.def(
      "set_device_limits",
      [](int multiprocessors, int64_t smem_optin_bytes) {
        TORCH_CHECK_VALUE(multiprocessors >= 1, "set_device_limits: multiprocessors must be >= 1, got ",
                          multiprocessors);
        TORCH_CHECK_VALUE(smem_optin_bytes >= 48 * 1024 && smem_optin_bytes <= 227 * 1024,
                          "set_device_limits: smem_optin_bytes must be in [49152, 232448], got ", smem_optin_bytes);
        torchnova_emu::set_device_limits(multiprocessors, size_t(smem_optin_bytes));
      },
      pybind11::arg("multiprocessors"), pybind11::arg("smem_optin_bytes"));
  module.def("set_guarded_allocation", &torchnova_emu::set_guarded_allocation, pybind11::arg("enabled"),
             pybind11::arg("exact_ends") = false,
             "CPU tensors allocated while enabled end at a guard page (out-of-bounds kernel accesses fault, and the "
             "launch reports them); exact_ends: no 16-byte alignment slack before the guard page");
  module.def("set_reverse_schedule", &torchnova_emu::set_reverse_schedule, pybind11::arg("reverse"),
             "the race check: run the threads of a block in reverse order between synchronisation points");
  module.def("reverse_schedule", &torchnova_emu::reverse_schedule);
  module.def(
      "guarded_copy", [](const at::Tensor& t) { return torchnova_emu::guarded_copy(t); }, pybind11::arg("tensor"),
      "what every emulated op does with its tensor arguments: a copy (same sizes and strides) that ends at a guard "
      "page");
  module.def("device_limits", []() {
    const auto* p = at::cuda::getCurrentDeviceProperties();
    pybind11::dict d;
    d["name"] = std::string(p->name);
    d["multiprocessors"] = p->multiProcessorCount;
    d["smem_optin_bytes"] = int64_t(p->sharedMemPerBlockOptin);
    return d;
  });
  module.def("tensor_core_forward_launches", &torchnova::attention_tc::forward_launches,
             "Launches of the tensor-core attention forward kernel so far (tests check which kernel ran)");
  module.def("tensor_core_backward_launches", &torchnova::attention_tc::backward_launches,
             "Launches of the tensor-core attention backward kernel pair so far (tests check which kernels ran)");
  torchnova_emu::testing::bind(module);
}
