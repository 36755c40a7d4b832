// Stand-in for <c10/cuda/CUDAGuard.h> in the emulation build: the "device" is the CPU the tensors are on.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace c10::cuda
