// CUDA emulation build only: csrc/cuda/mesa_kl_cuda.cu compiled as host C++ (see cuda_emulation.h).
#include "emulation/cuda_emulation.h"
#include "emulation/dynamic_smem.h"

#include "cuda/mesa_kl_cuda.cu"
