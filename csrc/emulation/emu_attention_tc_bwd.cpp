// CUDA emulation build only: csrc/cuda/attention_tc_bwd.cu compiled as host C++ (see cuda_emulation.h). The
// emulated spatial and CogVideo backward ops reach its kernels through attention_tc::attention_bwd.
#include "emulation/cuda_emulation.h"
#include "emulation/dynamic_smem.h"

#include "cuda/attention_tc_bwd.cu"
