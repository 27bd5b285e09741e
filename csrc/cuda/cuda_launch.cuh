// Kernel launches: TORCHNOVA_LAUNCH_KERNEL(grid, block, dynamic_smem_bytes, stream, kernel)(args...) is
// kernel<<<grid, block, dynamic_smem_bytes, stream>>>(args...) under nvcc. The kernel comes last because a
// template kernel name (kernel<scalar_t, kVec>) contains commas. The CUDA emulation build
// (csrc/emulation/cuda_emulation.h, test-only) defines the macro first, as a launch that runs the same kernel on
// the CPU; that is the only reason the launches are spelled this way.
#pragma once

#ifndef TORCHNOVA_LAUNCH_KERNEL
#define TORCHNOVA_LAUNCH_KERNEL(grid, block, dynamic_smem_bytes, stream, ...) \
  __VA_ARGS__<<<grid, block, dynamic_smem_bytes, stream>>>
#endif
