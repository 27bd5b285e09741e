// CUDA emulation build only: csrc/cuda/dual_channel_attention.cu compiled as host C++ (see cuda_emulation.h).
#include "emulation/cuda_emulation.h"
#include "emulation/dynamic_smem.h"

#include "cuda/dual_channel_attention.cu"
