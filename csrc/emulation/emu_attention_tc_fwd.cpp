// CUDA emulation build only: csrc/cuda/attention_tc_fwd.cu compiled as host C++ (see cuda_emulation.h).
#include "emulation/cuda_emulation.h"
#include "emulation/dynamic_smem.h"

#include "cuda/attention_tc_fwd.cu"
