// CUDA emulation build only: the dynamic shared memory of the kernels of one translation unit. The kernel
// files declare it as `extern __shared__ float smem[];` inside namespace torchnova::(anonymous); with
// __shared__ = thread_local that declaration names this buffer, one per OS thread (see cuda_emulation.h).
// Sized for the largest opt-in of any GPU (227 KiB) plus the canary the launch checks.
#pragma once

#include <cstddef>

namespace torchnova {
namespace {
constexpr size_t kTorchnovaEmuDynamicSmemBytes = 228 * 1024 + 512;
alignas(128) thread_local float smem[kTorchnovaEmuDynamicSmemBytes / sizeof(float)];
[[maybe_unused]] void* torchnova_emu_dynamic_smem() { return smem; }
// GCC treats the kernels' block-scope `extern thread_local` redeclaration as possibly dynamically initialised
// and calls this TU's TLS init function, which it only emits when some thread_local of the TU has a dynamic
// initialiser: this one (otherwise the link fails on an undefined __tls_init).
int torchnova_emu_tls_anchor_value() { return 0; }
[[maybe_unused]] thread_local int torchnova_emu_tls_anchor = torchnova_emu_tls_anchor_value();
}  // namespace
}  // namespace torchnova
