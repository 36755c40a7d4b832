// Where the ops are registered. The normal builds: namespace clouds, the CPU kernels (plus the CUDA kernels with
// WITH_CUDA). The emulation build (CLOUDS_EMULATION, csrc/emulation/): namespace clouds_emu, whose CPU kernels are the
// CUDA wrappers of csrc/<op>.cpp running the .cu kernels on CPU tensors, so both builds load into one process.
#pragma once

#include <torch/library.h>

#ifdef CLOUDS_EMULATION
#define CLOUDS_LIBRARY(m) TORCH_LIBRARY(clouds_emu, m)
#define CLOUDS_CPU_IMPL(m) [[maybe_unused]] static void clouds_cpu_kernels_not_registered(torch::Library& m)
#define CLOUDS_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(clouds_emu, CPU, m)
#else
#define CLOUDS_LIBRARY(m) TORCH_LIBRARY(clouds, m)
#define CLOUDS_CPU_IMPL(m) TORCH_LIBRARY_IMPL(clouds, CPU, m)
#define CLOUDS_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(clouds, CUDA, m)
#endif
