// CUDA emulation build only: stands in for the CUDA header of this name (see ../cuda_emulation.h).
#pragma once
#include "emulation/cuda_emulation.h"
