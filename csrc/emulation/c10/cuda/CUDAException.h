// Stand-in for <c10/cuda/CUDAException.h> in the emulation build: a failed launch (invalid configuration, a deadlock
// at a collective) raises like C10_CUDA_KERNEL_LAUNCH_CHECK on a GPU.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                                          \
  do {                                                                                                          \
    const char* clouds_emu_message = nullptr;                                                                   \
    TORCH_CHECK(::clouds_emu::last_error(&clouds_emu_message, true) == cudaSuccess, "CUDA error: ",             \
                clouds_emu_message);                                                                            \
  } while (0)
