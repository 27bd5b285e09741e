// CUDA emulation build only: csrc/cuda/spacetime_temporal.cu compiled as host C++ (see cuda_emulation.h).
#include "emulation/cuda_emulation.h"
#include "emulation/dynamic_smem.h"

#include "cuda/spacetime_temporal.cu"
